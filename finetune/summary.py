"""`python -m finetune.summary WORK`: what the main job produced, read back from its work directory.

Prints the WER/CER of every evaluation under `WORK/ctc/eval` and where each artefact is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: (what, path under WORK) in pipeline order
ARTEFACTS = [
    ("synthetic corpus (LibriSpeech and Libri-Light layouts, FLAC)", "corpus"),
    ("manifests and labels (LibriSpeech layout)", "manifests"),
    ("Libri-Light segments cut by their VAD", "librilight"),
    ("pretraining manifests (both merged), packed shards", "unlabelled"),
    ("wav2vec 2.0 pretraining run", "wav2vec2"),
    ("  its TensorBoard logs", "wav2vec2/tensorboard"),
    ("CTC fine-tuning run", "ctc"),
    ("  its best checkpoint", "ctc/checkpoints/best.pt"),
    ("  its TensorBoard logs", "ctc/tensorboard"),
    ("  evaluation reports (per-utterance hypotheses)", "ctc/eval"),
    ("word bigram LM (from train.wrd)", "lm.arpa"),
    ("transformers export (Wav2Vec2ForCTC + Wav2Vec2Processor)", "ctc-hf"),
]


def summarize(work: Path) -> str:
    lines = []
    reports = sorted((work / "ctc" / "eval").glob("*.json")) if (work / "ctc" / "eval").exists() else []
    for path in reports:
        report = json.loads(path.read_text())
        lines.append(f"{report['decoder']} decoding of {Path(report['checkpoint']).name}:")
        lines.append(f"  {'split':<14}{'WER %':>8}{'CER %':>8}")
        for split, r in report["splits"].items():
            lines.append(f"  {split:<14}{r['wer']:>8.2f}{r['cer']:>8.2f}")
    if not reports:
        lines.append(f"no evaluation reports under {work / 'ctc' / 'eval'}")
    lines.append("")
    lines.append("artefacts:")
    for what, rel in ARTEFACTS:
        path = work / rel
        if path.exists():
            lines.append(f"  {what:<58} {path.resolve()}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.summary", description=__doc__)
    p.add_argument("work", type=Path)
    args = p.parse_args(argv)
    if not args.work.is_dir():
        print(f"error: {args.work} is not a directory", file=sys.stderr)
        return 2
    print(summarize(args.work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
