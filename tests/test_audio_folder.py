"""`python -m data_prep audio`: any folder of audio files to pretraining manifests, defects reported."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from data_prep.folder import FolderOptions, prepare_folder, prepare_folder_part
from data_prep.manifest import read_manifest

SR = 16_000


def folder_with_defects(root: Path) -> dict[str, str]:
    """A nested folder of good files and one of each defect; returns {relpath: expected reason}."""
    rng = np.random.default_rng(0)
    expected = {}
    for k in range(12):
        sub = root / f"speaker{k % 3}" / ("session" if k % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        ext = "flac" if k % 4 else "wav"
        sf.write(sub / f"clip{k}.{ext}", rng.integers(-4000, 4000, SR * (1 + k % 3)).astype(np.int16), SR)
    sf.write(root / "loud.WAV", rng.integers(-4000, 4000, SR).astype(np.int16), SR)  # upper-case extension
    sf.write(root / "stereo_44k.wav", rng.uniform(-0.3, 0.3, (44_100, 2)).astype(np.float32), 44_100)
    expected["stereo_44k.wav"] = "converted"
    sf.write(root / "cut.flac", rng.integers(-4000, 4000, SR * 6).astype(np.int16), SR)
    cut = (root / "cut.flac").read_bytes()
    (root / "cut.flac").write_bytes(cut[: len(cut) // 2])
    expected["cut.flac"] = "truncated"
    (root / "empty.wav").write_bytes(b"")
    expected["empty.wav"] = "empty_file"
    (root / "speaker1" / "text.flac").write_text("not audio " * 20)
    expected["speaker1/text.flac"] = "not_audio"
    nan = np.zeros(SR, dtype=np.float32)
    nan[100] = np.nan
    sf.write(root / "nan.wav", nan, SR, subtype="FLOAT")
    expected["nan.wav"] = "non_finite"
    sf.write(root / "tab\tname.wav", rng.integers(-4000, 4000, SR).astype(np.int16), SR)
    expected["tab\tname.wav"] = "unlistable_name"
    (root / "speaker2" / "gone.flac").symlink_to(root / "no_such_file.flac")
    expected["speaker2/gone.flac"] = "unreadable"
    (root / "notes.txt").write_text("ignored: not an audio extension")
    sf.write(root / "other.ogg", rng.uniform(-0.1, 0.1, SR).astype(np.float32), SR)  # not in --ext
    return expected


def test_folder_defects_reported_good_files_listed_at_their_own_path(tmp_path):
    root, out = tmp_path / "audio", tmp_path / "out"
    expected = folder_with_defects(root)
    result = prepare_folder(FolderOptions(root, out, workers=2, valid_percent=0.25, seed=3))
    rows = [r.split("\t") for r in (out / "report.tsv").read_text().splitlines()[1:]]
    assert {r[1]: r[2] for r in rows} == {k.replace("\t", "\\t"): v for k, v in expected.items()}
    train, valid = read_manifest(out / "train.tsv"), read_manifest(out / "valid.tsv")
    assert train.root == valid.root == str(root.resolve())
    good = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.suffix.lower() in (".flac", ".wav") and p.relative_to(root).as_posix() not in expected)
    assert not any("\t" in p for p in good)
    listed = train.paths + valid.paths
    assert len(good) == 13 and len(valid) > 0 and not set(train.paths) & set(valid.paths)
    converted = [p for p in listed if p.startswith("/")]
    assert sorted(p for p in listed if not p.startswith("/")) == good  # every good file, once, as it is
    assert converted == [str(out.resolve() / "converted" / "stereo_44k.wav.flac")]
    info = sf.info(converted[0])
    assert (info.samplerate, info.channels, info.frames) == (SR, 1, SR)
    for i, p in enumerate(train.paths):
        assert sf.info(train.full_path(i)).frames == train.sizes[i], p
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"]["train"]["utterances"] + summary["splits"]["valid"]["utterances"] == result.usable == 14
    assert summary["disk"]["packed_int16_bytes"] == 2 * int(train.sizes.sum() + valid.sizes.sum())


def test_extensions_choose_the_files(tmp_path):
    root = tmp_path / "audio"
    folder_with_defects(root)
    out = tmp_path / "ogg"
    proc = subprocess.run([sys.executable, "-m", "data_prep", "audio", str(root), str(out), "--ext", "ogg",
                           "--valid-percent", "0"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert read_manifest(out / "train.tsv").paths == ["other.ogg"] and not (out / "valid.tsv").exists()
    assert "packed as int16" in proc.stdout
    inside = subprocess.run([sys.executable, "-m", "data_prep", "audio", str(root), str(root / "manifests")],
                            capture_output=True, text=True)
    assert inside.returncode == 2 and "inside DIR" in inside.stderr
    nothing = subprocess.run([sys.executable, "-m", "data_prep", "audio", str(root), str(tmp_path / "x"), "--ext", "mp4"],
                             capture_output=True, text=True)
    assert nothing.returncode == 1 and "no usable audio" in nothing.stderr


def test_parts_then_merge_equal_one_run_and_rerun_is_stable(tmp_path):
    root = tmp_path / "audio"
    folder_with_defects(root)
    out = tmp_path / "out"
    prepare_folder(FolderOptions(root, out, workers=2, num_shards=2, pack=True))
    single = tmp_path / "single"
    shutil.copytree(out, single)
    shutil.rmtree(out)
    for i in range(3):
        prepare_folder_part(FolderOptions(root, out, workers=1, num_shards=2, pack=True), i, 3)
    assert not (out / "train.tsv").exists()
    prepare_folder(FolderOptions(root, out, workers=2, num_shards=2, pack=True))
    names = sorted(p.relative_to(single) for p in single.rglob("*") if p.is_file() and ".cache" not in p.parts)
    assert Path("shards/train.1.pcm") in names
    for rel in names:
        assert (out / rel).read_bytes() == (single / rel).read_bytes(), rel
    # a new file joins on the next run; the others come from the cache
    sf.write(root / "late.flac", np.zeros(SR, dtype=np.int16), SR)
    prepare_folder(FolderOptions(root, out, workers=1, valid_percent=0.0))
    assert "late.flac" in read_manifest(out / "train.tsv").paths
