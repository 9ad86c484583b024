"""Checkpoints written by earlier versions still load, compute the same function and resume.

`tests/fixtures/*_v0.pt` were written by the code before the package layout changed (3 updates of
the tiny presets shrunk to 32 wide, 1 layer, on `write_fixture_data`), with `*_v0.encoded.npy` the
encoder output that code gave for `_probe_wave()`. The data2vec one predates the rule that data2vec
always has `post_extract_proj`: its conv and encoder widths agree, so it was saved without one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import pretrain_cmd, run_ok

from data_prep.loader import normalize_wave
from pretrain.extract import encode, load_encoder

FIXTURES = Path(__file__).parent / "fixtures"
#: the overrides the fixtures were trained with, on top of their presets
SHRINK = [
    "--set", "model.encoder_ffn_embed_dim=64", "--set", "model.encoder_layers=1",
    "--set", "model.conv_feature_layers=[(32,10,5),(32,3,2),(32,3,2),(32,3,2),(32,3,2),(32,2,2),(32,2,2)]",
    "--set", "model.encoder_embed_dim=32", "--set", "model.final_dim=16",
]


def write_fixture_data(out: Path) -> Path:
    """The manifests the fixtures were trained on: 24 utterances of seeded noise and tones."""
    rng = np.random.default_rng(0)
    audio = out / "audio"
    audio.mkdir(parents=True)
    lines = {"train": [str(audio)], "valid": [str(audio)]}
    for i in range(24):
        n = 20_000 + 1_000 * i
        t = np.arange(n) / 16_000
        wave = 0.2 * np.sin(2 * np.pi * (150 + 20 * i) * t) + 0.05 * rng.standard_normal(n)
        sf.write(audio / f"u{i}.flac", (wave * 32767).astype(np.int16), 16_000, subtype="PCM_16")
        lines["valid" if i % 6 == 0 else "train"].append(f"u{i}.flac\t{n}")
    for split, rows in lines.items():
        (out / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return out


def _probe_wave() -> np.ndarray:
    t = np.arange(16000, dtype=np.float32) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 1330 * t**2)).astype(np.float32)


@pytest.mark.parametrize("name", ["wav2vec2_tiny", "data2vec_tiny"])
def test_old_checkpoint_computes_the_same_features(name):
    cfg, model = load_encoder(FIXTURES / f"{name}_v0.pt", torch.device("cpu"))
    wave = normalize_wave(_probe_wave()) if cfg.data.normalize else _probe_wave()
    expected = np.load(FIXTURES / f"{name}_v0.encoded.npy")
    np.testing.assert_allclose(encode(model, wave, torch.device("cpu")), expected, rtol=1e-4, atol=1e-5)
    if name == "data2vec_tiny":
        # upgraded with an identity projection: the same function, in fairseq's architecture
        assert torch.equal(model.post_extract_proj.weight, torch.eye(32))


@pytest.mark.parametrize("name", ["wav2vec2_tiny", "data2vec_tiny"])
def test_old_checkpoint_resumes(name, tmp_path):
    data = write_fixture_data(tmp_path / "data")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(FIXTURES / f"{name}_v0.pt", run / "checkpoints" / "step_00000003.pt")
    (run / "checkpoints" / "last.pt").symlink_to("step_00000003.pt")
    proc = run_ok(pretrain_cmd(name, data, run, "--max-steps", "5", *SHRINK,
                               "--set", "train.log_interval=1", "--set", "train.valid_interval=1000"))
    assert "at step 3" in proc.stdout
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert state["step"] == 5
    if name == "data2vec_tiny":
        # the projection now trains like every other weight
        assert not torch.equal(state["model"]["post_extract_proj.weight"], torch.eye(32))
