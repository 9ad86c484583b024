"""train.precision: checked values, bf16 autocast on the CPU kernels, the fp16-on-CPU fallback."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import finetune_cmd, metric_rows, pretrain_cmd

from pretrain.config import RunConfig, apply_overrides
from pretrain.presets import get_preset

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm())


# -- 1. only fp32, bf16 and fp16 ------------------------------------------------------------------
def test_unknown_precision_is_refused_by_every_way_of_building_a_config(tmp_path):
    with pytest.raises(ValueError, match="train.precision must be one of fp32, bf16, fp16, got 'fp8'"):
        apply_overrides(get_preset("wav2vec2_tiny"), ["train.precision=fp8"])
    d = get_preset("wav2vec2_tiny").to_dict()
    d["train"]["precision"] = "bfloat16"
    with pytest.raises(ValueError, match="train.precision must be one of"):
        RunConfig.from_dict(d)
    for ok in ("fp32", "bf16", "fp16"):
        assert apply_overrides(get_preset("wav2vec2_tiny"), [f"train.precision={ok}"]).train.precision == ok

    # a config built in code: the trainer refuses it before it opens the data directory
    from pretrain.build import build_task
    from pretrain.training.trainer import Trainer

    cfg = get_preset("wav2vec2_tiny")
    cfg.train.precision = "half"
    with pytest.raises(ValueError, match="got 'half'"):
        Trainer(cfg, build_task(cfg.model), tmp_path / "run", tmp_path / "no-data", torch.device("cpu"))


def test_command_lines_exit_2_on_unknown_precision(tmp_path):
    bad = subprocess.run(pretrain_cmd("wav2vec2_tiny", tmp_path / "no-data", tmp_path / "run",
                                      "--set", "train.precision=fp8"), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "train.precision must be one of fp32, bf16, fp16, got 'fp8'" in bad.stderr
    assert not (tmp_path / "run").exists()

    # fine-tuning reads the same override through apply_overrides: a small pretraining checkpoint to start from
    from pretrain.build import build_task
    from pretrain.training import checkpoint as ckpt

    cfg = get_preset("wav2vec2_tiny")
    ckpt.save(tmp_path / "pre", 0, {"config": cfg.to_dict(), "model": build_task(cfg.model).model.state_dict()}, 1)
    bad = subprocess.run(finetune_cmd(tmp_path / "pre", tmp_path / "no-data", tmp_path / "ft",
                                      "--set", "train.precision=fp8"), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "train.precision must be one of fp32, bf16, fp16, got 'fp8'" in bad.stderr


# -- 2. bf16 on a CPU -------------------------------------------------------------------------------
def test_matmul_conv_runs_under_bf16_autocast():
    from pretrain.models.conv_matmul import conv1d_phases

    torch.manual_seed(0)
    x = torch.randn(2, 16, 101, dtype=torch.bfloat16, requires_grad=True)  # bf16, as the layer before returns it
    w = torch.randn(24, 16, 3, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    with torch.autocast(**BF16):
        y = conv1d_phases(x, w, b, 2)
        ref = F.conv1d(x, w, b, stride=2)
    assert y.dtype == ref.dtype == torch.bfloat16
    assert _rel_err(y, ref) < 2e-2
    y.float().square().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert all(bool(torch.isfinite(g).all()) for g in (w.grad, b.grad, x.grad))
    with pytest.raises(TypeError, match="bfloat16 but weight is torch.float32"):
        conv1d_phases(x.detach(), w, b, 2)  # without autocast, mixed dtypes are a caller's mistake


def test_cpu_attention_and_dropout_under_bf16_autocast():
    from pretrain.models.ops import attention, dropout

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 13, 8) for _ in range(3))  # 13 keys: padded to 16 inside the CPU path
    mask = torch.ones(2, 1, 1, 13, dtype=torch.bool)
    mask[1, ..., 9:] = False
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with torch.autocast(**BF16):
        # p this small drops nothing, so the CPU path must give plain attention
        got = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, 1e-9, training=True)
        dropped = dropout(torch.ones(1000, dtype=torch.bfloat16), 0.5, training=True)
    assert got.dtype == torch.bfloat16 and _rel_err(got, want) < 2e-2
    assert dropped.dtype == torch.bfloat16 and set(dropped.unique().tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize("preset", ["wav2vec2_tiny", "data2vec_tiny"])
def test_bf16_forward_and_loss_stay_close_to_fp32(preset):
    from pretrain.build import build_task
    from pretrain.objectives.masking import compute_mask_indices, sample_negatives

    cfg = get_preset(preset)
    torch.manual_seed(0)
    task = build_task(cfg.model)
    model = task.model.eval()
    source = torch.randn(2, 24_000)
    padding = torch.zeros(2, 24_000, dtype=torch.bool)
    padding[1, 17_000:] = True  # padded frames: the attention mask path
    frames = int(model.feature_extractor.output_lengths(torch.tensor(24_000)))
    rng = np.random.default_rng(0)
    mask = torch.from_numpy(compute_mask_indices((2, frames), None, 0.65, 10, rng, 2))
    extra = (torch.from_numpy(sample_negatives(2, int(mask[0].sum()), cfg.model.num_negatives, rng)),)
    extra = extra if preset.startswith("wav2vec2") else ()
    with torch.no_grad():
        want = model(source, padding, mask, *extra)
        with torch.autocast(**BF16):
            got = model(source, padding, mask, *extra)
    assert got.encoder_out.dtype == torch.bfloat16
    assert _rel_err(got.encoder_out, want.encoder_out) < 5e-2
    if preset.startswith("wav2vec2"):
        from pretrain.objectives.wav2vec2_loss import wav2vec2_loss

        assert got.logits.dtype == torch.float32  # cosine logits are computed in fp32 under autocast
        with torch.autocast(**BF16):
            loss = wav2vec2_loss(got, 0.1, 10.0).loss
        assert loss.dtype == torch.float32
        assert math.isclose(float(loss), float(wav2vec2_loss(want, 0.1, 10.0).loss), rel_tol=5e-2)
    else:
        assert _rel_err(got.predictions, want.predictions) < 5e-2


@pytest.mark.parametrize("preset", ["wav2vec2_tiny", "data2vec_tiny"])
def test_short_bf16_runs_on_cpu(preset, prepared, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        pretrain_cmd(preset, prepared, out, "--max-steps", "20", "--device", "cpu", "--set", "train.precision=bf16",
                     "--set", "train.log_interval=5", "--set", "train.valid_interval=20"),
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = metric_rows(out)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in rows), rows
    assert math.isfinite(metric_rows(out, "valid")[-1]["loss"])


def test_fp16_on_cpu_falls_back_to_fp32_and_says_so(prepared, tmp_path, caplog):
    from pretrain.build import build_task
    from pretrain.training.trainer import Trainer

    cfg = apply_overrides(get_preset("wav2vec2_tiny"), ["train.precision=fp16"])
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(cfg, build_task(cfg.model), tmp_path / "run", Path(prepared), torch.device("cpu"))
    assert trainer.precision == "fp32" and not trainer.scaler.is_enabled()
    assert "train.precision=fp16 needs a CUDA GPU; this run is on cpu and trains in fp32" in caplog.text
    assert "train.precision=bf16" in caplog.text


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
