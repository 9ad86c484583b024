"""Command line: `python -m data_prep {toy,librispeech,audio,librilight,merge} ...`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _parse_part(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--part expects I/N such as 3/16, got {text!r}") from None
    if count < 1:
        raise ValueError(f"--part {text}: N must be at least 1")
    return index, count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    toy = sub.add_parser("toy", help="write the synthetic LibriSpeech-shaped corpus (no download)")
    toy.add_argument("out", type=Path)
    toy.add_argument("--utterances", type=int, default=500, help="total utterances over all splits")
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--librilight-utterances", type=int, default=160,
                     help="utterances in the unlabelled librilight/{small,medium} tree (0: skip it)")

    ls = sub.add_parser("librispeech", help="manifests, labels, dictionary and shards from LibriSpeech")
    ls.add_argument("root", type=Path, help="the LibriSpeech directory (or the directory holding it)")
    ls.add_argument("out", type=Path, help="where manifests and labels are written")
    ls.add_argument("--workers", type=_positive, default=None, help="parallel processes (default: all cores)")
    ls.add_argument("--num-shards", type=_positive, default=0, help="duration-balanced shards of train")
    ls.add_argument("--pack", action="store_true", help="also pack each shard's audio into one int16 file")
    ls.add_argument("--finetuning-root", type=Path, default=None, help="Libri-Light librispeech_finetuning")
    ls.add_argument("--no-decode", action="store_true", help="read headers only (faster, misses truncation)")
    ls.add_argument("--valid-split", default="dev-clean", help="split copied to valid.* (default dev-clean)")
    ls.add_argument("--valid-percent", type=float, default=0.0, help="hold out this fraction of train as valid instead")
    ls.add_argument("--seed", type=int, default=0, help="seed of the --valid-percent hold-out")
    ls.add_argument("--part", default=None, metavar="I/N",
                    help="job-array task I of N: decode every N-th chapter into a partial cache, write no manifests; "
                         "a run without --part then merges (see `python -m slurm prep --array N`)")
    part_help = ("job-array task I of N: do every N-th unit of work into a cache, write no manifests; "
                 "a run without --part then merges (see `python -m slurm prep --array N`)")
    audio = sub.add_parser("audio", help="pretraining manifests for any folder of audio files (no transcripts)")
    audio.add_argument("root", type=Path, help="the folder; every file below it with one of --ext is used")
    audio.add_argument("out", type=Path, help="where manifests are written (outside the folder)")
    audio.add_argument("--ext", default="flac,wav", help="comma-separated extensions (default flac,wav)")
    librilight = sub.add_parser("librilight", help="Libri-Light's unlabelled subsets cut into segments by their VAD")
    librilight.add_argument("root", type=Path, help="the directory holding small/ medium/ large/ (duplicate/)")
    librilight.add_argument("out", type=Path, help="where segments and manifests are written")
    librilight.add_argument("--subsets", default=None, help="comma-separated (default: every subset present)")
    librilight.add_argument("--segment-seconds", type=float, default=20.0,
                            help="target segment length (default 20 s: the large presets' crop, 320k samples)")
    for p in (audio, librilight):
        p.add_argument("--valid-percent", type=float, default=0.01, help="held-out fraction (default 0.01, as fairseq)")
        p.add_argument("--seed", type=int, default=42, help="seed of the hold-out (default 42, as fairseq)")
        p.add_argument("--workers", type=_positive, default=None, help="parallel processes (default: all cores)")
        p.add_argument("--num-shards", type=_positive, default=0, help="duration-balanced shards of train")
        p.add_argument("--pack", action="store_true", help="also pack each shard's audio into one int16 file")
        p.add_argument("--part", default=None, metavar="I/N", help=part_help)
    merge = sub.add_parser("merge", help="one pretraining directory from several prepared ones")
    merge.add_argument("sources", type=Path, nargs="+", help="directories written by librispeech, audio or librilight")
    merge.add_argument("--out", type=Path, required=True)
    merge.add_argument("--num-shards", type=_positive, default=0, help="duration-balanced shards over the union")
    merge.add_argument("--pack", action="store_true")
    merge.add_argument("--workers", type=_positive, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    if args.command == "toy":
        from .toy import make_toy_corpus

        summary = make_toy_corpus(args.out, args.utterances, args.seed, args.librilight_utterances)
        print(json.dumps(summary, indent=2))
        print(f"wrote the synthetic corpus to {args.out} in {time.perf_counter() - start:.1f} s")
        return 0

    if args.command in ("audio", "librilight", "merge"):
        try:
            return _unlabelled(args, start)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    from .librispeech import PrepOptions, prepare, summary_line

    if not 0.0 <= args.valid_percent < 1.0:
        print(f"error: --valid-percent must be in [0, 1), got {args.valid_percent}", file=sys.stderr)
        return 2
    opts = PrepOptions(
        root=args.root,
        out=args.out,
        workers=args.workers or max(1, os.cpu_count() or 1),
        num_shards=args.num_shards,
        pack=args.pack,
        finetuning_root=args.finetuning_root,
        decode=not args.no_decode,
        valid_split=args.valid_split,
        valid_percent=args.valid_percent,
    )
    try:
        if args.part:
            from .librispeech import prepare_part

            index, count = _parse_part(args.part)
            result = prepare_part(opts, index, count)
            print(f"part {index}/{count}: scanned {result.usable} usable utterances, {len(result.problems)} problems")
            return 0
        result = prepare(opts)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_line(result, args.out))
    if result.usable == 0:
        print(f"error: no usable audio found under {args.root}", file=sys.stderr)
        return 1
    print(f"wrote manifests to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def _unlabelled(args, start: float) -> int:
    workers = args.workers or max(1, os.cpu_count() or 1)
    if args.command == "merge":
        from .merge import MergeOptions, merge

        summary = merge(MergeOptions(args.sources, args.out, args.num_shards, args.pack, workers))
        for name, split in summary["splits"].items():
            kind = "labelled" if split["labelled"] else "unlabelled"
            print(f"{name}: {split['utterances']} utterances ({split['hours']:.2f} h, {kind}) from "
                  + ", ".join(f"{Path(k).name} {v['utterances']}" for k, v in split["sources"].items()))
        if summary["duplicates"]:
            print(f"{summary['duplicates']} utterances listed by two sources were kept once (see report.tsv)")
        print(f"wrote the merged manifests to {args.out} in {time.perf_counter() - start:.1f} s")
        return 0
    if not 0.0 <= args.valid_percent < 1.0:
        raise ValueError(f"--valid-percent must be in [0, 1), got {args.valid_percent}")
    part = _parse_part(args.part) if args.part else None
    if args.command == "audio":
        from .folder import FolderOptions, folder_summary_line, parse_extensions, prepare_folder, prepare_folder_part

        opts = FolderOptions(args.root, args.out, parse_extensions(args.ext), args.valid_percent, args.seed,
                             workers, args.num_shards, args.pack)
        if part:
            result = prepare_folder_part(opts, *part)
            print(f"part {part[0]}/{part[1]}: scanned {result.usable} usable files, {len(result.problems)} problems")
            return 0
        result = prepare_folder(opts)
        print(folder_summary_line(result, args.out))
        usable = result.usable
    else:
        from .librilight import LibriLightOptions, prepare_librilight, prepare_librilight_part, summary_lines

        subsets = tuple(s.strip() for s in args.subsets.split(",") if s.strip()) if args.subsets else None
        opts = LibriLightOptions(args.root, args.out, subsets, args.segment_seconds, args.valid_percent, args.seed,
                                 workers, args.num_shards, args.pack)
        if part:
            result = prepare_librilight_part(opts, *part)
            print(f"part {part[0]}/{part[1]}: {len(result.books)} books, {len(result.segments)} segments, "
                  f"{len(result.problems)} problems")
            return 0
        result = prepare_librilight(opts)
        print("\n".join(summary_lines(result, args.out)))
        usable = len(result.segments)
    if usable == 0:
        print(f"error: no usable audio found under {args.root}", file=sys.stderr)
        return 1
    print(f"wrote manifests to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
