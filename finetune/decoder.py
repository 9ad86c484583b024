"""Turning CTC emissions into words: best path, or beam search with a KenLM word n-gram model.

The beam search is flashlight's lexicon decoder (the `flashlight-text` package, the engine behind
fairseq's `kenlm` decoder and torchaudio's `ctc_decoder`): words are restricted to a lexicon,
spelled as letters followed by the word boundary `|`, and scored by the language model.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from data_prep.labels import WORD_BOUNDARY

from .dictionary import BLANK, Dictionary, ctc_collapse


class GreedyDecoder:
    def __init__(self, dictionary: Dictionary) -> None:
        self.dictionary = dictionary

    def __call__(self, emissions: torch.Tensor) -> str:
        """emissions: (T, V) logits or log-probabilities of one utterance."""
        return self.dictionary.decode(ctc_collapse(emissions.argmax(-1).tolist()))


@dataclass
class BeamOptions:
    beam: int = 50
    beam_threshold: float = 25.0
    lm_weight: float = 2.0
    word_score: float = -1.0
    unk_score: float = -math.inf
    sil_score: float = 0.0


def arpa_unigrams(path: Path) -> list[str]:
    """The words of an ARPA file's 1-gram section."""
    words, in_unigrams = [], False
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if line == "\\1-grams:":
                in_unigrams = True
            elif line.startswith("\\") and in_unigrams:
                break
            elif in_unigrams and line:
                parts = line.split("\t") if "\t" in line else line.split()
                if len(parts) >= 2:
                    words.append(parts[1])
    return [w for w in words if w not in ("<s>", "</s>", "<unk>")]


def read_lexicon(path: Path) -> list[str]:
    """Words of a lexicon file (fairseq format: `WORD W O R D |`, first column)."""
    return [line.split()[0] for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


class KenLMDecoder:
    def __init__(self, dictionary: Dictionary, lm_path: str | Path, lexicon: str | Path | None = None,
                 options: BeamOptions | None = None) -> None:
        try:
            from flashlight.lib.text import decoder as fl
            from flashlight.lib.text.dictionary import Dictionary as FlDictionary

            try:
                from flashlight.lib.text.decoder.kenlm import KenLM
            except ImportError:  # flashlight-text before 0.0.5
                KenLM = fl.KenLM
        except ImportError as err:
            raise RuntimeError("beam search needs the flashlight-text package: pip install flashlight-text") from err
        lm_path = Path(lm_path)
        if not lm_path.exists():
            raise FileNotFoundError(f"language model {lm_path} not found")
        if lexicon is not None:
            words = read_lexicon(Path(lexicon))
        elif lm_path.suffix.lower() == ".arpa":
            words = arpa_unigrams(lm_path)
        else:
            raise ValueError(f"{lm_path} is a binary LM: pass --lexicon (one `WORD W O R D |` line per word)")
        o = options or BeamOptions()
        self.dictionary = dictionary
        self.word_dict = FlDictionary()
        for w in ("<unk>", *words):
            if not self.word_dict.contains(w):
                self.word_dict.add_entry(w)
        self.lm = KenLM(str(lm_path), self.word_dict)
        sil = dictionary.index[WORD_BOUNDARY]
        trie = fl.Trie(len(dictionary), sil)
        start = self.lm.start(False)
        skipped = 0
        for w in words:
            spelling = [dictionary.index.get(c) for c in w] + [sil]
            if None in spelling:  # a word with letters the acoustic model cannot emit
                skipped += 1
                continue
            _, score = self.lm.score(start, self.word_dict.get_index(w))
            trie.insert(spelling, self.word_dict.get_index(w), score)
        if skipped == len(words):
            raise ValueError(f"no word of the lexicon can be spelled with the model's {len(dictionary)} symbols")
        trie.smear(fl.SmearingMode.MAX)
        opts = fl.LexiconDecoderOptions(
            beam_size=o.beam, beam_size_token=len(dictionary), beam_threshold=o.beam_threshold,
            lm_weight=o.lm_weight, word_score=o.word_score, unk_score=o.unk_score, sil_score=o.sil_score,
            log_add=False, criterion_type=fl.CriterionType.CTC,
        )
        self.decoder = fl.LexiconDecoder(opts, trie, self.lm, sil, BLANK, self.word_dict.get_index("<unk>"), [], False)

    def __call__(self, emissions: torch.Tensor) -> str:
        lprobs = torch.log_softmax(emissions.float(), -1).contiguous().cpu()
        t, v = lprobs.shape
        best = self.decoder.decode(lprobs.data_ptr(), t, v)[0]
        return " ".join(self.word_dict.get_entry(i) for i in best.words if i >= 0)


def add_decoder_args(p: argparse.ArgumentParser) -> None:
    """The decoding options `finetune.evaluate` and `finetune.transcribe` share."""
    p.add_argument("--lm", type=Path, default=None, help="KenLM word n-gram model (.arpa or binary) for beam search")
    p.add_argument("--lexicon", type=Path, default=None, help="words the beam search may output (default: the LM's)")
    p.add_argument("--beam", type=int, default=BeamOptions.beam)
    p.add_argument("--lm-weight", type=float, default=BeamOptions.lm_weight)
    p.add_argument("--word-score", type=float, default=BeamOptions.word_score)


def build_decoder(dictionary: Dictionary, args: argparse.Namespace) -> tuple[object, str, dict]:
    """(decoder, its name, its options for reports) from `add_decoder_args` options."""
    if args.lm is None:
        return GreedyDecoder(dictionary), "greedy", {}
    opts = BeamOptions(beam=args.beam, lm_weight=args.lm_weight, word_score=args.word_score)
    options = {"lm": str(Path(args.lm).resolve()), **vars(opts), "unk_score": str(opts.unk_score)}
    return KenLMDecoder(dictionary, args.lm, args.lexicon, opts), "kenlm", options
