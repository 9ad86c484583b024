"""`python -m finetune`: CTC fine-tuning of a pretrained wav2vec 2.0 / data2vec / data2vec 2.0 model on letter labels."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pretrain.config import apply_overrides, dumps
from pretrain.training import checkpoint as ckpt

from .config import ARCHITECTURE_FIELDS, FinetuneConfig
from .presets import PRESETS, get_preset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finetune", description=__doc__)
    p.add_argument("--preset", default="ctc_10h", help=f"one of {', '.join(sorted(PRESETS))}")
    p.add_argument("--init-from", default=None,
                   help="a pretraining run or checkpoint of ours or its `--format safetensors` export, a transformers "
                        "model directory, or a fairseq checkpoint file (pretrained or CTC fine-tuned)")
    p.add_argument("--data", type=Path, help="directory written by `python -m data_prep` (with dict.ltr.txt)")
    p.add_argument("--out", type=Path, help="run directory (resumed if it holds a checkpoint)")
    p.add_argument("--train-split", default=None, help="manifest to train on (default: the preset's)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set ctc.freeze_finetune_updates=0 (repeatable)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--describe", action="store_true", help="print the resolved config, then exit")
    return p


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def resolve_config(args) -> tuple[FinetuneConfig, object]:
    """The preset, the pretrained architecture, the user's overrides; and the pretrained weights
    (None when resuming, where the checkpoint holds every weight)."""
    from .dictionary import Dictionary
    from .source import load_pretrained

    cfg = get_preset(args.preset)
    pretrained = None
    resume = args.out is not None and ckpt.latest(args.out) is not None
    if resume:
        config_path = args.out / "config.json"  # small, unlike the checkpoint
        saved = FinetuneConfig.from_dict(json.loads(config_path.read_text()) if config_path.exists()
                                         else ckpt.load(ckpt.latest(args.out))["config"])
        arch, normalize = saved.model, saved.data.normalize
        cfg.ctc.init_from = saved.ctc.init_from
    elif args.init_from is None:
        raise ValueError("--init-from is required (a pretraining run, checkpoint, export or transformers directory)")
    else:
        pretrained = load_pretrained(args.init_from)
        arch, normalize = pretrained.model, pretrained.normalize
        cfg.ctc.init_from = pretrained.where
    for name in ARCHITECTURE_FIELDS:
        setattr(cfg.model, name, getattr(arch, name))
    cfg.data.normalize = normalize
    apply_overrides(cfg, args.overrides)
    if cfg.data.normalize != normalize:
        print(f"WARNING: the pretrained model saw normalize={normalize} audio but data.normalize is "
              f"{cfg.data.normalize}; fine-tuning results will suffer", file=sys.stderr)
    if args.train_split:
        cfg.train.train_split = args.train_split
    if args.max_steps is not None:
        cfg.train.max_steps = args.max_steps
    if args.seed is not None:
        cfg.train.seed = args.seed
    if args.data is not None:
        cfg.ctc.symbols = Dictionary.load(args.data / f"dict.{cfg.ctc.labels}.txt").symbols
    return cfg, pretrained


def check_data(cfg: FinetuneConfig, data: Path) -> None:
    t, ext = cfg.train, cfg.ctc.labels
    for name in (f"{t.train_split}.tsv", f"{t.train_split}.{ext}"):
        if not (data / name).exists():
            raise FileNotFoundError(
                f"{data / name} not found; prepare labelled data with `python -m data_prep librispeech` "
                "(with --finetuning-root for the train-10m/1h/10h splits) or pick another --train-split"
            )
    if not (data / f"{t.valid_split}.{ext}").exists():
        print(f"WARNING: no {t.valid_split}.{ext} in {data}: no validation WER, the last checkpoint is the best",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, pretrained = resolve_config(args)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as err:
        return _fail(str(err))
    if args.describe:
        print(dumps(cfg), end="")
        return 0
    if args.data is None or args.out is None:
        return _fail("--data and --out are required (or use --describe)")
    try:
        check_data(cfg, args.data)
    except FileNotFoundError as err:
        return _fail(str(err))

    from pretrain.training.runner import run

    from .dictionary import Dictionary
    from .task import CTCTask

    dictionary = Dictionary(cfg.ctc.symbols)

    def init(task: CTCTask) -> None:
        missing, unexpected = task.model.w2v.load_state_dict(pretrained.weights, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{pretrained.where} does not fit a {cfg.model.arch} encoder of this shape: "
                f"missing {missing[:4]}, unexpected {unexpected[:4]}"
            )

    return run(cfg, args.data, args.out, args.device, lambda: CTCTask(cfg, dictionary),
               init if pretrained is not None else None, labels=cfg.ctc.labels)


if __name__ == "__main__":
    sys.exit(main())
