"""`python -m pretrain`: self-supervised pretraining (wav2vec 2.0, data2vec) from a prepared data directory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pretrain.config import apply_overrides, dumps
from pretrain.presets import PRESETS, get_preset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__)
    p.add_argument("--preset", default="wav2vec2_base", help=f"one of {', '.join(sorted(PRESETS))}")
    p.add_argument("--data", type=Path, help="directory written by `python -m data_prep`")
    p.add_argument("--out", type=Path, help="run directory (resumed if it holds a checkpoint)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer updates (train.max_steps)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from a transformers model directory, a fairseq checkpoint file (.pt) "
                        "or a `--format safetensors` export")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--describe", action="store_true", help="print the resolved config and parameter count, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = apply_overrides(get_preset(args.preset), args.overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.max_steps is not None:
        cfg.train.max_steps = args.max_steps
    if args.seed is not None:
        cfg.train.seed = args.seed
    init = None
    if args.init_from is not None:
        from pretrain.build import init_source

        try:
            init = init_source(cfg, args.init_from)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    from pretrain.build import build_task

    if args.describe:
        with torch.device("meta"):
            task = build_task(cfg.model)
        info = {"config": json.loads(dumps(cfg)), "num_parameters": sum(p.numel() for p in task.model.parameters())}
        print(json.dumps(info, indent=2))
        return 0
    if args.data is None or args.out is None:
        print("error: --data and --out are required (or use --describe)", file=sys.stderr)
        return 2
    if not (args.data / f"{cfg.train.train_split}.tsv").exists():
        print(f"error: {args.data / (cfg.train.train_split + '.tsv')} not found; prepare data with `python -m data_prep`",
              file=sys.stderr)
        return 2
    from pretrain.training.runner import run

    return run(cfg, args.data, args.out, args.device, lambda: build_task(cfg.model), init)


if __name__ == "__main__":
    sys.exit(main())
