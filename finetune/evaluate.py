"""`python -m finetune.evaluate RUN_OR_CKPT --data DIR --splits dev-clean,dev-other,...`: WER/CER per split.

Greedy CTC decoding by default; `--lm LM.arpa|LM.bin` decodes with beam search and a KenLM word
n-gram model (flashlight's lexicon decoder). Prints a table and writes it, with every utterance's
reference and hypothesis, to `RUN/eval/<checkpoint>-<decoder>.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from data_prep.fsutil import atomic_write_text
from data_prep.labels import letters_to_words
from data_prep.manifest import read_lines
from data_prep.sources import ManifestSource

from .decoder import add_decoder_args, build_decoder
from .inference import emissions, load_ctc
from .wer import ErrorCounts

DEFAULT_SPLITS = "dev-clean,dev-other,test-clean,test-other"


def references(data: Path, split: str) -> list[str]:
    if (data / f"{split}.wrd").exists():
        return [" ".join(line.split()) for line in read_lines(data / f"{split}.wrd")]
    if (data / f"{split}.ltr").exists():
        return [letters_to_words(line) for line in read_lines(data / f"{split}.ltr")]
    raise FileNotFoundError(f"no transcripts for {split} in {data} (neither {split}.wrd nor {split}.ltr)")


def evaluate_split(model, cfg, decode, data: Path, split: str, limit: int | None = None, progress: bool = True) -> dict:
    manifest = data / f"{split}.tsv"
    if not manifest.exists():
        available = sorted(p.stem for p in data.glob("*.tsv"))
        raise FileNotFoundError(f"{manifest} not found; splits in {data}: {', '.join(available)}")
    source = ManifestSource(manifest)
    refs = references(data, split)
    if len(refs) != len(source):
        raise ValueError(f"{split}: {len(refs)} transcripts for {len(source)} utterances; re-run data prep")
    n = len(source) if limit is None else min(limit, len(source))
    counts, rows = ErrorCounts(), []
    from tqdm import tqdm

    for i in tqdm(range(n), desc=split, unit="utt", disable=not progress or None, leave=False):
        hyp = decode(emissions(model, source.read(i), cfg.data.normalize))
        counts.add(refs[i], hyp)
        rows.append({"id": source.ids[i], "ref": refs[i], "hyp": hyp})
    return {
        "wer": round(counts.wer, 3), "cer": round(counts.cer, 3),
        "word_errors": counts.word_errors, "words": counts.words,
        "char_errors": counts.char_errors, "chars": counts.chars,
        "utterances": len(rows), "hypotheses": rows,
    }


def run_dir_of(checkpoint: Path) -> Path:
    if checkpoint.is_dir():  # an export directory keeps its own evaluations
        return checkpoint
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def format_table(results: dict[str, dict]) -> str:
    lines = [f"{'split':<16}{'utts':>6}{'WER %':>9}{'CER %':>9}"]
    for split, r in results.items():
        lines.append(f"{split:<16}{r['utterances']:>6}{r['wer']:>9.2f}{r['cer']:>9.2f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finetune.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a fine-tuned run directory (its best checkpoint) or checkpoint file, "
                                      "its `--format safetensors` export, or a fairseq CTC checkpoint (.pt)")
    p.add_argument("--dict", dest="dict_path", default=None,
                   help="a fairseq CTC checkpoint's dict.ltr.txt (default: the one beside it)")
    p.add_argument("--data", type=Path, required=True, help="directory written by `python -m data_prep`")
    p.add_argument("--splits", default=DEFAULT_SPLITS, help=f"comma-separated (default: {DEFAULT_SPLITS})")
    add_decoder_args(p)
    p.add_argument("--max-utterances", type=int, default=None, help="per split (a quick look)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: RUN/eval/<checkpoint>-<decoder>.json)")
    p.add_argument("--device", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    splits = [s for s in args.splits.split(",") if s]
    try:
        cfg, model, dictionary, where = load_ctc(args.checkpoint, device, args.dict_path)
        decode, decoder_name, options = build_decoder(dictionary, args)
        results = {s: evaluate_split(model, cfg, decode, args.data, s, args.max_utterances) for s in splits}
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{where} ({decoder_name} decoding)")
    print(format_table(results))
    out = args.out or run_dir_of(where) / "eval" / f"{where.stem}-{decoder_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": str(where), "decoder": decoder_name, "options": options, "splits": results}
    atomic_write_text(out, json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
