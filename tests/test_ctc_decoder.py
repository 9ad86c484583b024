"""Beam search with a KenLM model (flashlight's lexicon decoder) against best-path decoding."""

from __future__ import annotations

import pytest
import torch

from finetune.decoder import BeamOptions, GreedyDecoder, KenLMDecoder, arpa_unigrams
from finetune.dictionary import SPECIALS, Dictionary
from finetune.ngram import build_arpa

pytest.importorskip("flashlight.lib.text.decoder")

SYMBOLS = [*SPECIALS, "|", "A", "C", "T", "R", "O", "G", "D"]


def _emissions(frames: list[dict[str, float]], d: Dictionary) -> torch.Tensor:
    """Log-probabilities with the given mass per frame (rest spread over the other symbols)."""
    out = torch.full((len(frames), len(d)), 1e-4)
    for t, probs in enumerate(frames):
        for s, p in probs.items():
            out[t, d.index[s]] = p
    return torch.log(out / out.sum(-1, keepdim=True))


@pytest.fixture
def lm(tmp_path):
    sentences = [["A", "CAT"], ["A", "DOG"], ["A", "CAT"], ["CAT"], ["DOG"], ["A", "CAT"]]
    path = tmp_path / "lm.arpa"
    path.write_text(build_arpa(sentences, order=2))
    return path


def test_lm_and_lexicon_correct_an_acoustically_ambiguous_word(lm):
    d = Dictionary(SYMBOLS)
    blank = "<s>"
    # "C A R" is slightly more likely per frame than "C A T"; CAR is not a word the LM knows.
    frames = [{"C": 0.9}, {blank: 0.9}, {"A": 0.9}, {blank: 0.9}, {"R": 0.5, "T": 0.45}, {"|": 0.9}]
    e = _emissions(frames, d)
    assert GreedyDecoder(d)(e) == "CAR"
    assert arpa_unigrams(lm) == ["A", "CAT", "DOG"]
    beam = KenLMDecoder(d, lm, options=BeamOptions(beam=20, lm_weight=1.0, word_score=0.0))
    assert beam(e) == "CAT"


def test_beam_search_keeps_a_clear_two_word_transcript(lm):
    d = Dictionary(SYMBOLS)
    frames = [{"A": 0.95}, {"|": 0.95}, {"D": 0.95}, {"O": 0.95}, {"G": 0.95}, {"<s>": 0.95}]
    e = _emissions(frames, d)
    assert GreedyDecoder(d)(e) == "A DOG"
    assert KenLMDecoder(d, lm)(e) == "A DOG"


def test_binary_lm_needs_a_lexicon(tmp_path):
    d = Dictionary(SYMBOLS)
    fake = tmp_path / "lm.bin"
    fake.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="--lexicon"):
        KenLMDecoder(d, fake)
    with pytest.raises(FileNotFoundError):
        KenLMDecoder(d, tmp_path / "absent.arpa")
