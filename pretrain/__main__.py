"""`python -m pretrain`: self-supervised pretraining (wav2vec 2.0, data2vec) from a prepared data directory."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from .config import apply_overrides, dumps
from .presets import PRESETS, get_preset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__)
    p.add_argument("--preset", default="wav2vec2_base", help=f"one of {', '.join(sorted(PRESETS))}")
    p.add_argument("--data", type=Path, help="directory written by `python -m data_prep`")
    p.add_argument("--out", type=Path, help="run directory (resumed if it holds a checkpoint)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer updates (train.max_steps)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--init-from", type=Path, default=None, help="start from a transformers model directory")
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
    hf_weights = None
    if args.init_from is not None:
        from .build import apply_hf_architecture, read_hf_dir

        try:
            hf, hf_weights = read_hf_dir(args.init_from)
            apply_hf_architecture(cfg, hf)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    from .build import build_task

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
    return run(cfg, args.data, args.out, args.device, hf_weights, args.init_from)


def run(cfg, data: Path, out: Path, device_name: str | None, hf_weights=None, hf_dir=None) -> int:
    from . import distributed
    from .build import build_task, load_hf_weights
    from .metrics import MetricLogger
    from .trainer import Trainer, TrainingError, seed_all, write_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = distributed.init(device.type)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)
    try:
        seed_all(cfg.train.seed)  # the same initial weights on every rank and every run
        task = build_task(cfg.model)
        trainer = Trainer(cfg, task, out, data, device, info)
        resumed = trainer.resume_if_possible()
        if not resumed and hf_weights is not None:
            load_hf_weights(task, hf_weights, hf_dir)
        if info.is_main:
            write_config(out, cfg)
        logger = MetricLogger(out, trainer.step, enabled=info.is_main)
        final = trainer.fit(logger)
        trainer.save()
        logger.close()
    except (TrainingError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    if info.is_main:
        print(json.dumps({"step": trainer.step, "run_dir": str(out), **{k: round(v, 4) for k, v in final.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
