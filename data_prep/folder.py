"""`python -m data_prep audio DIR OUT`: pretraining manifests for any tree of audio files.

The counterpart of fairseq's `wav2vec_manifest.py` (no transcripts), with the LibriSpeech
preparation's guarantees: every file decoded once in parallel, defects named in `report.tsv` and
never listed, other rates and several channels converted to 16 kHz mono under `OUT/converted/`,
cached re-runs, atomic outputs.

    train.tsv, valid.tsv   fairseq manifests (root DIR; a seeded `--valid-percent` of the files in valid)
    shards/train.K.*       duration-balanced shards (--num-shards), packed PCM (--pack)
    report.tsv, summary.json
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .fsutil import atomic_write_text
from .manifest import write_lines, write_manifest
from .scan import PrepResult, Record, problem_row, scan_dirs
from .shards import write_shards

SAMPLE_RATE = 16_000
SPLIT = "audio"  # the name the scan cache and report.tsv use for the folder
DEFAULT_EXTENSIONS = ("flac", "wav")
INFORMATIONAL = {"converted"}


@dataclass
class FolderOptions:
    root: Path
    out: Path
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    valid_percent: float = 0.01  # fairseq's wav2vec_manifest.py default
    seed: int = 42  # ditto
    workers: int = max(1, os.cpu_count() or 1)
    num_shards: int = 0
    pack: bool = False


def parse_extensions(text: str) -> tuple[str, ...]:
    exts = tuple(dict.fromkeys(e.strip().lower().lstrip(".") for e in text.split(",") if e.strip()))
    if not exts:
        raise ValueError(f"--ext needs at least one extension such as flac,wav; got {text!r}")
    return exts


def _jobs(opts: FolderOptions) -> tuple[Path, list[tuple[str, Path, Path]]]:
    root = opts.root.resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; pass the folder that holds the audio files")
    out = opts.out.resolve()
    if out == root or root in out.parents:
        # the converted copies and segments written under OUT would be found by the next run
        raise ValueError(f"OUT ({out}) is inside DIR ({root}); write the manifests somewhere else")
    return root, [(SPLIT, root, root)]


def _scan(opts: FolderOptions, part: tuple[int, int] | None = None) -> PrepResult:
    _, jobs = _jobs(opts)
    suffixes = tuple(f".{e}" for e in opts.extensions)
    return scan_dirs(jobs, opts.out, opts.workers, part=part, labelled=False, extensions=suffixes)


def prepare_folder_part(opts: FolderOptions, index: int, count: int) -> PrepResult:
    """Task `index` of a job array of `count`: decode every count-th directory into a partial cache."""
    if not 0 <= index < count:
        raise ValueError(f"part {index} of {count} does not exist (parts are numbered 0 to {count - 1})")
    opts.out.mkdir(parents=True, exist_ok=True)
    return _scan(opts, (index, count))


def split_held_out(n: int, valid_percent: float, seed: int) -> np.ndarray:
    """Which of n items (in a fixed order) go to valid: each with probability `valid_percent`."""
    if valid_percent <= 0:
        return np.zeros(n, dtype=bool)
    return np.random.default_rng(seed).random(n) < valid_percent


def prepare_folder(opts: FolderOptions) -> PrepResult:
    opts.out.mkdir(parents=True, exist_ok=True)
    root, _ = _jobs(opts)
    result = _scan(opts)
    records = result.splits[SPLIT]
    held = split_held_out(len(records), opts.valid_percent, opts.seed)
    train = [r for r, h in zip(records, held) if not h]
    valid = [r for r, h in zip(records, held) if h]
    for name, recs in (("train", train), ("valid", valid)):
        path = opts.out / f"{name}.tsv"
        if recs:
            write_manifest(path, str(root), [(r.relpath, r.num_samples) for r in recs])
        else:
            path.unlink(missing_ok=True)  # never leave a manifest from an earlier run beside new ones
    if opts.pack and opts.num_shards == 0:
        opts.num_shards = 1
    if opts.num_shards and train:
        write_shards(opts.out, "train", min(opts.num_shards, len(train)), opts.pack, opts.workers)
    write_lines(opts.out / "report.tsv", ["split\tpath\tproblem\tdetail"] + [problem_row(p) for p in result.problems])
    summary = {
        "root": str(root),
        "extensions": list(opts.extensions),
        "splits": {n: {"utterances": len(r), "hours": round(hours(r), 4)} for n, r in (("train", train), ("valid", valid)) if r},
        "problems": dict(Counter(p.reason for p in result.problems)),
        "valid_percent": opts.valid_percent,
        "seed": opts.seed,
        "num_shards": opts.num_shards,
        "packed": opts.pack,
        "disk": disk_arithmetic(sum(r.num_samples for r in records)),
    }
    atomic_write_text(opts.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return result


def hours(records: list[Record]) -> float:
    return sum(r.num_samples for r in records) / SAMPLE_RATE / 3600


PACKED_BYTES_PER_HOUR = SAMPLE_RATE * 2 * 3600  # int16: 115.2 MB per hour


def disk_arithmetic(num_samples: int, flac_bytes: int | None = None) -> dict:
    """What the audio takes on disk: packed int16 is exactly 2 bytes a sample (115.2 MB per hour)."""
    out = {"hours": round(num_samples / SAMPLE_RATE / 3600, 4), "packed_int16_bytes": 2 * num_samples}
    if flac_bytes is not None:
        out["flac_bytes"] = flac_bytes
    return out


def folder_summary_line(result: PrepResult, out: Path) -> str:
    counts = Counter(p.reason for p in result.problems)
    rejected = {k: v for k, v in counts.items() if k not in INFORMATIONAL}
    records = result.splits.get(SPLIT, [])
    text = f"{len(records)} usable files ({hours(records):.2f} h)"
    text += "; rejected: " + (", ".join(f"{v} {k}" for k, v in sorted(rejected.items())) or "none")
    if counts.get("converted"):
        text += f"; converted: {counts['converted']}"
    packed_gb = 2 * sum(r.num_samples for r in records) / 1e9
    return text + f"; packed as int16 they take {packed_gb:.2f} GB (115.2 MB per hour) -- details in {out / 'report.tsv'}"
