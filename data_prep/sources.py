"""Where utterances come from: a manifest of audio files, or packed shards memory-mapped.

Both expose `sizes` (samples per utterance), `ids` and `read(i)` -> float32 samples in [-1, 1),
so the loader does not care which one it reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import soundfile as sf

from .audio import AudioError, check_samples, describe_error
from .manifest import Manifest, read_lines, read_manifest, utterance_id
from .shards import shard_paths

SAMPLE_RATE = 16_000
_REPREPARE = "re-run `python -m data_prep librispeech` to rebuild the manifests (it converts or leaves out such files)"


class BadUtteranceError(ValueError, RuntimeError):
    """A manifest lists audio that cannot be trained on (vanished, damaged, changed or with bad samples).

    A ValueError, so the training commands report it in one line and exit 1 instead of showing a
    traceback; also a RuntimeError, which this error was before it had a type of its own.
    """

    def __init__(self, message: str, path: str = "", line: int = 0) -> None:
        super().__init__(message)
        self.path, self.line = path, line


class ManifestSource:
    """Utterances decoded one file at a time from a fairseq manifest."""

    def __init__(self, manifest_path: str | os.PathLike) -> None:
        self.manifest_path = Path(manifest_path)
        self.manifest: Manifest = read_manifest(self.manifest_path)
        self.sizes = self.manifest.sizes
        self.ids = [utterance_id(p) for p in self.manifest.paths]

    def __len__(self) -> int:
        return len(self.sizes)

    def read(self, i: int) -> np.ndarray:
        """Utterance i as float32; raises `BadUtteranceError` naming the manifest line and the file."""
        path = self.manifest.full_path(i)
        line = self.manifest.line_number(i)
        where = f"{path} (line {line} of {self.manifest_path})"
        try:
            samples, rate = sf.read(path, dtype="float32")
        except Exception as err:
            raise BadUtteranceError(
                f"cannot read {where}: {describe_error(err, path)}. The file changed or vanished since data "
                f"preparation; {_REPREPARE}.", path, line,
            ) from err
        if rate != SAMPLE_RATE or samples.ndim != 1:
            channels = 1 if samples.ndim == 1 else samples.shape[1]
            problem = f"it is {rate} Hz with {channels} channels, expected {SAMPLE_RATE} Hz mono"
        elif len(samples) != self.sizes[i]:
            problem = f"it has {len(samples)} samples but the manifest says {self.sizes[i]} (the file changed)"
        else:
            try:
                check_samples(samples)
                return samples
            except AudioError as err:
                problem = f"{err.reason}: {err.detail}"
        raise BadUtteranceError(f"cannot use {where}: {problem}; {_REPREPARE}.", path, line)

    read_raw = read

    def label_path(self, ext: str) -> Path:
        return self.manifest_path.with_suffix(f".{ext}")


class PackedSource:
    """Utterances sliced out of memory-mapped int16 shards (one or more, concatenated)."""

    def __init__(self, shard_tsvs: list[Path]) -> None:
        if not shard_tsvs:
            raise ValueError("no packed shards given")
        self.shard_tsvs = list(shard_tsvs)
        sizes, ids, self._pcm_paths, self._starts = [], [], [], []
        offsets = []
        for tsv in self.shard_tsvs:
            pcm = tsv.with_suffix(".pcm")
            off = np.load(tsv.with_suffix(".offsets.npy"))
            manifest = read_manifest(tsv)
            expected = os.path.getsize(pcm) // 2 if pcm.exists() else -1
            if expected != off[-1] or len(off) != len(manifest) + 1:
                raise RuntimeError(
                    f"packed shard {pcm} does not match {tsv} (missing, truncated or stale); "
                    "re-run `python -m data_prep librispeech ... --pack`"
                )
            sizes.append(manifest.sizes)
            ids.extend(utterance_id(p) for p in manifest.paths)
            self._pcm_paths.append(pcm)
            offsets.append(off)
        self.sizes = np.concatenate(sizes)
        self.ids = ids
        # utterance i lives in shard _shard_of[i] at samples [_begin[i], _begin[i] + sizes[i])
        self._shard_of = np.concatenate([np.full(len(s), k, dtype=np.int32) for k, s in enumerate(sizes)])
        self._begin = np.concatenate([o[:-1] for o in offsets])
        self._maps: list[np.memmap] | None = None

    def __len__(self) -> int:
        return len(self.sizes)

    def _mapped(self) -> list[np.memmap]:
        # Opened lazily so that each DataLoader worker maps the files itself after fork.
        if self._maps is None:
            self._maps = [np.memmap(p, dtype="<i2", mode="r") for p in self._pcm_paths]
        return self._maps

    def read_raw(self, i: int) -> np.ndarray:
        """The int16 samples as a view of the memory map (nothing is copied yet)."""
        start = int(self._begin[i])
        return self._mapped()[self._shard_of[i]][start : start + int(self.sizes[i])]

    def read(self, i: int) -> np.ndarray:
        return self.read_raw(i).astype(np.float32) * np.float32(1 / 32768)

    def label_lines(self, ext: str) -> list[str]:
        return [line for tsv in self.shard_tsvs for line in read_lines(tsv.with_suffix(f".{ext}"))]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = None  # memory maps are re-opened in the receiving process
        return state


def packed_shards(data_dir: Path, split: str) -> list[Path]:
    """The shard manifests of `split` that have packed audio, in shard order."""
    shard_dir = data_dir / "shards"
    found = []
    k = 0
    while shard_paths(shard_dir, split, k)["tsv"].exists():
        paths = shard_paths(shard_dir, split, k)
        if not paths["pcm"].exists():
            return []
        found.append(paths["tsv"])
        k += 1
    if found:
        meta = json.loads(shard_paths(shard_dir, split, 0)["meta"].read_text())
        if "manifest_sha1" not in meta:
            return []
    return found


def open_source(data: str | os.PathLike, split: str = "train", packed: bool | None = None):
    """Open `split` of a prepared directory (or a manifest path given as `data`).

    packed=None uses packed shards when they exist, True requires them, False never uses them.
    """
    data = Path(data)
    if data.suffix == ".tsv":
        return ManifestSource(data)
    if packed is not False:
        shards = packed_shards(data, split)
        if shards:
            return PackedSource(shards)
        if packed:
            raise FileNotFoundError(
                f"no packed shards for {split!r} in {data / 'shards'}; run data prep with --pack"
            )
    return ManifestSource(data / f"{split}.tsv")


def read_labels(source, ext: str = "ltr") -> list[str]:
    """Label lines (`.ltr`, `.wrd`) aligned with the utterances of `source`."""
    lines = source.label_lines(ext) if isinstance(source, PackedSource) else read_lines(source.label_path(ext))
    if len(lines) != len(source):
        raise ValueError(f"{len(lines)} `.{ext}` label lines for {len(source)} utterances; re-run data prep")
    return lines
