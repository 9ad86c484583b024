"""`data_prep librispeech`: exact output formats, splits, dictionary, report and re-runs."""

import json
import subprocess
import sys
from collections import Counter

import soundfile as sf

from data_prep.labels import to_letters
from data_prep.manifest import read_manifest


def _transcripts(root):
    out = {}
    for t in root.rglob("*.trans.txt"):
        for line in t.read_text().splitlines():
            utt, text = line.split(" ", 1)
            out[utt] = text
    return out


def test_manifest_and_label_formats(prepared, toy_corpus):
    ls = (toy_corpus / "LibriSpeech").resolve()
    texts = _transcripts(ls)
    for split in ["train-clean-100", "dev-clean", "dev-other", "test-clean", "test-other"]:
        lines = (prepared / f"{split}.tsv").read_text().splitlines()
        assert lines[0] == str(ls)
        rows = [line.split("\t") for line in lines[1:]]
        flacs = sorted(p.relative_to(ls).as_posix() for p in (ls / split).rglob("*.flac"))
        assert [r[0] for r in rows] == flacs  # every file, in sorted order
        for rel, n in rows:
            assert int(n) == sf.info(ls / rel).frames
        wrd = (prepared / f"{split}.wrd").read_text().splitlines()
        ltr = (prepared / f"{split}.ltr").read_text().splitlines()
        ids = [r[0].rsplit("/", 1)[1][: -len(".flac")] for r in rows]
        assert wrd == [texts[i] for i in ids]
        assert ltr == [to_letters(w) for w in wrd]
        assert all(line.endswith(" |") and "  " not in line for line in ltr)


def test_train_valid_and_dictionary(prepared):
    train = read_manifest(prepared / "train.tsv")
    assert train.paths == read_manifest(prepared / "train-clean-100.tsv").paths
    assert (prepared / "valid.tsv").read_text() == (prepared / "dev-clean.tsv").read_text()
    counts = Counter(sym for line in (prepared / "train.ltr").read_text().splitlines() for sym in line.split())
    rows = [line.split(" ") for line in (prepared / "dict.ltr.txt").read_text().splitlines()]
    assert {s: int(c) for s, c in rows} == dict(counts)
    assert [int(c) for _, c in rows] == sorted((int(c) for _, c in rows), reverse=True)
    assert rows[0][0] == "|"


def test_librilight_splits(prepared, toy_corpus):
    ft = (toy_corpus / "librispeech_finetuning").resolve()
    m = {s: read_manifest(prepared / f"{s}.tsv") for s in ["train-10m", "train-1h", "train-10h"]}
    assert all(x.root == str(ft) for x in m.values())
    assert all(p.startswith("1h/0/") for p in m["train-10m"].paths)
    assert set(m["train-1h"].paths) == {p.relative_to(ft).as_posix() for p in (ft / "1h").rglob("*.flac")}
    nine = {p.relative_to(ft).as_posix() for p in (ft / "9h").rglob("*.flac")}
    assert set(m["train-10h"].paths) == set(m["train-1h"].paths) | nine
    assert len((prepared / "train-1h.ltr").read_text().splitlines()) == len(m["train-1h"])


def test_summary_and_empty_report(prepared):
    summary = json.loads((prepared / "summary.json").read_text())
    assert summary["splits"]["train"]["utterances"] == len(read_manifest(prepared / "train.tsv"))
    assert summary["problems"] == {}
    assert (prepared / "report.tsv").read_text().splitlines() == ["split\tpath\tproblem\tdetail"]


def test_cli_exit_status(tmp_path, toy_corpus):
    ok = subprocess.run(
        [sys.executable, "-m", "data_prep", "librispeech", str(toy_corpus), str(tmp_path / "m"), "--workers", "2"],
        capture_output=True, text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "usable utterances" in ok.stdout and "rejected: none" in ok.stdout
    (tmp_path / "empty" / "train-clean-100" / "1" / "2").mkdir(parents=True)
    (tmp_path / "empty" / "train-clean-100" / "1" / "2" / "1-2.trans.txt").write_text("1-2-0000 HELLO\n")
    bad = subprocess.run(
        [sys.executable, "-m", "data_prep", "librispeech", str(tmp_path / "empty"), str(tmp_path / "n")],
        capture_output=True, text=True,
    )
    assert bad.returncode == 1 and "no usable audio" in bad.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "data_prep", "librispeech", str(tmp_path / "nowhere"), str(tmp_path / "n")],
        capture_output=True, text=True,
    )
    assert missing.returncode == 2 and "is not a directory" in missing.stderr
