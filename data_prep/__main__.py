"""Command line: `python -m data_prep {toy,librispeech} ...`."""

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    if args.command == "toy":
        from .toy import make_toy_corpus

        summary = make_toy_corpus(args.out, args.utterances, args.seed)
        print(json.dumps(summary, indent=2))
        print(f"wrote the synthetic corpus to {args.out} in {time.perf_counter() - start:.1f} s")
        return 0

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


if __name__ == "__main__":
    sys.exit(main())
