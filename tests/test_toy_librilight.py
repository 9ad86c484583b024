"""The synthetic Libri-Light tree: unlabelled layout, exact voice_activity, deterministic."""

import json
from collections import defaultdict

import numpy as np
import pytest
import soundfile as sf

from data_prep.__main__ import build_parser
from data_prep.toy import make_toy_corpus
from data_prep.toy_librilight import SUBSETS, make_toy_librilight, plan_librilight

N = 30
SR = 16000


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    out = tmp_path_factory.mktemp("ll")
    summary = make_toy_librilight(out, num_utterances=N, seed=0)
    return out / "librilight", summary


def _files(root):
    return sorted(root.rglob("*.flac"))


def _meta(flac):
    return json.loads(flac.with_suffix(".json").read_text())


def _db(x):
    return 10 * np.log10(max(float(np.mean(np.asarray(x, dtype=np.float64) ** 2)), 1e-20))


def test_layout(tree):
    root, _ = tree
    assert sorted(p.name for p in root.iterdir()) == sorted(SUBSETS)
    assert {p.with_suffix("") for p in root.rglob("*.json")} == {p.with_suffix("") for p in _files(root)}
    book_subset = {}
    for f in _files(root):
        subset, spk, book, _ = f.relative_to(root).parts
        assert book.endswith("_librivox_64kb_mp3") and f.stem.endswith("_64kb")
        info = sf.info(f)
        assert (info.samplerate, info.channels, info.format, info.subtype) == (SR, 1, "FLAC", "PCM_16")
        assert info.frames > 10 * SR  # long files, several utterances each
        meta = _meta(f)
        assert meta["speaker"] == spk
        bm = meta["book_meta"]
        assert isinstance(bm["id"], str) and bm["id"].isdigit() and isinstance(bm["title"], str) and bm["title"]
        assert bm["genre"] and all(isinstance(g, str) for g in bm["genre"])
        assert isinstance(meta["snr"], float) and meta["snr"] > 20
        assert book_subset.setdefault(book, subset) == subset  # a book lives in one subset
    assert all((root / s).is_dir() and any((root / s).rglob("*.flac")) for s in SUBSETS)


def test_voice_activity_exact_and_ordered(tree):
    root, summary = tree
    n_chunks = 0
    for f in _files(root):
        duration = sf.info(f).frames / SR
        vad = _meta(f)["voice_activity"]
        assert 6 <= len(vad) <= 12
        n_chunks += len(vad)
        assert vad[0][0] > 0 and vad[-1][1] < duration  # leading and trailing silence
        for (a, b), nxt in zip(vad, vad[1:] + [[duration, duration]]):
            assert isinstance(a, float) and isinstance(b, float)
            assert a < b <= nxt[0] and round(a, 3) == a and round(b, 3) == b
    assert n_chunks == summary["utterances"] == N


def test_speech_inside_vad_silence_outside(tree):
    root, _ = tree
    for f in _files(root):
        x, _ = sf.read(f, dtype="float32")
        spans = [(round(a * SR), round(b * SR)) for a, b in _meta(f)["voice_activity"]]
        voiced = np.zeros(len(x), dtype=bool)
        for a, b in spans:
            voiced[a:b] = True
        gap_db = _db(x[~voiced])
        assert _db(x[voiced]) - gap_db > 20
        assert all(_db(x[a:b]) - gap_db > 20 for a, b in spans)  # every chunk, not only on average
        assert -80 < gap_db < -60  # quiet noise, not digital silence
        assert np.abs(x[~voiced]).max() < 0.003  # no speech leaks outside voice_activity
        assert np.count_nonzero(x[~voiced]) > 0.5 * np.count_nonzero(~voiced)


def test_deterministic(tree, tmp_path):
    root, summary = tree
    again = make_toy_librilight(tmp_path / "a", num_utterances=N, seed=0)
    assert again["subsets"] == summary["subsets"]
    rel = lambda r: {p.relative_to(r).as_posix(): p.read_bytes() for p in sorted(r.rglob("*")) if p.is_file()}  # noqa: E731
    assert rel(tmp_path / "a/librilight") == rel(root)
    make_toy_librilight(tmp_path / "b", num_utterances=N, seed=1)
    other = rel(tmp_path / "b/librilight")
    flac_bytes = lambda d: sorted(v for k, v in d.items() if k.endswith(".flac"))  # noqa: E731
    assert not set(flac_bytes(other)) & set(flac_bytes(rel(root)))
    # a re-run replaces the tree rather than adding to it
    make_toy_librilight(tmp_path / "a", num_utterances=N, seed=1)
    assert rel(tmp_path / "a/librilight") == other


def test_summary_matches_files(tree):
    root, summary = tree
    assert summary["root"] == str(root)
    counted = defaultdict(lambda: [0, 0.0, 0.0])
    for f in _files(root):
        c = counted[f.relative_to(root).parts[0]]
        c[0] += 1
        c[1] += sf.info(f).frames / SR / 3600
        c[2] += sum(b - a for a, b in _meta(f)["voice_activity"]) / 3600
    for s in SUBSETS:
        got = summary["subsets"][s]
        assert got["files"] == counted[s][0]
        assert got["hours"] == pytest.approx(counted[s][1], abs=2e-6)
        assert got["speech_hours"] == pytest.approx(counted[s][2], abs=2e-6)
        assert 0 < got["speech_hours"] < got["hours"]


def test_plan_grouping():
    plan = plan_librilight(160, 3)
    assert sum(len(f.texts) for f in plan) == 160
    assert all(6 <= len(f.texts) <= 12 for f in plan)
    books = defaultdict(set)
    speaker_books = defaultdict(set)
    for f in plan:
        books[(f.speaker.speaker_id, f.book_dir)].add(f.name)
        speaker_books[f.speaker.speaker_id].add(f.book_dir)
    assert all(1 <= len(v) <= 3 for v in books.values())
    assert all(1 <= len(v) <= 2 for v in speaker_books.values()) and len(speaker_books) >= 3
    subset = {(f.speaker.speaker_id, f.book_dir): f.subset for f in plan}
    assert 0.6 <= sum(s == "small" for s in subset.values()) / len(subset) <= 0.9
    assert min(f.speaker.speaker_id for f in plan) >= 10_000  # not a LibriSpeech toy speaker
    with pytest.raises(ValueError):
        plan_librilight(11, 0)


def test_make_toy_corpus_hook(tmp_path):
    summary = make_toy_corpus(tmp_path, 20, 0, librilight_utterances=12)
    assert summary["librilight"]["utterances"] == 12 and (tmp_path / "librilight/small").is_dir()
    summary = make_toy_corpus(tmp_path, 20, 0, librilight_utterances=0)
    assert "librilight" not in summary and not (tmp_path / "librilight").exists()
    args = build_parser().parse_args(["toy", str(tmp_path), "--librilight-utterances", "0"])
    assert args.librilight_utterances == 0
    assert build_parser().parse_args(["toy", str(tmp_path)]).librilight_utterances == 160
