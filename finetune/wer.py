"""Word and character error rates, summed over a corpus (edits / reference length), as fairseq and
jiwer report them."""

from __future__ import annotations

from dataclasses import dataclass

import editdistance


@dataclass
class ErrorCounts:
    word_errors: int = 0
    words: int = 0
    char_errors: int = 0
    chars: int = 0

    def add(self, reference: str, hypothesis: str) -> None:
        ref_w, hyp_w = reference.split(), hypothesis.split()
        self.word_errors += editdistance.eval(ref_w, hyp_w)
        self.words += len(ref_w)
        # characters of the space-normalised strings, spaces included (jiwer's CER)
        ref_c, hyp_c = " ".join(ref_w), " ".join(hyp_w)
        self.char_errors += editdistance.eval(ref_c, hyp_c)
        self.chars += len(ref_c)

    @property
    def wer(self) -> float:
        return 100.0 * self.word_errors / max(self.words, 1)

    @property
    def cer(self) -> float:
        return 100.0 * self.char_errors / max(self.chars, 1)


def error_counts(references: list[str], hypotheses: list[str]) -> ErrorCounts:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    counts = ErrorCounts()
    for r, h in zip(references, hypotheses):
        counts.add(r, h)
    return counts
