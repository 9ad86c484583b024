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
from .manifest import Manifest, read_manifest


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
