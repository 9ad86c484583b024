"""`train.activation_checkpointing`: each encoder layer recomputed in the backward pass gives the
same loss and gradients as the plain run (dropout masks replayed, LayerDrop skips honoured)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import metric_rows, pretrain_cmd, run_ok

from data_prep.loader import Batch
from pretrain.build import build_task
from pretrain.presets import get_preset
from pretrain.models.encoder import set_activation_checkpointing


def step_grads(preset: str, checkpointing: bool, state: dict | None, layerdrop: float):
    cfg = get_preset(preset).model
    cfg.encoder_layerdrop = layerdrop
    torch.manual_seed(0)
    task = build_task(cfg)
    if state is not None:
        task.model.load_state_dict(state)
        if hasattr(task, "reset_teacher"):
            task.reset_teacher()
    set_activation_checkpointing(task.model, checkpointing)
    task.model.train()
    waves = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 24_000)).astype(np.float32) * 0.1)
    padding = torch.zeros(2, 24_000, dtype=torch.bool)
    padding[1, 20_000:] = True
    batch = Batch(waves, padding, torch.arange(2))
    torch.manual_seed(7)  # the dropout masks
    record = task.train_step(task.model, batch, np.random.default_rng([3, 0, 0]))
    record.loss.backward()
    grads = {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}
    return record.loss.detach().item(), grads, task.model.state_dict()


@pytest.mark.parametrize("preset", ["wav2vec2_tiny", "data2vec_tiny"])
@pytest.mark.parametrize("layerdrop", [0.0, 0.5])
def test_checkpointed_gradients_equal_plain(preset, layerdrop, monkeypatch):
    import pretrain.models.encoder as encoder

    calls = []
    real = encoder.checkpoint
    monkeypatch.setattr(encoder, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss, plain, state = step_grads(preset, False, None, layerdrop)
    assert not calls
    loss_ckpt, ckpt_grads, _ = step_grads(preset, True, state, layerdrop)
    assert calls  # the layers did run checkpointed (the teacher, under no_grad, never is)
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert plain.keys() == ckpt_grads.keys() and len(plain) > 10
    for name, g in plain.items():
        torch.testing.assert_close(ckpt_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_option_runs_and_matches_the_plain_run(prepared, tmp_path):
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        run_ok(pretrain_cmd("wav2vec2_tiny", prepared, out, "--max-steps", "3", "--set", "train.log_interval=1",
                            "--set", "train.valid_interval=1000", "--set", f"train.activation_checkpointing={flag}"))
        runs[flag] = [r["loss"] for r in metric_rows(out)]
    assert len(runs["true"]) == 3
    np.testing.assert_allclose(runs["true"], runs["false"], rtol=1e-5)
