"""Duration-balanced shards of a manifest, optionally packed into one contiguous PCM file each.

A packed shard `NAME.K.pcm` holds the int16 little-endian samples of every utterance of the
shard manifest `NAME.K.tsv`, back to back in manifest order; `NAME.K.offsets.npy` holds the
n + 1 sample offsets. The loader memory-maps the file, so training opens no per-utterance files.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
from pathlib import Path

import numpy as np

from .audio import read_pcm16
from .fsutil import atomic_open, atomic_write_text
from .labels import to_letters
from .manifest import Manifest, read_lines, read_manifest, write_lines, write_manifest
from .parallel import run_unordered


def balanced_partition(sizes: np.ndarray, num_shards: int) -> list[np.ndarray]:
    """Split item indices into `num_shards` groups of near-equal total size.

    Longest-first greedy assignment to the lightest shard: the heaviest and lightest shards differ
    by at most one item. Each group keeps the original (manifest) order.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if len(sizes) < num_shards:
        raise ValueError(f"cannot make {num_shards} shards from {len(sizes)} utterances")
    heap = [(0, k) for k in range(num_shards)]
    groups: list[list[int]] = [[] for _ in range(num_shards)]
    for i in np.argsort(-np.asarray(sizes), kind="stable"):
        total, k = heapq.heappop(heap)
        groups[k].append(int(i))
        heapq.heappush(heap, (total + int(sizes[i]), k))
    return [np.sort(np.asarray(g, dtype=np.int64)) for g in groups]


def shard_paths(directory: Path, name: str, k: int) -> dict[str, Path]:
    stem = directory / f"{name}.{k}"
    return {
        "tsv": stem.with_suffix(stem.suffix + ".tsv"),
        "pcm": stem.with_suffix(stem.suffix + ".pcm"),
        "offsets": stem.with_suffix(stem.suffix + ".offsets.npy"),
        "meta": stem.with_suffix(stem.suffix + ".json"),
    }


def pack_shard(manifest_path: Path, pcm_path: Path, offsets_path: Path, meta_path: Path) -> str:
    """Pack the audio listed in `manifest_path`; skipped if an identical pack already exists."""
    digest = hashlib.sha1(manifest_path.read_bytes()).hexdigest()
    if meta_path.exists() and pcm_path.exists():
        try:
            if json.loads(meta_path.read_text())["manifest_sha1"] == digest:
                return "kept"
        except (ValueError, KeyError):
            pass
    manifest = read_manifest(manifest_path)
    offsets = np.zeros(len(manifest) + 1, dtype=np.int64)
    np.cumsum(manifest.sizes, out=offsets[1:])
    with atomic_open(pcm_path, "wb") as f:
        for i in range(len(manifest)):
            path = manifest.full_path(i)
            pcm = read_pcm16(path)
            if pcm.ndim != 1 or len(pcm) != manifest.sizes[i]:
                raise ValueError(
                    f"{path}: {len(pcm)} samples ({pcm.ndim} dims) but the manifest says "
                    f"{manifest.sizes[i]}; re-run data preparation"
                )
            f.write(pcm.astype("<i2", copy=False).tobytes())
    with atomic_open(offsets_path, "wb") as f:
        np.save(f, offsets)
    meta = {"manifest_sha1": digest, "num_utterances": len(manifest), "num_samples": int(offsets[-1])}
    atomic_write_text(meta_path, json.dumps(meta) + "\n")
    return "packed"


def remove_stale_shards(directory: Path, name: str, num_shards: int) -> None:
    """Delete shards `name.K.*` with K >= num_shards left by an earlier run with more shards."""
    if not directory.is_dir():
        return
    for path in directory.glob(f"{name}.*"):
        parts = path.name[len(name) + 1 :].split(".", 1)
        if parts[0].isdigit() and int(parts[0]) >= num_shards:
            os.unlink(path)


def shard_manifest(manifest: Manifest, groups: list[np.ndarray]) -> list[Manifest]:
    return [Manifest(manifest.root, [manifest.paths[i] for i in g], manifest.sizes[g]) for g in groups]


def write_shards(out: Path, name: str, num_shards: int, pack: bool, workers: int = 1) -> None:
    """Split `out/NAME.tsv` into duration-balanced `out/shards/NAME.K.tsv` (with the `.wrd`/`.ltr`
    labels when `NAME.wrd` exists) and, with `pack`, pack each shard's audio."""
    manifest = read_manifest(out / f"{name}.tsv")
    wrd_path = out / f"{name}.wrd"
    wrd = read_lines(wrd_path) if wrd_path.exists() else None
    shard_dir = out / "shards"
    shard_dir.mkdir(exist_ok=True)
    remove_stale_shards(shard_dir, name, num_shards)
    groups = balanced_partition(manifest.sizes, num_shards)
    for k, (g, m) in enumerate(zip(groups, shard_manifest(manifest, groups))):
        paths = shard_paths(shard_dir, name, k)
        write_manifest(paths["tsv"], m.root, list(zip(m.paths, m.sizes.tolist())))
        if wrd is None:  # unlabelled audio: no label files, and none left from an earlier run
            for ext in ("wrd", "ltr"):
                paths["tsv"].with_suffix(f".{ext}").unlink(missing_ok=True)
        else:
            words = [wrd[i] for i in g]
            write_lines(paths["tsv"].with_suffix(".wrd"), words)
            write_lines(paths["tsv"].with_suffix(".ltr"), [to_letters(w) for w in words])
    if pack:
        args = [tuple(shard_paths(shard_dir, name, k)[x] for x in ("tsv", "pcm", "offsets", "meta")) for k in range(num_shards)]
        list(run_unordered(_pack_args, args, workers))
    else:
        for k in range(num_shards):
            for key in ("pcm", "offsets", "meta"):
                shard_paths(shard_dir, name, k)[key].unlink(missing_ok=True)


def _pack_args(args: tuple) -> str:
    return pack_shard(*args)
