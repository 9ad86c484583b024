"""`python -m data_prep librispeech`: manifests, labels, dictionary and shards from a LibriSpeech tree.

Outputs in OUT (fairseq's `wav2vec_manifest.py` + `libri_labels.py` formats):
    {split}.tsv/.wrd/.ltr     every split directory found under ROOT (train-clean-100, dev-other, ...)
    train.*                   all train-* splits together (pretraining and 960 h fine-tuning)
    valid.*                   a named dev split, or a held-out fraction of train
    train-10m/1h/10h.*        Libri-Light limited-resource splits (with --finetuning-root)
    dict.ltr.txt              letter dictionary with counts, from the training transcripts
    shards/train.K.*          duration-balanced shards (--num-shards), packed PCM (--pack)
    report.tsv                every rejected or converted file with its reason
    summary.json              counts and hours per split
Files at another sample rate or with several channels are converted to 16 kHz mono FLAC under
OUT/converted/ and listed there by absolute path; the originals are never modified.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .fsutil import atomic_write_text
from .labels import format_dictionary, letter_counts, to_letters
from .manifest import write_lines, write_manifest
from .scan import PrepResult, Record, problem_row, scan_dirs
from .shards import write_shards

SAMPLE_RATE = 16_000
#: Libri-Light fine-tuning subsets: output split -> directories under `librispeech_finetuning`.
FINETUNE_SPLITS = {
    "train-10m": ["1h/0"],
    "train-1h": [f"1h/{k}" for k in range(6)],
    "train-10h": [f"1h/{k}" for k in range(6)] + ["9h"],
}
INFORMATIONAL = {"converted"}


@dataclass
class PrepOptions:
    root: Path
    out: Path
    workers: int = max(1, os.cpu_count() or 1)
    num_shards: int = 0
    pack: bool = False
    finetuning_root: Path | None = None
    decode: bool = True
    valid_split: str | None = "dev-clean"
    valid_percent: float = 0.0
    seed: int = 0


def resolve_root(root: Path) -> Path:
    root = root.resolve()
    if (root / "LibriSpeech").is_dir():
        root = root / "LibriSpeech"
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; pass the LibriSpeech directory (or its parent)")
    return root


def _write_split(out: Path, name: str, root: Path, records: list[Record]) -> None:
    write_manifest(out / f"{name}.tsv", str(root), [(r.relpath, r.num_samples) for r in records])
    write_lines(out / f"{name}.wrd", [r.words for r in records])
    write_lines(out / f"{name}.ltr", [to_letters(r.words) for r in records])


def _hours(records: list[Record]) -> float:
    return sum(r.num_samples for r in records) / SAMPLE_RATE / 3600


def _jobs(opts: PrepOptions) -> tuple[Path, list[str], Path | None, list[tuple[str, Path, Path]]]:
    root = resolve_root(opts.root)
    splits = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    jobs = [(s, root / s, root) for s in splits]
    ft_root = opts.finetuning_root.resolve() if opts.finetuning_root else None
    if ft_root is not None:
        if (ft_root / "librispeech_finetuning").is_dir():
            ft_root = ft_root / "librispeech_finetuning"
        for sub in FINETUNE_SPLITS["train-10h"]:
            if not (ft_root / sub).is_dir():
                raise FileNotFoundError(f"{ft_root / sub} is missing: is {ft_root} the Libri-Light librispeech_finetuning directory?")
            jobs.append((f"finetuning/{sub}", ft_root / sub, ft_root))
    return root, splits, ft_root, jobs


def prepare_part(opts: PrepOptions, index: int, count: int) -> PrepResult:
    """Task `index` of a job array of `count`: decode its share of the chapters into a partial
    cache and write nothing else; a final `prepare` with the same options merges the parts."""
    if not 0 <= index < count:
        raise ValueError(f"part {index} of {count} does not exist (parts are numbered 0 to {count - 1})")
    opts.out.mkdir(parents=True, exist_ok=True)
    _, _, _, jobs = _jobs(opts)
    return scan_dirs(jobs, opts.out, opts.workers, opts.decode, part=(index, count))


def prepare(opts: PrepOptions) -> PrepResult:
    opts.out.mkdir(parents=True, exist_ok=True)
    root, splits, ft_root, jobs = _jobs(opts)
    result = scan_dirs(jobs, opts.out, opts.workers, opts.decode)
    if result.usable == 0:
        _write_report(opts.out, result)
        return result

    outputs: dict[str, tuple[Path, list[Record]]] = {s: (root, result.splits[s]) for s in splits}
    train = [r for s in splits if s.startswith("train") for r in result.splits[s]]
    valid: list[Record] = []
    if opts.valid_percent > 0:
        rng = np.random.default_rng(opts.seed)
        held = rng.random(len(train)) < opts.valid_percent
        valid = [r for r, h in zip(train, held) if h]
        train = [r for r, h in zip(train, held) if not h]
    elif opts.valid_split and opts.valid_split in result.splits:
        valid = result.splits[opts.valid_split]
    if train:
        outputs["train"] = (root, train)
    if valid:
        outputs["valid"] = (root, valid)
    if ft_root is not None:
        for name, subs in FINETUNE_SPLITS.items():
            recs = sorted((r for sub in subs for r in result.splits[f"finetuning/{sub}"]), key=lambda r: r.relpath)
            outputs[name] = (ft_root, recs)
    for name, (base, recs) in outputs.items():
        _write_split(opts.out, name, base, recs)
    labelled = train or [r for recs in result.splits.values() for r in recs]
    counts: Counter = letter_counts(to_letters(r.words) for r in labelled)
    atomic_write_text(opts.out / "dict.ltr.txt", format_dictionary(counts))

    if opts.pack and opts.num_shards == 0:
        opts.num_shards = 1
    if opts.num_shards and train:
        write_shards(opts.out, "train", opts.num_shards, opts.pack, opts.workers)
    _write_report(opts.out, result)
    summary = {
        "root": str(root),
        "finetuning_root": str(ft_root) if ft_root else None,
        "splits": {n: {"utterances": len(r), "hours": round(_hours(r), 4)} for n, (_, r) in outputs.items()},
        "problems": dict(Counter(p.reason for p in result.problems)),
        "num_shards": opts.num_shards,
        "packed": opts.pack,
    }
    atomic_write_text(opts.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return result


def _write_report(out: Path, result: PrepResult) -> None:
    rows = ["split\tpath\tproblem\tdetail"] + [problem_row(p) for p in result.problems]
    write_lines(out / "report.tsv", rows)


def summary_line(result: PrepResult, out: Path) -> str:
    counts = Counter(p.reason for p in result.problems)
    rejected = {k: v for k, v in counts.items() if k not in INFORMATIONAL}
    main = [r for s, recs in result.splits.items() if not s.startswith("finetuning/") for r in recs]
    parts = [f"{len(main)} usable utterances ({_hours(main):.2f} h)"]
    if len(main) < result.usable:
        parts[0] += f" + {result.usable - len(main)} in the fine-tuning subsets"
    parts.append("rejected: " + (", ".join(f"{v} {k}" for k, v in sorted(rejected.items())) or "none"))
    if counts.get("converted"):
        parts.append(f"converted: {counts['converted']}")
    return "; ".join(parts) + f" -- details in {out / 'report.tsv'}"
