"""The synthetic corpus: exact LibriSpeech / Libri-Light layout, real speech, deterministic."""

import re
import subprocess
import sys

import numpy as np
import soundfile as sf

from data_prep.toy import SPLITS, make_toy_corpus, plan_corpus
from data_prep.vocabulary import WORDS

UTT = re.compile(r"^(\d+)-(\d+)-(\d{4})$")


def _decoded(root):
    return {p.relative_to(root).as_posix(): sf.read(p, dtype="int16")[0] for p in sorted(root.rglob("*.flac"))}


def test_librispeech_layout(toy_corpus):
    ls = toy_corpus / "LibriSpeech"
    assert sorted(p.name for p in ls.iterdir()) == sorted(SPLITS)
    speakers = {}
    for split in SPLITS:
        flacs = sorted((ls / split).glob("*/*/*.flac"))
        assert len(flacs) >= 4
        for f in flacs:
            spk, chap, _ = UTT.match(f.stem).groups()
            assert f.parent.name == chap and f.parent.parent.name == spk
            info = sf.info(f)
            assert (info.samplerate, info.channels, info.format, info.subtype) == (16000, 1, "FLAC", "PCM_16")
            assert info.frames > 16000  # at least a second of speech
            speakers.setdefault(spk, set()).add(split)
        for trans in (ls / split).glob("*/*/*.trans.txt"):
            spk, chap = trans.name[: -len(".trans.txt")].split("-")
            for line in trans.read_text().splitlines():
                utt, text = line.split(" ", 1)
                assert utt.startswith(f"{spk}-{chap}-")
                assert (trans.parent / f"{utt}.flac").exists()
                assert text == text.upper() and all(w in WORDS for w in text.split())
    # Like LibriSpeech, no speaker appears in two splits.
    assert all(len(s) == 1 for s in speakers.values())


def test_librilight_finetuning_layout(toy_corpus):
    ft = toy_corpus / "librispeech_finetuning"
    assert sorted(p.name for p in (ft / "1h").iterdir()) == [str(k) for k in range(6)]
    train = {p.name: p for p in (toy_corpus / "LibriSpeech/train-clean-100").rglob("*.flac")}
    n = 0
    for sub in [f"1h/{k}" for k in range(6)] + ["9h"]:
        assert {p.name for p in (ft / sub).iterdir()} <= {"clean", "other"}
        for f in (ft / sub).glob("*/*/*/*.flac"):
            # fine-tuning files are copies of training utterances, as in Libri-Light
            assert f.read_bytes() == train[f.name].read_bytes()
            n += 1
    assert n > 0


def test_audio_is_speech_not_silence(toy_corpus):
    f = next((toy_corpus / "LibriSpeech/dev-clean").rglob("*.flac"))
    x, _ = sf.read(f)
    frames = x[: len(x) // 400 * 400].reshape(-1, 400)
    energy = (frames**2).mean(1)
    # speech alternates loud and quiet stretches
    assert energy.max() > 100 * np.percentile(energy, 10)


def test_same_seed_same_corpus_other_seed_differs(tmp_path):
    a = make_toy_corpus(tmp_path / "a", num_utterances=24, seed=5)
    b = make_toy_corpus(tmp_path / "b", num_utterances=24, seed=5)
    assert a["splits"] == b["splits"]
    da, db = _decoded(tmp_path / "a"), _decoded(tmp_path / "b")
    assert da.keys() == db.keys() and all(np.array_equal(da[k], db[k]) for k in da)
    ta = sorted(p.read_text() for p in (tmp_path / "a").rglob("*.trans.txt"))
    assert ta == sorted(p.read_text() for p in (tmp_path / "b").rglob("*.trans.txt"))
    assert plan_corpus(24, 5) != plan_corpus(24, 6)


def test_cli_writes_corpus(tmp_path):
    out = tmp_path / "c"
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep", "toy", str(out), "--utterances", "20", "--seed", "1"],
        capture_output=True, text=True, check=True,
    )
    assert "wrote the synthetic corpus" in proc.stdout
    assert len(list((out / "LibriSpeech").rglob("*.flac"))) == 20
