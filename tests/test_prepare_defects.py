"""Every kind of bad input is reported with its reason, never listed, and costs no good record."""

import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from data_prep.librispeech import PrepOptions, prepare
from data_prep.manifest import read_manifest

SPLIT = "train-clean-100"


def write_zero_length_flac(path, rate=16000):
    """A valid FLAC stream header (STREAMINFO) with no audio frames; libsndfile cannot write one."""
    bits = (rate << 44) | (0 << 41) | (15 << 36)  # rate, channels - 1, bits per sample - 1, 0 samples
    info = struct.pack(">HH", 4096, 4096) + bytes(6) + bits.to_bytes(8, "big") + bytes(16)
    path.write_bytes(b"fLaC" + bytes([0x80, 0, 0, len(info)]) + info)


@pytest.fixture()
def damaged(tmp_path, toy_corpus):
    """A copy of the toy train split with one defect of each kind; returns (root, expected)."""
    root = tmp_path / "LibriSpeech"
    shutil.copytree(toy_corpus / "LibriSpeech" / SPLIT, root / SPLIT)
    chapters = sorted(p for p in (root / SPLIT).glob("*/*") if p.is_dir())
    flacs = sorted(chapters[0].glob("*.flac")) + sorted(chapters[1].glob("*.flac"))
    expected = {}

    def rel(p):
        return p.relative_to(root).as_posix()

    def trans_of(p):
        spk, chap, _ = p.stem.split("-")
        return p.parent / f"{spk}-{chap}.trans.txt"

    def set_text(p, text):
        t = trans_of(p)
        lines = [ln if not ln.startswith(p.stem + " ") else f"{p.stem} {text}" for ln in t.read_text().splitlines()]
        t.write_text("\n".join(lines) + "\n")

    data = flacs[0].read_bytes()
    flacs[0].write_bytes(data[: len(data) // 2])
    expected[rel(flacs[0])] = "truncated"
    flacs[1].write_bytes(b"this is a text file, not audio" * 10)
    expected[rel(flacs[1])] = "not_audio"
    flacs[2].write_bytes(b"")
    expected[rel(flacs[2])] = "empty_file"
    write_zero_length_flac(flacs[3])
    expected[rel(flacs[3])] = "zero_length"
    sf.write(flacs[10].with_suffix(".wav"), np.zeros(0, dtype=np.int16), 16000)  # header only
    flacs[10].unlink()
    expected[rel(flacs[10].with_suffix(".wav"))] = "zero_length"
    set_text(flacs[4], "HELLO, WORLD 42")
    expected[rel(flacs[4])] = "bad_characters"
    # audio with no transcript line
    orphan = flacs[5].with_name(flacs[5].stem[:-4] + "9999.flac")
    shutil.copyfile(flacs[5], orphan)
    expected[rel(orphan)] = "no_transcript"
    # a transcript line with no audio
    t = trans_of(flacs[6])
    ghost = flacs[6].stem[:-4] + "8888"
    t.write_text(t.read_text() + f"{ghost} A LINE WITH NO AUDIO\n")
    expected[f"{rel(flacs[6].parent)}/{ghost}"] = "missing_audio"
    set_text(flacs[7], "")
    # wrong rate and stereo: converted, listed, reported as converted
    x, _ = sf.read(flacs[8], dtype="float32")
    sf.write(flacs[8].with_suffix(".wav"), np.interp(np.arange(0, len(x), 16000 / 22050), np.arange(len(x)), x), 22050)
    flacs[8].unlink()
    expected[rel(flacs[8].with_suffix(".wav"))] = "converted"
    y, _ = sf.read(flacs[9], dtype="float32")
    sf.write(flacs[9], np.stack([y, 0.5 * y], axis=1), 16000, format="FLAC")
    expected[rel(flacs[9])] = "converted"
    bad = set(expected) | {rel(flacs[7])}
    good = {rel(f) for f in root.rglob("*.flac")} - bad
    return root, expected, good, rel(flacs[7])


def test_defects_reported_and_good_files_kept(tmp_path, damaged):
    root, expected, good, empty_text = damaged
    out = tmp_path / "out"
    result = prepare(PrepOptions(root=root, out=out, workers=2, valid_split=None))
    report = [line.split("\t") for line in (out / "report.tsv").read_text().splitlines()[1:]]
    reasons = {path: reason for _, path, reason, _ in report}
    for path, reason in expected.items():
        assert reasons.get(path) == reason, (path, reasons.get(path))
    stem = empty_text.rsplit("/", 1)[1][: -len(".flac")]
    assert any(r == "empty_transcript" and stem in p for p, r in reasons.items())
    manifest = read_manifest(out / f"{SPLIT}.tsv")
    listed = dict(zip(manifest.paths, manifest.sizes.tolist()))
    for path in good:  # every good file listed with its true sample count
        assert listed[path] == sf.info(root / path).frames
    rejected = {p for p, r in expected.items() if r != "converted"} | {empty_text}
    assert not rejected & set(listed)
    converted = [p for p in listed if p.startswith("/")]
    assert len(converted) == 2
    for p in converted:
        info = sf.info(p)
        assert (info.samplerate, info.channels) == (16000, 1) and info.frames == listed[p]
        assert p.startswith(str(out / "converted"))
    assert len(listed) == len(good) + 2
    assert result.usable == len(listed)


def test_cli_summary_counts_each_defect(tmp_path, damaged):
    root, _, _, _ = damaged
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep", "librispeech", str(root), str(tmp_path / "o"), "--workers", "2"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.splitlines()[0]
    for piece in ["1 truncated", "1 not_audio", "1 empty_file", "2 zero_length", "1 bad_characters",
                  "1 no_transcript", "1 missing_audio", "1 empty_transcript", "converted: 2"]:
        assert piece in line, line


def test_rerun_rechecks_only_changed_files(tmp_path, damaged):
    root, _, good, _ = damaged
    out = tmp_path / "out"
    prepare(PrepOptions(root=root, out=out, workers=1))
    first = (out / f"{SPLIT}.tsv").read_text()
    assert (out / ".cache").is_dir()
    prepare(PrepOptions(root=root, out=out, workers=1))
    assert (out / f"{SPLIT}.tsv").read_text() == first
    victim = sorted(good)[0]
    data = (root / victim).read_bytes()
    (root / victim).write_bytes(data[: len(data) // 3])  # damaged after the first run
    prepare(PrepOptions(root=root, out=out, workers=1))
    assert victim not in read_manifest(out / f"{SPLIT}.tsv").paths
    assert f"{victim}\ttruncated" in (out / "report.tsv").read_text()


def test_no_decode_still_catches_header_defects(tmp_path, damaged):
    root, expected, _, _ = damaged
    out = tmp_path / "out"
    prepare(PrepOptions(root=root, out=out, workers=2, decode=False))
    report = (out / "report.tsv").read_text()
    for path, reason in expected.items():
        if reason in {"not_audio", "empty_file", "zero_length", "no_transcript", "missing_audio"}:
            assert f"{path}\t{reason}" in report
