"""data2vec-audio: parity with transformers, EMA and targets by hand, learning, exact resume, export."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import metric_rows, pretrain_cmd

transformers = pytest.importorskip("transformers")
from transformers import Data2VecAudioConfig, Data2VecAudioModel  # noqa: E402

from pretrain.config import apply_overrides  # noqa: E402
from pretrain.interop.hf import from_hf, hf_config, to_hf  # noqa: E402
from pretrain.models.data2vec import Data2VecModel  # noqa: E402
from pretrain.objectives.data2vec_loss import mean_std, regression_loss, std_stats  # noqa: E402
from pretrain.objectives.ema import EMATeacher, build_targets, ema_decay_at  # noqa: E402
from pretrain.presets import get_preset  # noqa: E402
from pretrain.training import checkpoint as ckpt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _close(a, b, rtol=1e-5):
    err = (a.double() - b.double()).abs().max() / b.double().abs().max()
    assert err <= rtol, f"relative error {err:.2e}"


def _small_cfg():
    cfg = get_preset("data2vec_tiny").model
    cfg.conv_feature_layers = [(96, 10, 5)] + [(96, 3, 2)] * 4 + [(96, 2, 2)] * 2
    cfg.encoder_layers, cfg.conv_pos, cfg.pos_conv_depth = 3, 95, 5  # 5 layers of kernel 19, as LARGE
    cfg.dropout = cfg.attention_dropout = 0.0
    return cfg


def test_large_preset_matches_the_reference_encoder_size():
    model = Data2VecModel(get_preset("data2vec_large").model)
    encoder = {k: v for k, v in model.state_dict().items() if not k.startswith("final_proj.")}
    assert sum(v.numel() for v in encoder.values()) == 313_276_416
    assert len(to_hf(encoder, "")) == 422
    assert model.encoder.pos_conv.layers[0].conv.weight.shape == (1024, 64, 19)


@pytest.mark.parametrize("direction", ["export", "import"])
def test_encoder_output_matches_transformers(direction):
    cfg = _small_cfg()
    torch.manual_seed(0)
    ours = Data2VecModel(cfg).eval()
    hf = Data2VecAudioModel(Data2VecAudioConfig(**hf_config(cfg, normalize=True))).eval()
    if direction == "export":
        with torch.no_grad():
            for name, p in ours.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
        state = {k: v for k, v in ours.state_dict().items() if not k.startswith("final_proj.")}
        missing, unexpected = hf.load_state_dict(to_hf(state, ""), strict=False)
        assert not missing and not unexpected
    else:
        missing, unexpected = ours.load_state_dict(from_hf(hf.state_dict()), strict=False)
        assert missing == ["final_proj.weight", "final_proj.bias"] and not unexpected
    wav = torch.randn(2, 24_000) * 0.1
    with torch.no_grad():
        out = ours(wav)
        ref = hf(wav).last_hidden_state
    _close(out.encoder_out, ref)


def test_ema_update_by_hand():
    cfg = _small_cfg()
    student = Data2VecModel(cfg)
    teacher = EMATeacher(student.encoder)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    with torch.no_grad():
        for p in student.encoder.parameters():
            p.add_(1.0)
    teacher.update(student.encoder, decay=0.9)
    after = teacher.model.state_dict()
    for name, value in student.encoder.state_dict().items():
        if name.startswith("pos_conv."):
            assert torch.equal(after[name], value)  # copied, not averaged
        else:
            assert torch.allclose(after[name], 0.9 * before[name] + 0.1 * value, atol=1e-6)
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert ema_decay_at(0, 0.999, 0.9999, 30_000) == 0.999
    assert abs(ema_decay_at(15_000, 0.999, 0.9999, 30_000) - 0.99945) < 1e-12
    assert ema_decay_at(30_000, 0.999, 0.9999, 30_000) == ema_decay_at(10**6, 0.999, 0.9999, 30_000) == 0.9999


def test_targets_by_hand():
    rng = np.random.default_rng(0)
    layers = [rng.normal(i, 1 + i, (2, 6, 3)) for i in range(4)]
    expected = np.zeros((2, 6, 3))
    for y in layers[-2:]:  # top 2 of 4
        expected += (y - y.mean(1, keepdims=True)) / np.sqrt(y.var(1, keepdims=True) + 1e-5)
    expected /= 2
    got = build_targets([torch.from_numpy(y) for y in layers], 2, instance_norm=True)
    assert np.allclose(got.numpy(), expected, atol=1e-5)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, [1, 4]] = True
    mask[1, [0, 5]] = True
    picked = got[mask]  # masked selection: batch-major, time order
    assert np.allclose(picked.numpy(), expected[[0, 0, 1, 1], [1, 4, 0, 5]], atol=1e-5)
    plain = build_targets([torch.from_numpy(y) for y in layers], 3, instance_norm=False)
    assert np.allclose(plain.numpy(), sum(layers[-3:]) / 3)


def test_loss_and_variance_by_hand():
    pred, target = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert float(regression_loss(pred, target, 0.0, 0.5)) == pytest.approx(0.5 * (1 + 4 + 1 + 1))
    y = torch.randn(50, 4)
    assert mean_std(std_stats(y)) == pytest.approx(float(torch.sqrt(y.var(0) + 1e-6).mean()), rel=1e-5)
    halves = std_stats(y[:20]) + std_stats(y[20:])  # what an all-reduce over two ranks sums
    assert mean_std(halves) == pytest.approx(mean_std(std_stats(y)), rel=1e-5)


def _cmd(data, out, *extra):
    return pretrain_cmd("data2vec_tiny", data, out, *extra)


def _rows(run, split="train"):
    return metric_rows(run, split)


@pytest.mark.slow
def test_tiny_data2vec_learns_without_collapse(prepared, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(_cmd(prepared, out), capture_output=True, text=True, cwd=ROOT, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, valid = _rows(out), _rows(out, "valid")
    assert train[-1]["step"] == 400
    # The teacher's targets change as it learns, so raw losses of different updates are not
    # comparable; relative to the loss of predicting zero (target_energy), the student starts
    # worse than that and ends better, on held-out audio too. Seeds 1 and 2 here: 1.32 / 1.29 at
    # update 50, 0.95 / 0.85 at update 400, 0.93 / 0.90 on validation; how far below 1 it gets by
    # update 400 varies with the seed and the CPU, that it gets there does not.
    first, last = (r["loss"] / r["target_energy"] for r in (train[0], train[-1]))
    assert first > 1.0 and last < first - 0.2, (train[0], train[-1])
    assert valid[-1]["loss"] / valid[-1]["target_energy"] < 0.97, valid[-1]
    cfg = get_preset("data2vec_tiny").model
    assert all(r["target_var"] > cfg.min_target_var and r["pred_var"] > cfg.min_pred_var for r in train)
    assert train[-1]["ema_decay"] == pytest.approx(0.999)
    hf_dir = tmp_path / "hf"
    exp = subprocess.run([sys.executable, "-m", "pretrain.export", str(out), "--format", "hf", "--out", str(hf_dir)],
                         capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert exp.returncode == 0, exp.stderr
    model, info = Data2VecAudioModel.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    feats = tmp_path / "feats"
    ext = subprocess.run([sys.executable, "-m", "pretrain.extract", str(out), "--manifest", str(prepared / "dev-clean.tsv"),
                          "--out", str(feats)], capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert ext.returncode == 0, ext.stderr
    from data_prep.loader import normalize_wave
    from data_prep.sources import ManifestSource

    src = ManifestSource(prepared / "dev-clean.tsv")
    with torch.no_grad():  # data2vec runs normalise each utterance first, as transformers' processor does
        ref = model.eval()(torch.from_numpy(normalize_wave(src.read(0)))[None]).last_hidden_state[0].numpy()
    got = np.load(feats / f"{src.ids[0]}.npy")
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    cont = subprocess.run(_cmd(prepared, tmp_path / "cont", "--init-from", str(hf_dir), "--max-steps", "1",
                               "--set", "optim.lr=0"), capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert cont.returncode == 0, cont.stderr[-2000:]
    state = ckpt.load(tmp_path / "cont")
    a = ckpt.load(out)["model"]
    assert all(torch.equal(state["model"][k], a[k]) for k in a if not k.startswith("final_proj."))
    # the teacher starts as a copy of the loaded encoder (one EMA step of equal weights: float rounding)
    assert torch.allclose(state["task"]["teacher"]["layers.0.fc1.weight"], a["encoder.layers.0.fc1.weight"], atol=1e-6)


def test_sigkill_resume_reproduces_run_and_teacher(prepared, tmp_path):
    extra = ["--max-steps", "24", "--set", "train.log_interval=1", "--set", "train.save_interval=8"]
    ref = tmp_path / "ref"
    subprocess.run(_cmd(prepared, ref, *extra), check=True, capture_output=True, cwd=ROOT, timeout=600)
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(prepared, run, *extra), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_00000008.pt").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    again = subprocess.run(_cmd(prepared, run, *extra), capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-2000:]
    assert [r["loss"] for r in _rows(ref)] == [r["loss"] for r in _rows(run)]
    assert [r["step"] for r in _rows(run)] == list(range(1, 25))
    t_ref, t_run = ckpt.load(ref)["task"]["teacher"], ckpt.load(run)["task"]["teacher"]
    assert all(torch.equal(t_ref[k], t_run[k]) for k in t_ref)


def test_collapse_guard_stops_with_advice(prepared, tmp_path):
    from pretrain.build import build_task
    from pretrain.objectives.data2vec_task import CollapseError
    from pretrain.training.metrics import MetricLogger
    from pretrain.training.trainer import Trainer

    cfg = apply_overrides(get_preset("data2vec_tiny"), ["model.collapse_check_after=2", "model.min_target_var=50",
                                                         "train.max_steps=10"])
    task = build_task(cfg.model)
    trainer = Trainer(cfg, task, tmp_path / "run", prepared, torch.device("cpu"))
    with pytest.raises(CollapseError, match="teacher targets collapsed at update 3.*lower optim.lr"):
        trainer.fit(MetricLogger(tmp_path / "run", 0))


def test_data2vec_always_has_the_feature_projection():
    """fairseq's Data2VecAudioModel builds post_extract_proj even when the widths agree (wav2vec 2.0
    leaves it out then); a state dict without it loads as the identity."""
    cfg = get_preset("data2vec_tiny").model
    assert cfg.conv_feature_layers[-1][0] == cfg.encoder_embed_dim
    model = Data2VecModel(cfg)
    assert isinstance(model.post_extract_proj, torch.nn.Linear)
    w2v = apply_overrides(get_preset("wav2vec2_tiny"), []).model
    from pretrain.models.wav2vec2 import Wav2Vec2Model

    assert Wav2Vec2Model(w2v).post_extract_proj is None  # same widths: wav2vec 2.0 skips it
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("post_extract_proj.")}
    fresh = Data2VecModel(cfg)
    fresh.load_state_dict(state)  # strict: the hook fills the projection in
    assert torch.equal(fresh.post_extract_proj.weight, torch.eye(cfg.encoder_embed_dim))
    assert not fresh.post_extract_proj.bias.any()
