"""CTC vocabulary, label encoding/decoding, collapse, error rates and the n-gram LM writer."""

from __future__ import annotations

import math
import random

import pytest

from data_prep.labels import letters_to_words
from data_prep.manifest import read_lines
from finetune.dictionary import BLANK, Dictionary, ctc_collapse
from finetune.ngram import build_arpa
from finetune.wer import error_counts


def test_dictionary_follows_fairseq_indices(prepared):
    d = Dictionary.load(prepared / "dict.ltr.txt")
    assert d.symbols[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    file_symbols = [line.split()[0] for line in read_lines(prepared / "dict.ltr.txt")]
    assert d.symbols[4:] == file_symbols
    assert d.encode("A |") == [d.index["A"], d.index["|"]]
    assert d.encode("# |")[0] == 3  # unknown symbol -> <unk>


def test_label_round_trip_on_every_transcript(prepared):
    d = Dictionary.load(prepared / "dict.ltr.txt")
    words = read_lines(prepared / "train.wrd")
    letters = read_lines(prepared / "train.ltr")
    for w, ltr in zip(words, letters):
        ids = d.encode(ltr)
        assert 3 not in ids and BLANK not in ids
        assert d.encode_words(w) == ids
        assert d.decode(ids) == w == letters_to_words(ltr)


def test_collapse_merges_repeats_and_drops_blanks():
    # H H _ E L L _ L O O _  ->  H E L L O: a blank separates the double L
    h, e, ll, o = 5, 6, 7, 8
    assert ctc_collapse([h, h, BLANK, e, ll, ll, BLANK, ll, o, o, BLANK]) == [h, e, ll, ll, o]
    assert ctc_collapse([ll, ll, ll]) == [ll]
    assert ctc_collapse([BLANK, BLANK]) == []


def test_dictionary_rejects_bad_files(tmp_path):
    bad = tmp_path / "dict.ltr.txt"
    bad.write_text("| 10\nE five\n")
    with pytest.raises(ValueError, match=r"dict.ltr.txt:2"):
        Dictionary.load(bad)
    bad.write_text("E 10\n")
    with pytest.raises(ValueError, match="word boundary"):
        Dictionary.load(bad)
    with pytest.raises(FileNotFoundError, match="data_prep"):
        Dictionary.load(tmp_path / "missing.txt")


def test_error_rates_match_jiwer():
    jiwer = pytest.importorskip("jiwer")
    rng = random.Random(0)
    vocab = ["THE", "CAT", "SAT", "ON", "A", "MAT", "DOG", "RAN"]
    refs = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 9))) for _ in range(50)]
    hyps = []
    for r in refs:
        words = r.split()
        for _ in range(rng.randint(0, 3)):
            op = rng.choice("sid")
            i = rng.randrange(len(words) + 1)
            if op == "i" or not words:
                words.insert(i, rng.choice(vocab))
            elif op == "d":
                words.pop(min(i, len(words) - 1))
            else:
                words[min(i, len(words) - 1)] = rng.choice(vocab)
        hyps.append(" ".join(words))
    counts = error_counts(refs, hyps)
    assert counts.wer == pytest.approx(100 * jiwer.wer(refs, hyps), abs=1e-9)
    assert counts.cer == pytest.approx(100 * jiwer.cer(refs, hyps), abs=1e-9)
    assert counts.word_errors > 0


def _arpa_prob(arpa: str, order: int):
    """p(w | h) from an ARPA text, backing off as KenLM does."""
    tables = [dict() for _ in range(order)]
    section = 0
    for line in arpa.splitlines():
        if line.endswith("-grams:"):
            section = int(line[1])
        elif section and line and not line.startswith("\\"):
            parts = line.split("\t")
            tables[section - 1][tuple(parts[1].split())] = (float(parts[0]), float(parts[2]) if len(parts) > 2 else 0.0)

    def prob(w, h):
        gram = tuple(h) + (w,)
        if gram in tables[len(gram) - 1]:
            return 10 ** tables[len(gram) - 1][gram][0]
        if not h:
            return 10 ** tables[0][("<unk>",)][0]
        bow = tables[len(h) - 1].get(tuple(h), (0.0, 0.0))[1]
        return 10**bow * prob(w, h[1:])

    return prob, sorted(w for (w,) in tables[0] if w != "<s>")


def test_ngram_model_is_normalised():
    sentences = [s.split() for s in ["A B C", "A B D", "B C A", "C C", "A", "D A B C"]]
    arpa = build_arpa(sentences, order=3)
    prob, vocab = _arpa_prob(arpa, 3)
    for h in [(), ("A",), ("<s>",), ("A", "B"), ("<s>", "A"), ("C", "C"), ("D", "D")]:
        assert math.isclose(sum(prob(w, list(h)) for w in vocab), 1.0, rel_tol=1e-4), h
    assert prob("C", ["A", "B"]) > prob("D", ["A", "B"]) > prob("A", ["A", "B"])
