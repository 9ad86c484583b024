"""`python -m data_prep merge SRC... --out OUT`: one pretraining directory from several prepared ones.

Each SRC is the output of `data_prep librispeech`, `audio` or `librilight` (or another merge).
`train.tsv` and `valid.tsv` of every source are concatenated under one root, the deepest
directory common to all sources' roots, so paths stay relative where they can (fairseq joins root
and path; an absolute path is kept as is). Labels (`.wrd`, `.ltr`) are merged when every source of
a split has them; otherwise the split is written unlabelled, for pretraining. Shards are balanced
over the union. Audio listed twice (the same file reached through two sources) is kept once.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .fsutil import atomic_write_text
from .labels import format_dictionary, letter_counts
from .manifest import read_lines, read_manifest, write_lines, write_manifest
from .shards import write_shards

SAMPLE_RATE = 16_000
SPLITS = ("train", "valid")


@dataclass
class MergeOptions:
    sources: list[Path]
    out: Path
    num_shards: int = 0
    pack: bool = False
    workers: int = max(1, os.cpu_count() or 1)


def _check_sources(opts: MergeOptions) -> list[Path]:
    sources = [s.resolve() for s in opts.sources]
    out = opts.out.resolve()
    if len(sources) < 1:
        raise ValueError("merge needs at least one prepared directory")
    dupes = [s for s, n in Counter(sources).items() if n > 1]
    if dupes:
        raise ValueError(f"{dupes[0]} is given more than once")
    for s in sources:
        if not (s / "train.tsv").is_file():
            raise FileNotFoundError(f"{s} has no train.tsv: pass directories written by `python -m data_prep`")
        if s == out:
            raise ValueError(f"--out {out} is one of the sources; merge into a new directory")
    return sources


def merge(opts: MergeOptions) -> dict:
    sources = _check_sources(opts)
    out = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"sources": [str(s) for s in sources], "splits": {}, "duplicates": 0}
    report = ["split\tpath\tproblem\tdetail"]
    for split in SPLITS:
        parts = [(s, read_manifest(s / f"{split}.tsv")) for s in sources if (s / f"{split}.tsv").is_file()]
        if not parts:
            (out / f"{split}.tsv").unlink(missing_ok=True)
            continue
        common = os.path.commonpath([os.path.abspath(m.root) for _, m in parts])
        labelled = all((s / f"{split}.wrd").is_file() and (s / f"{split}.ltr").is_file() for s, _ in parts)
        rows, wrd, ltr, seen = [], [], [], set()
        per_source = {}
        for s, m in parts:
            labels = {ext: read_lines(s / f"{split}.{ext}") for ext in ("wrd", "ltr")} if labelled else None
            if labels and any(len(v) != len(m) for v in labels.values()):
                raise ValueError(f"{s}: {split}.wrd/.ltr do not have one line per {split}.tsv entry; prepare it again")
            kept, kept_samples = 0, 0
            for i in range(len(m)):
                full = os.path.normpath(os.path.join(os.path.abspath(m.root), m.paths[i]))
                if full in seen:
                    report.append(f"{split}\t{full}\tduplicate_audio\talso listed by an earlier source; kept once")
                    summary["duplicates"] += 1
                    continue
                seen.add(full)
                rel = os.path.relpath(full, common)
                rows.append((full if rel.startswith("..") else rel, int(m.sizes[i])))
                if labels:
                    wrd.append(labels["wrd"][i])
                    ltr.append(labels["ltr"][i])
                kept += 1
                kept_samples += int(m.sizes[i])
            per_source[str(s)] = {"utterances": kept, "hours": round(kept_samples / SAMPLE_RATE / 3600, 4)}
        write_manifest(out / f"{split}.tsv", common, rows)
        for ext, lines in (("wrd", wrd), ("ltr", ltr)):
            if labelled:
                write_lines(out / f"{split}.{ext}", lines)
            else:
                (out / f"{split}.{ext}").unlink(missing_ok=True)  # no labels from an earlier merge
        if split == "train" and labelled:
            atomic_write_text(out / "dict.ltr.txt", format_dictionary(letter_counts(ltr)))
        summary["splits"][split] = {
            "utterances": len(rows),
            "hours": round(sum(n for _, n in rows) / SAMPLE_RATE / 3600, 4),
            "labelled": labelled,
            "sources": per_source,
        }
    for s in sources:  # every source's own defects, under its name
        if (s / "report.tsv").is_file():
            report += [f"{s.name}:{line}" for line in read_lines(s / "report.tsv")[1:] if line]
    num_shards = opts.num_shards or (1 if opts.pack else 0)
    train_n = summary["splits"].get("train", {}).get("utterances", 0)
    if num_shards and train_n:
        write_shards(out, "train", min(num_shards, train_n), opts.pack, opts.workers)
    summary.update(num_shards=num_shards, packed=opts.pack)
    write_lines(out / "report.tsv", report)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
