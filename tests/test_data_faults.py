"""Faults in the data after (or despite) preparation: bad sample values, files that vanish or
change, settings that cannot batch, clips too short to transcribe, and output permissions."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import pretrain_cmd

from data_prep.librispeech import PrepOptions, prepare
from data_prep.loader import AudioLoader, LoaderConfig
from data_prep.manifest import read_manifest
from data_prep.sources import BadUtteranceError, ManifestSource, open_source

SPLIT = "train-clean-100"


def write_corpus(root: Path, count: int, subtype: str = "PCM_16", ext: str = ".flac") -> Path:
    """`count` noise utterances of 1.5 s and more (each a different length), and their manifest."""
    audio = root / "audio"
    audio.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = [str(audio)]
    for i in range(count):
        x = (0.1 * rng.standard_normal(24_000 + 500 * i)).astype(np.float32)
        sf.write(audio / f"u{i:02d}{ext}", x, 16_000, subtype=subtype)
        rows.append(f"u{i:02d}{ext}\t{len(x)}")
    (root / "train.tsv").write_text("\n".join(rows) + "\n")
    return root / "train.tsv"


def loader_cfg(**kw) -> LoaderConfig:
    base = dict(max_tokens=100_000, min_sample_size=0, max_sample_size=None, required_batch_size_multiple=1)
    return LoaderConfig(**{**base, **kw})


# -- 1. NaN, infinite and far out-of-range samples ---------------------------------------------------


def test_prepare_rejects_non_finite_and_out_of_range(tmp_path, toy_corpus):
    root = tmp_path / "LibriSpeech"
    shutil.copytree(toy_corpus / "LibriSpeech" / SPLIT, root / SPLIT)
    flacs = sorted((root / SPLIT).rglob("*.flac"))

    def to_float_wav(flac: Path, edit) -> str:
        x, _ = sf.read(flac, dtype="float32")
        wav = flac.with_suffix(".wav")
        sf.write(wav, edit(x), 16_000, subtype="FLOAT")
        flac.unlink()
        return wav.relative_to(root).as_posix()

    def with_nan(x):
        x[100] = np.nan
        return x

    def with_inf(x):
        x[-1] = -np.inf
        return x

    expected = {
        to_float_wav(flacs[0], with_nan): "non_finite",
        to_float_wav(flacs[1], with_inf): "non_finite",
        to_float_wav(flacs[2], lambda x: x * 32768.0): "out_of_range",  # int16 values stored as float
    }
    loud = to_float_wav(flacs[3], lambda x: 1.5 * x / np.abs(x).max())  # a little over full scale: kept
    plain = to_float_wav(flacs[4], lambda x: x)
    out = tmp_path / "out"
    prepare(PrepOptions(root=root, out=out, workers=1, valid_split=None, num_shards=1, pack=True))

    report = [line.split("\t") for line in (out / "report.tsv").read_text().splitlines()[1:]]
    reasons = {path: reason for _, path, reason, _ in report}
    assert {p: reasons.get(p) for p in expected} == expected
    assert "sample 100 is nan" in (out / "report.tsv").read_text()
    listed = read_manifest(out / f"{SPLIT}.tsv").paths
    assert not set(expected) & set(listed) and {loud, plain} <= set(listed)
    summary = (out / "summary.json").read_text()
    assert '"non_finite": 2' in summary and '"out_of_range": 1' in summary
    # packed float audio is scaled to int16 (libsndfile alone would round 0.3 to 0) and clipped
    packed, flac = open_source(out, "train"), open_source(out, "train", packed=False)
    where = {u: i for i, u in enumerate(flac.ids)}
    for name in (plain, loud):
        uid = Path(name).stem
        got = packed.read(packed.ids.index(uid))
        want = np.clip(flac.read(where[uid]), -1.0, 32767 / 32768)
        np.testing.assert_allclose(got, want, atol=1 / 32768)
        assert np.abs(got).max() > 0.5


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_names_utterance_with_bad_samples(tmp_path, num_workers):
    """A manifest written by another tool can list float audio with NaNs: the loader names it."""
    manifest = write_corpus(tmp_path, 6, subtype="FLOAT", ext=".wav")
    bad = tmp_path / "audio" / "u03.wav"
    x, _ = sf.read(bad, dtype="float32")
    x[7] = np.nan
    sf.write(bad, x, 16_000, subtype="FLOAT")
    loader = AudioLoader(ManifestSource(manifest), loader_cfg(num_workers=num_workers), seed=1)
    with pytest.raises(BadUtteranceError) as info:
        list(loader)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    for piece in (str(bad), f"line 5 of {manifest}", "non_finite", "data.skip_bad_files=true"):
        assert piece in message, message
    assert "Traceback" not in message  # not a worker's traceback re-raised


# -- 2. files that vanish or change after preparation -----------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_vanished_or_damaged_file_stops_the_loader(tmp_path, num_workers):
    manifest = write_corpus(tmp_path, 10)
    gone = tmp_path / "audio" / "u04.flac"
    gone.unlink()
    loader = AudioLoader(ManifestSource(manifest), loader_cfg(num_workers=num_workers), seed=1)
    with pytest.raises(BadUtteranceError) as info:
        list(loader)
    message = str(info.value)
    for piece in (str(gone), f"line 6 of {manifest}", "no such file", "data_prep", "--set data.skip_bad_files=true"):
        assert piece in message, message
    assert message.count(str(gone)) == 1 and "Traceback" not in message
    damaged = tmp_path / "audio" / "u07.flac"
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadUtteranceError, match="u07.flac"):
        ManifestSource(manifest).read(7)
    sf.write(damaged, np.zeros(1000, dtype=np.float32), 16_000)  # replaced by another recording
    with pytest.raises(BadUtteranceError, match="1000 samples but the manifest says"):
        ManifestSource(manifest).read(7)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_bad_files_leaves_them_out_and_logs_each(tmp_path, caplog, num_workers):
    manifest = write_corpus(tmp_path, 12)
    cfg = loader_cfg(num_workers=num_workers, pad=True)
    ids = ManifestSource(manifest).ids
    clean = list(AudioLoader(ManifestSource(manifest), cfg, seed=1, labels=ids))
    (tmp_path / "audio" / "u02.flac").unlink()
    (tmp_path / "audio" / "u09.flac").write_bytes(b"not audio any more")
    cfg.skip_bad_files = True
    with caplog.at_level(logging.WARNING, logger="data_prep.loader"):
        batches = list(AudioLoader(ManifestSource(manifest), cfg, seed=1, labels=ids))
    assert len(batches) == len(clean)  # no batch lost: every rank keeps its number of steps
    seen = [int(i) for b in batches for i in b.indices]
    assert sorted(seen) == [i for i in range(12) if i not in (2, 9)]
    for b in batches:
        assert b.source.shape[0] == len(b.indices) == len(b.labels) == len(b.lengths)
        assert b.labels == [ids[int(i)] for i in b.indices]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert any("u02.flac" in w and "line 4 of" in w for w in warnings)
    assert any("u09.flac" in w and "line 11 of" in w for w in warnings)


def test_batch_with_nothing_readable_is_a_weight_zero_step(tmp_path):
    manifest = write_corpus(tmp_path, 8)
    cfg = loader_cfg(max_tokens=60_000, skip_bad_files=True)  # two utterances per batch
    loaders = [AudioLoader(ManifestSource(manifest), cfg, seed=1, rank=r, world_size=2) for r in (0, 1)]
    victims = loaders[0].batches[0]
    for i in victims:
        (tmp_path / "audio" / f"u{int(i):02d}.flac").unlink()
    per_rank = [list(loader) for loader in loaders]
    assert [len(b) for b in per_rank] == [len(loaders[0])] * 2  # ranks stay in step
    dummies = [b for batches in per_rank for b in batches if b.is_dummy]
    assert len(dummies) == 1 and dummies[0].num_samples == 0
    assert sorted(dummies[0].indices.tolist()) == sorted(victims.tolist())
    assert float(dummies[0].source.abs().sum()) == 0.0


def test_training_cli_reports_a_vanished_file_and_can_skip_it(tmp_path):
    manifest = write_corpus(tmp_path / "data", 12)
    gone = tmp_path / "data" / "audio" / "u05.flac"
    gone.unlink()
    cmd = pretrain_cmd("wav2vec2_tiny", manifest.parent, tmp_path / "run", "--max-steps", "3",
                       "--set", "data.num_workers=1", "--set", "train.log_interval=1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and str(gone) in error[0] and "line 7 of" in error[0], proc.stderr[-3000:]
    assert "--set data.skip_bad_files=true" in error[0]
    proc = subprocess.run(cmd + ["--set", "data.skip_bad_files=true"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    skips = [line for line in proc.stderr.splitlines() if "skipped" in line and str(gone) in line]
    assert skips and all("line 7 of" in line for line in skips)


# -- 3. settings under which no batch can be built ----------------------------------------------------


def test_max_tokens_below_min_sample_size_fails_before_any_data(tmp_path):
    from finetune.presets import get_preset as finetune_preset
    from pretrain.config import apply_overrides
    from pretrain.presets import get_preset

    with pytest.raises(ValueError, match=r"data\.max_tokens=1000 .*data\.min_sample_size=16000"):
        apply_overrides(get_preset("wav2vec2_tiny"), ["data.max_tokens=1000"])
    with pytest.raises(ValueError, match=r"data\.max_tokens=3200000 .*data\.min_sample_size=4000000"):
        apply_overrides(finetune_preset("ctc_tiny"), ["data.min_sample_size=4_000_000", "data.max_tokens=3200000"])

    class Unread:  # a source that must not be touched
        @property
        def sizes(self):
            raise AssertionError("the loader read the data before checking its settings")

    with pytest.raises(ValueError, match="data.min_sample_size"):
        AudioLoader(Unread(), loader_cfg(max_tokens=10, min_sample_size=100))
    missing = tmp_path / "no-data-here"  # the check comes first: no data is needed to fail
    proc = subprocess.run(pretrain_cmd("wav2vec2_tiny", missing, tmp_path / "run", "--set", "data.max_tokens=1000"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "data.max_tokens=1000" in proc.stderr and "data.min_sample_size=16000" in proc.stderr
    assert "--set data.max_tokens=" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


# -- 4. transcribing short, unreadable and bad files ---------------------------------------------------


@pytest.fixture(scope="module")
def ctc_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny CTC run: enough to exercise transcribe's input handling."""
    from finetune.config import ARCHITECTURE_FIELDS
    from finetune.model import CTCModel
    from finetune.presets import get_preset as finetune_preset
    from pretrain.presets import get_preset
    from pretrain.training import checkpoint as ckpt

    cfg = finetune_preset("ctc_tiny")
    arch = get_preset("wav2vec2_tiny").model
    for name in ARCHITECTURE_FIELDS:
        setattr(cfg.model, name, getattr(arch, name))
    cfg.ctc.symbols = ["<s>", "<pad>", "</s>", "<unk>", "|", "E", "T", "A", "O"]
    model = CTCModel(cfg.model, len(cfg.ctc.symbols))
    run = tmp_path_factory.mktemp("ctc") / "run"
    ckpt.save(run, 1, {"config": cfg.to_dict(), "model": model.state_dict(), "step": 1}, keep_last=1)
    return run


def test_transcribe_warns_on_short_clips_and_reports_each_failure_once(ctc_checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    files = {}
    for name, n in [("good", 24_000), ("short", 1_600), ("tiny", 200)]:
        files[name] = tmp_path / f"{name}.wav"
        sf.write(files[name], (0.1 * rng.standard_normal(n)).astype(np.float32), 16_000)
    files["missing"] = tmp_path / "missing.wav"
    files["broken"] = tmp_path / "broken.flac"
    files["broken"].write_bytes(b"fLaC" + b"\0" * 10)
    files["nan"] = tmp_path / "nan.wav"
    wave = (0.1 * rng.standard_normal(16_000)).astype(np.float32)
    wave[5] = np.nan
    sf.write(files["nan"], wave, 16_000, subtype="FLOAT")
    order = ["good", "missing", "short", "broken", "tiny", "nan"]
    proc = subprocess.run([sys.executable, "-m", "finetune.transcribe", str(ctc_checkpoint)]
                          + [str(files[k]) for k in order], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [r[0] for r in rows] == [str(files["good"]), str(files["short"])]  # the rest still transcribed
    for name in ("missing", "broken", "tiny", "nan"):
        path = str(files[name])
        lines = [line for line in proc.stderr.splitlines() if path in line]
        assert len(lines) == 1 and lines[0].startswith("error:") and proc.stderr.count(path) == 1, proc.stderr
    assert "no such file" in proc.stderr and "non_finite" in proc.stderr
    assert "at least 400" in proc.stderr  # the conv stack's receptive field
    warning = [line for line in proc.stderr.splitlines() if str(files["short"]) in line]
    assert len(warning) == 1 and warning[0].startswith("warning:") and "0.5 s" in warning[0], proc.stderr


# -- 5. outputs others can read ----------------------------------------------------------------------


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): stat.S_IMODE(p.stat().st_mode)
            for p in directory.rglob("*") if p.is_file() and not p.is_symlink()}


def test_outputs_respect_the_umask(tmp_path, toy_corpus, umask_022, ctc_checkpoint):
    from finetune.export import export_hf as export_ctc
    from pretrain.build import build_task
    from pretrain.export import export_fairseq, export_fairseq2_run, export_hf
    from pretrain.presets import get_preset
    from pretrain.training import checkpoint as ckpt
    from pretrain.training.trainer import write_config

    out = tmp_path / "manifests"
    prepare(PrepOptions(root=toy_corpus, out=out, workers=1, num_shards=1, pack=True))
    modes = _modes(out)
    for name in (f"{SPLIT}.tsv", f"{SPLIT}.ltr", "dict.ltr.txt", "report.tsv", "summary.json", "shards/train.0.pcm"):
        assert modes.pop(name) == 0o644, name
    assert {k: oct(v) for k, v in modes.items() if v != 0o644} == {}

    cfg = get_preset("wav2vec2_tiny")
    run = tmp_path / "run"
    write_config(run, cfg)
    model = build_task(cfg.model).model
    ckpt.save(run, 1, {"config": cfg.to_dict(), "model": model.state_dict(), "step": 1}, keep_last=1)
    assert {k: oct(v) for k, v in _modes(run).items()} == {
        "config.json": "0o644", "checkpoints/step_00000001.pt": "0o644"}
    export_hf(run, tmp_path / "hf")
    export_ctc(ctc_checkpoint, tmp_path / "ctc-hf")
    export_fairseq2_run(run, tmp_path / "fs2", "tiny")
    assert {k: oct(v) for k, v in _modes(tmp_path / "fs2").items()} == {
        "model.pt": "0o644", "tiny.yaml": "0o644", "README.md": "0o644"}
    export_fairseq(run, tmp_path / "fs")
    assert {k: oct(v) for k, v in _modes(tmp_path / "fs").items()} == {"checkpoint.pt": "0o644", "README.md": "0o644"}
    for exported in ("hf", "ctc-hf"):
        modes = _modes(tmp_path / exported)
        assert "model.safetensors" in modes and "config.json" in modes
        assert {k: oct(v) for k, v in modes.items() if v != 0o644} == {}, exported
