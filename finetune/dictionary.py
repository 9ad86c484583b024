"""The CTC output vocabulary with fairseq's indices: `<s>`=0 (the CTC blank), `<pad>`, `</s>`, `<unk>`,
then the symbols of `dict.ltr.txt` in file order."""

from __future__ import annotations

from pathlib import Path

from data_prep.labels import WORD_BOUNDARY, letters_to_words, to_letters

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
BLANK, PAD, EOS, UNK = 0, 1, 2, 3


class Dictionary:
    def __init__(self, symbols: list[str]) -> None:
        if list(symbols[:4]) != list(SPECIALS):
            raise ValueError(f"a CTC vocabulary starts with {SPECIALS}, got {symbols[:4]}")
        self.symbols = list(symbols)
        self.index = {s: i for i, s in enumerate(self.symbols)}
        if len(self.index) != len(self.symbols):
            raise ValueError("the vocabulary lists a symbol twice")

    @classmethod
    def load(cls, path: str | Path) -> "Dictionary":
        """fairseq `Dictionary.load`: one `SYMBOL COUNT` per line."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: the label dictionary is written by `python -m data_prep`")
        symbols = list(SPECIALS)
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(f"{path}:{n}: expected `SYMBOL COUNT`, got {line!r}")
            symbols.append(parts[0])
        if WORD_BOUNDARY not in symbols:
            raise ValueError(f"{path} has no word boundary symbol {WORD_BOUNDARY!r}")
        return cls(symbols)

    def __len__(self) -> int:
        return len(self.symbols)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dictionary) and other.symbols == self.symbols

    def encode(self, letters: str) -> list[int]:
        """A `.ltr` line -> indices (no end-of-sentence; unknown symbols -> `<unk>`)."""
        return [self.index.get(s, UNK) for s in letters.split()]

    def encode_words(self, words: str) -> list[int]:
        return self.encode(to_letters(words))

    def decode(self, ids) -> str:
        """Indices of symbols (blanks and repeats already removed) -> words."""
        letters = " ".join(self.symbols[i] for i in ids if i > UNK)
        return letters_to_words(letters)


def ctc_collapse(frame_ids, blank: int = BLANK) -> list[int]:
    """Merge repeated frame labels, then drop blanks (CTC's many-to-one map)."""
    out: list[int] = []
    prev = None
    for i in frame_ids:
        i = int(i)
        if i != prev and i != blank:
            out.append(i)
        prev = i
    return out
