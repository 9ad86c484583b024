"""Libri-Light's unlabelled layout cut by its VAD: the cut_by_vad rule, defects, hold-out, parts, re-runs."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_prep.librilight import BookTask, LibriLightOptions, cut_book, prepare_librilight, prepare_librilight_part
from data_prep.manifest import read_manifest
from data_prep.sources import open_source
from data_prep.vad import VadError, parse_voice_activity, plan_segments

SR = 16_000


def reference_cut(samples: np.ndarray, vad, target_sec: float) -> list[np.ndarray]:
    """libri-light's cut_by_vad.cut_sequence, restated: the pieces it would write."""
    pieces, stitch, acc = [], [], 0.0
    for start, end in vad:
        piece = samples[int(start * SR) : int(end * SR)]
        if acc + (end - start) > target_sec and acc > 0:
            pieces.append(np.concatenate(stitch))
            stitch, acc = [], 0.0
        stitch.append(piece)
        acc += end - start
    if stitch:
        pieces.append(np.concatenate(stitch))
    return pieces


def write_file(book: Path, name: str, seconds: float, vad, rate: int = SR, channels: int = 1, seed: int = 0) -> np.ndarray:
    book.mkdir(parents=True, exist_ok=True)
    n = int(seconds * rate)
    x = np.random.default_rng(seed).integers(-8000, 8000, size=(n, channels) if channels > 1 else n).astype(np.int16)
    sf.write(book / f"{name}.flac", x, rate, subtype="PCM_16")
    meta = {"speaker": book.parent.name, "book_meta": {"id": "1"}, "snr": 10.0, "voice_activity": vad}
    (book / f"{name}.json").write_text(json.dumps(meta))
    return x


def options(root: Path, out: Path, **kw) -> LibriLightOptions:
    kw.setdefault("workers", 2)
    kw.setdefault("target_seconds", 10.0)
    return LibriLightOptions(root, out, **kw)


def test_plan_follows_cut_by_vad_including_long_chunks_and_the_last_piece():
    vad = [[0.5, 3.0], [3.5, 8.0], [8.25, 9.0], [9.5, 25.5], [26.0, 27.0], [27.5, 29.0]]
    x = np.arange(30 * SR)
    plan = plan_segments(parse_voice_activity(vad), len(x), 10.0)
    got = [np.concatenate([x[a:b] for a, b in seg]) for seg in plan.segments]
    want = reference_cut(x, vad, 10.0)
    assert [len(g) for g in got] == [len(w) for w in want] == [(2.5 + 4.5 + 0.75) * SR, 16 * SR, 2.5 * SR]
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    # a first chunk longer than the target is a segment of its own, as is one after a piece
    plan = plan_segments([(0.0, 12.0), (12.5, 13.0), (14.0, 30.0)], 30 * SR, 10.0)
    assert [sum(b - a for a, b in s) for s in plan.segments] == [12 * SR, 0.5 * SR, 16 * SR]
    # seconds that are not whole samples slice as int(t * sr) does
    for seed in range(20):
        rng = np.random.default_rng(seed)
        edges = np.sort(rng.uniform(0, 60, size=2 * rng.integers(1, 12)))
        vad = edges.reshape(-1, 2).tolist()
        x = np.arange(60 * SR)
        target = float(rng.uniform(2, 15))
        plan = plan_segments(parse_voice_activity(vad), len(x), target)
        want = [w for w in reference_cut(x, vad, target) if len(w)]
        got = [np.concatenate([x[a:b] for a, b in seg]) for seg in plan.segments]
        assert len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want))


def test_vad_past_the_end_is_clipped_and_malformed_vad_refused():
    plan = plan_segments([(1.0, 4.0), (5.0, 12.0), (13.0, 14.0)], 10 * SR, 20.0)
    assert plan.segments == [[(SR, 4 * SR), (5 * SR, 10 * SR)]] and len(plan.clipped) == 2
    for bad in ([[2.0, 1.0]], [[0, 1], [0.5, 2]], [[0, "x"]], [[0, 1, 2]], {"a": 1}, [[0, float("nan")]]):
        with pytest.raises(VadError):
            parse_voice_activity(bad)


def test_segments_hold_exactly_the_original_samples(tmp_path):
    root, out = tmp_path / "ll", tmp_path / "out"
    vad = [[0.25, 4.0], [4.5, 9.0], [9.1, 21.7], [22.0, 23.0], [23.5, 29.9]]
    x = write_file(root / "small" / "10" / "book_a", "chapter_01", 30.0, vad)
    prepare_librilight(options(root, out, valid_percent=0.0))
    m = read_manifest(out / "train.tsv")
    want = reference_cut(x, vad, 10.0)
    assert len(m) == len(want) == 3
    for i, w in enumerate(want):
        assert m.paths[i] == f"small/10/book_a/chapter_01/chapter_01_{i:04d}.flac" and m.sizes[i] == len(w)
        got, rate = sf.read(m.full_path(i), dtype="int16")
        assert rate == SR and np.array_equal(got, w)


def test_every_defect_is_reported_and_nothing_good_is_lost(tmp_path):
    root, out = tmp_path / "ll", tmp_path / "out"
    book = root / "small" / "20" / "book_b"
    good = {f"good_{k}": write_file(book, f"good_{k}", 25.0, [[1.0, 8.0], [9.0, 24.0]], seed=k) for k in range(3)}
    write_file(book, "no_json", 5.0, [[0, 4]])
    (book / "no_json.json").unlink()
    (book / "no_audio.json").write_text(json.dumps({"voice_activity": [[0, 1]]}))
    write_file(book, "bad_json", 5.0, [[0, 4]])
    (book / "bad_json.json").write_text('{"voice_activity": [[0, 1], ')
    write_file(book, "unsorted", 5.0, [[2, 3], [0, 1]])
    write_file(book, "empty_vad", 5.0, [])
    write_file(book, "past_end", 6.0, [[1.0, 3.0], [4.0, 9.0]])
    write_file(book, "truncated", 40.0, [[1.0, 39.0]])
    data = (book / "truncated.flac").read_bytes()
    (book / "truncated.flac").write_bytes(data[: len(data) // 2])
    write_file(book, "not_audio", 5.0, [[0, 4]])
    (book / "not_audio.flac").write_bytes(b"this is not a flac file at all" * 10)
    write_file(book, "empty", 5.0, [[0, 4]])
    (book / "empty.flac").write_bytes(b"")
    x44 = write_file(root / "medium" / "30" / "book_c", "rate44k", 8.0, [[0.5, 7.5]], rate=44_100, channels=2)
    write_file(root / "medium" / "30" / "book_c", "rate8k_cut", 30.0, [[0.5, 29.0]], rate=8_000)
    data = (root / "medium" / "30" / "book_c" / "rate8k_cut.flac").read_bytes()
    (root / "medium" / "30" / "book_c" / "rate8k_cut.flac").write_bytes(data[: len(data) // 2])
    write_file(root / "small" / "20", "loose", 5.0, [[0, 4]])  # a file outside SPEAKER/BOOK/
    result = prepare_librilight(options(root, out, valid_percent=0.0))

    rows = [r.split("\t") for r in (out / "report.tsv").read_text().splitlines()[1:]]
    reasons = {Path(r[1]).stem: r[2] for r in rows}
    assert reasons == {
        "no_json": "no_vad", "no_audio": "missing_audio", "bad_json": "bad_vad_json", "unsorted": "bad_vad_json",
        "empty_vad": "empty_vad", "past_end": "vad_past_end", "truncated": "truncated", "not_audio": "not_audio",
        "empty": "empty_file", "rate44k": "converted", "rate8k_cut": "truncated", "loose": "outside_layout",
    }, rows
    listed = read_manifest(out / "train.tsv").paths
    sources = {p.split("/")[3] for p in listed}
    assert sources == {"good_0", "good_1", "good_2", "past_end", "rate44k"}  # the defects only where usable
    assert not (out / "segments" / "small/20/book_b/truncated").exists() or not any(
        (out / "segments" / "small/20/book_b/truncated").iterdir())
    for name, x in good.items():  # every good file whole
        got = [sf.read(out / "segments" / p, dtype="int16")[0] for p in listed if f"/{name}/" in p]
        assert np.array_equal(np.concatenate(got), np.concatenate([x[SR : 8 * SR], x[9 * SR : 24 * SR]]))
    past = [p for p in listed if "/past_end/" in p]
    assert sum(sf.info(out / "segments" / p).frames for p in past) == 2 * SR + 2 * SR  # [1,3] + [4,6] clipped
    conv = next(p for p in listed if "/rate44k/" in p)
    info = sf.info(out / "segments" / conv)
    assert (info.samplerate, info.channels) == (SR, 1) and abs(info.frames - 7 * SR) <= 1
    assert len(x44) == 8 * 44_100
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"]["truncated"] == 2 and summary["splits"]["train"]["utterances"] == len(listed)
    assert result.cut == 2


def make_corpus(root: Path, books: int = 6, files: int = 3) -> None:
    for b in range(books):
        subset = "small" if b % 3 else "medium"
        for f in range(files):
            write_file(root / subset / f"{100 + b % 4}" / f"book_{b}", f"file_{f}", 12.0,
                       [[0.5, 3.0], [3.5, 6.0], [6.5, 11.5]], seed=b * 10 + f)


def test_hold_out_is_by_source_file_disjoint_and_complete(tmp_path):
    root, out = tmp_path / "ll", tmp_path / "out"
    make_corpus(root, books=8, files=3)
    result = prepare_librilight(options(root, out, target_seconds=4.0, valid_percent=0.3, seed=1))
    train, valid = read_manifest(out / "train.tsv"), read_manifest(out / "valid.tsv")
    assert len(valid) > 0 and len(train) > 0
    assert sorted(train.paths + valid.paths) == sorted(s[0] for s in result.segments)
    src = lambda p: p.rsplit("/", 1)[0]  # noqa: E731 - the source file's own directory
    assert not {src(p) for p in train.paths} & {src(p) for p in valid.paths}


def test_job_array_parts_then_merge_equal_one_run(tmp_path):
    root = tmp_path / "ll"
    make_corpus(root, books=7, files=2)
    single, parted = tmp_path / "single", tmp_path / "out"
    prepare_librilight(options(root, parted, num_shards=2, pack=True))
    parted.rename(single)  # both runs write to the same path: the manifests' root line names it
    for i in range(3):
        prepare_librilight_part(options(root, parted, num_shards=2, pack=True), i, 3)
    assert not (parted / "train.tsv").exists()
    merged = prepare_librilight(options(root, parted, num_shards=2, pack=True))
    assert merged.cut == 0  # the parts cut every book
    files = sorted(p.relative_to(single) for p in single.rglob("*") if p.is_file() and ".cache" not in p.parts)
    assert any(p.suffix == ".pcm" for p in files) and any(p.suffix == ".flac" for p in files)
    for rel in files:
        assert (parted / rel).read_bytes() == (single / rel).read_bytes(), rel


def test_rerun_cuts_only_a_new_or_changed_book(tmp_path):
    root, out = tmp_path / "ll", tmp_path / "out"
    make_corpus(root, books=3, files=2)
    first = prepare_librilight(options(root, out))
    assert first.cut == 3
    stamps = {p: p.stat().st_mtime_ns for p in (out / "segments").rglob("*.flac")}
    write_file(root / "small" / "777" / "new_book", "file_0", 12.0, [[0.5, 5.5], [6.0, 11.5]])
    second = prepare_librilight(options(root, out))
    assert second.cut == 1 and len(second.segments) == len(first.segments) + 2
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished books untouched
    # a changed VAD file re-cuts its book, and no segment of the old cut stays listed
    write_file(root / "small" / "777" / "new_book", "file_0", 12.0, [[0.5, 2.0]])
    third = prepare_librilight(options(root, out))
    assert third.cut == 1 and len(third.segments) == len(first.segments) + 1
    assert len(list((out / "segments" / "small/777/new_book").rglob("*.flac"))) == 1
    # and another target length re-cuts everything
    assert prepare_librilight(options(root, out, target_seconds=3.0)).cut == 4


def test_a_long_file_is_never_held_whole(tmp_path):
    book = tmp_path / "ll" / "small" / "1" / "long_book"
    minutes = 8
    vad = [[t + 0.2, t + 4.7] for t in range(0, minutes * 60 - 5, 5)]
    write_file(book, "hour", minutes * 60.0, vad)
    tracemalloc.start()
    result = cut_book(BookTask(str(tmp_path / "ll"), "small/1/long_book", str(tmp_path / "out"), 20.0))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    whole = minutes * 60 * SR * 2  # the file as int16: 15 MB
    assert len(result.segments) == len(vad) // 4 + (len(vad) % 4 > 0) and not result.problems
    assert peak < whole / 4, f"peak {peak / 1e6:.1f} MB while cutting a {whole / 1e6:.1f} MB recording"


def test_command_on_the_toy_tree_then_the_loader(toy_corpus, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "data_prep", "librilight", str(toy_corpus / "librilight"), str(out),
                           "--num-shards", "2", "--pack", "--workers", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "disk: segments as FLAC" in proc.stdout and "115.2 MB per hour" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["subsets"]) == {"small", "medium"} and summary["problems"] == {}
    source = open_source(out, "train")
    assert type(source).__name__ == "PackedSource" and len(source) == summary["splits"]["train"]["utterances"]
    # the toy VAD marks every utterance, so segments are near the target and hold most of the audio
    seg = summary["subsets"]["small"]
    assert 0.5 < seg["segment_hours"] / seg["input_hours"] < 1.0
    assert max(source.sizes) <= 20 * SR + 10 * SR  # no toy utterance is longer than 10 s
    bad = subprocess.run([sys.executable, "-m", "data_prep", "librilight", str(toy_corpus / "librilight"),
                          str(tmp_path / "x"), "--subsets", "large"], capture_output=True, text=True)
    assert bad.returncode == 2 and "large" in bad.stderr
