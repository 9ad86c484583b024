"""Transcript normalisation and fairseq's letter-label formats (`.wrd`, `.ltr`, `dict.ltr.txt`)."""

from __future__ import annotations

from collections import Counter
from typing import Iterable

#: LibriSpeech transcripts use upper-case letters, the apostrophe and single spaces.
ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ'")
WORD_BOUNDARY = "|"


def normalize_transcript(text: str) -> str:
    """Collapse whitespace; keep case (LibriSpeech is already upper case)."""
    return " ".join(text.split())


def bad_characters(text: str) -> list[str]:
    """Characters of `text` (spaces aside) that are outside the LibriSpeech alphabet."""
    return sorted({c for c in text if c != " " and c not in ALPHABET})


def to_letters(words: str) -> str:
    """`HELLO WORLD` -> `H E L L O | W O R L D |` (fairseq `libri_labels.py`)."""
    return " ".join(list(words.replace(" ", WORD_BOUNDARY).strip())) + " " + WORD_BOUNDARY


def letters_to_words(letters: str) -> str:
    """Inverse of `to_letters`."""
    return " ".join("".join(letters.split()).split(WORD_BOUNDARY)).strip()


def letter_counts(ltr_lines: Iterable[str]) -> Counter:
    counts: Counter = Counter()
    for line in ltr_lines:
        counts.update(line.split())
    return counts


def format_dictionary(counts: Counter) -> str:
    """`SYMBOL COUNT` lines, most frequent first; ties by symbol so the file is reproducible."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return "".join(f"{sym} {n}\n" for sym, n in items)
