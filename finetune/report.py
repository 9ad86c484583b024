"""`python -m finetune.report RUN [--out DIR]`: the run report of `pretrain.report` for a CTC
fine-tuning run: loss, valid WER / CER with the best step, optimisation and speed plots, health
verdicts (divergence, stalled learning, WER / CER not improving), as report.md and report.html."""

from __future__ import annotations

import sys

from pretrain.report import main as _main


def main(argv: list[str] | None = None) -> int:
    return _main(argv, prog="python -m finetune.report")


if __name__ == "__main__":
    sys.exit(main())
