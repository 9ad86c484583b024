"""`python -m finetune.ngram TEXT... --order N --out LM.arpa`: a word n-gram model in ARPA format.

For a quick language model from transcripts (e.g. a corpus's `.wrd` files) where KenLM's `lmplz`
is not at hand. Interpolated absolute discounting: p(w|h) = max(c(hw) - D, 0) / c(h) + g(h) p(w|h'),
g(h) = D N1+(h .) / c(h), which is exactly ARPA's backoff form with back-off weight g(h).
For LibriSpeech-scale results use the official 4-gram (`4-gram.arpa.gz` from openslr.org/11).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from pathlib import Path

from data_prep.fsutil import atomic_write_text

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def count_ngrams(sentences: list[list[str]], order: int) -> list[Counter]:
    counts = [Counter() for _ in range(order)]
    for words in sentences:
        padded = [BOS] + words + [EOS]
        for n in range(1, order + 1):
            first = 1 if n == 1 else 0  # <s> is a context, never a predicted word
            for i in range(first, len(padded) - n + 1):
                counts[n - 1][tuple(padded[i : i + n])] += 1
    return counts


def build_arpa(sentences: list[list[str]], order: int = 3, discount: float = 0.7) -> str:
    if order < 1:
        raise ValueError("order must be at least 1")
    counts = count_ngrams(sentences, order)
    total = sum(counts[0].values())
    vocab = sorted(w for (w,) in counts[0])
    # unigrams: maximum likelihood with one extra count for <unk>
    probs: list[dict[tuple, float]] = [{}]
    uni_total = total + 1.0
    for w in vocab:
        probs[0][(w,)] = counts[0][(w,)] / uni_total
    probs[0][(UNK,)] = 1.0 / uni_total
    probs[0][(BOS,)] = 0.0
    backoff: list[dict[tuple, float]] = [dict() for _ in range(order)]
    for n in range(2, order + 1):
        table = counts[n - 1]
        hist_count: Counter = Counter()
        hist_types: Counter = Counter()
        for gram, c in table.items():
            hist_count[gram[:-1]] += c
            hist_types[gram[:-1]] += 1
        level: dict[tuple, float] = {}
        for gram, c in table.items():
            h = gram[:-1]
            gamma = discount * hist_types[h] / hist_count[h]
            level[gram] = (c - discount) / hist_count[h] + gamma * _lower(probs, backoff, gram[1:])
        for h in hist_count:
            backoff[n - 2][h] = discount * hist_types[h] / hist_count[h]
        probs.append(level)
    lines = ["\\data\\"] + [f"ngram {n}={len(probs[n - 1])}" for n in range(1, order + 1)] + [""]
    for n in range(1, order + 1):
        lines.append(f"\\{n}-grams:")
        for gram in sorted(probs[n - 1]):
            p = probs[n - 1][gram]
            logp = -99.0 if p <= 0 else math.log10(p)
            row = f"{logp:.6f}\t{' '.join(gram)}"
            if n < order and gram in backoff[n - 1]:
                row += f"\t{math.log10(backoff[n - 1][gram]):.6f}"
            elif n < order:
                row += "\t0.000000"
            lines.append(row)
        lines.append("")
    lines.append("\\end\\")
    return "\n".join(lines) + "\n"


def _lower(probs, backoff, gram: tuple) -> float:
    """p(w | shorter history) from the already built lower orders, backing off as ARPA does."""
    if gram in probs[len(gram) - 1]:
        return probs[len(gram) - 1][gram]
    if len(gram) == 1:
        return probs[0][(UNK,)]
    return backoff[len(gram) - 2].get(gram[:-1], 1.0) * _lower(probs, backoff, gram[1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.ngram", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", nargs="+", type=Path, help="text files, one sentence per line (e.g. train.wrd)")
    p.add_argument("--order", type=int, default=3)
    p.add_argument("--discount", type=float, default=0.7)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    sentences = []
    for path in args.text:
        if not path.exists():
            print(f"error: {path} not found", file=sys.stderr)
            return 2
        sentences += [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not sentences:
        print("error: no sentences in the given files", file=sys.stderr)
        return 2
    atomic_write_text(args.out, build_arpa(sentences, args.order, args.discount))
    print(f"wrote a {args.order}-gram model of {len(sentences)} sentences to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
