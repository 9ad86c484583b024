"""Export to transformers, start from transformers, and feature extraction equal to transformers."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining, Wav2Vec2Model  # noqa: E402

from data_prep.sources import ManifestSource  # noqa: E402
from pretrain.training import checkpoint as ckpt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


@pytest.fixture(scope="module")
def tiny_run(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("w2v") / "run"
    subprocess.run([sys.executable, "-m", "pretrain", "--preset", "wav2vec2_tiny", "--data", str(prepared),
                    "--out", str(out), "--max-steps", "3"], check=True, capture_output=True, cwd=ROOT, env=ENV)
    return out


def _export(run, out):
    proc = subprocess.run([sys.executable, "-m", "pretrain.export", str(run), "--format", "hf", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return out


def test_export_loads_in_transformers_without_missing_weights(tiny_run, tmp_path):
    out = _export(tiny_run, tmp_path / "hf")
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}
    model, info = Wav2Vec2ForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert Wav2Vec2FeatureExtractor.from_pretrained(out).do_normalize is False
    ours = ckpt.load(tiny_run)["model"]
    assert torch.equal(model.quantizer.codevectors, ours["quantizer.vars"])


def test_init_from_transformers_directory(tiny_run, prepared, tmp_path):
    hf_dir = _export(tiny_run, tmp_path / "hf")
    run = tmp_path / "continued"
    proc = subprocess.run([sys.executable, "-m", "pretrain", "--preset", "wav2vec2_tiny", "--data", str(prepared),
                           "--out", str(run), "--init-from", str(hf_dir), "--max-steps", "1",
                           "--set", "optim.lr=0"], capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = ckpt.load(tiny_run)["model"], ckpt.load(run)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # lr 0: the weights are exactly the ones loaded
    bad = subprocess.run([sys.executable, "-m", "pretrain", "--preset", "wav2vec2_tiny", "--data", str(prepared),
                          "--out", str(tmp_path / "x"), "--init-from", str(tmp_path)], capture_output=True, text=True,
                         cwd=ROOT, env=ENV)
    assert bad.returncode == 2 and "config.json" in bad.stderr


def test_extracted_features_equal_transformers_last_hidden_state(tiny_run, prepared, tmp_path):
    out = tmp_path / "feats"
    proc = subprocess.run([sys.executable, "-m", "pretrain.extract", str(tiny_run), "--manifest",
                           str(prepared / "dev-clean.tsv"), "--out", str(out)], capture_output=True, text=True,
                          cwd=ROOT, env=ENV)
    assert proc.returncode == 0, proc.stderr
    src = ManifestSource(prepared / "dev-clean.tsv")
    assert sorted(p.stem for p in out.glob("*.npy")) == sorted(src.ids)
    hf = Wav2Vec2Model.from_pretrained(_export(tiny_run, tmp_path / "hf")).eval()
    for i in range(2):
        feats = np.load(out / f"{src.ids[i]}.npy")
        with torch.no_grad():
            ref = hf(torch.from_numpy(src.read(i))[None]).last_hidden_state[0].numpy()
        assert feats.shape == ref.shape
        assert np.abs(feats - ref).max() <= 1e-5 * np.abs(ref).max()
    layer1 = subprocess.run([sys.executable, "-m", "pretrain.extract", str(tiny_run), "--manifest",
                             str(prepared / "dev-clean.tsv"), "--out", str(tmp_path / "l1"), "--layer", "1"],
                            capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert layer1.returncode == 0
    a = np.load(tmp_path / "l1" / f"{src.ids[0]}.npy")
    assert a.shape == np.load(out / f"{src.ids[0]}.npy").shape and not np.allclose(a, np.load(out / f"{src.ids[0]}.npy"))
