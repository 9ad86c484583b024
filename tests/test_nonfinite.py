"""Skipped updates (non-finite loss or gradient, fp16 overflow) are counted, logged and printed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import metric_rows

from pretrain.config import apply_overrides
from pretrain.objectives.wav2vec2_task import Wav2Vec2Task
from pretrain.presets import get_preset
from pretrain.training import checkpoint as ckpt
from pretrain.training.metrics import MetricLogger
from pretrain.training.trainer import Trainer, TrainingError


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss with a non-finite backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


class PoisonedTask(Wav2Vec2Task):
    """wav2vec 2.0 whose train steps number `poisoned` (1-based) give a NaN loss or a NaN gradient."""

    def __init__(self, cfg, poisoned: set[int] | None = None, grad_only: bool = False) -> None:
        super().__init__(cfg)
        self.poisoned, self.grad_only, self.calls = poisoned, grad_only, 0

    def train_step(self, model, batch, rng):
        record = super().train_step(model, batch, rng)
        self.calls += 1
        if self.poisoned is None or self.calls in self.poisoned:
            record.loss = _NaNGrad.apply(record.loss) if self.grad_only else record.loss * float("nan")
        return record


def _trainer(prepared: Path, run: Path, *overrides: str, **poison) -> Trainer:
    cfg = apply_overrides(get_preset("wav2vec2_tiny"), ["train.valid_interval=1000", "train.save_interval=1000",
                                                        *overrides])
    return Trainer(cfg, PoisonedTask(cfg.model, **poison), run, prepared, torch.device("cpu"))


def test_skipped_updates_reach_metrics_tensorboard_and_console(prepared, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    trainer = _trainer(prepared, run, "train.max_steps=4", "train.log_interval=2", poisoned={2, 3})
    logger = MetricLogger(run, 0)
    trainer.fit(logger)
    logger.close()
    assert trainer.step == 4 and trainer.skipped_updates == 2 and trainer.bad_steps == 0

    rows = metric_rows(run)
    assert [(r["step"], r["skipped"]) for r in rows] == [(2, 2), (4, 0)]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/skipped")] == [(2, 2.0), (4, 0.0)]
    out = capsys.readouterr().out
    assert "update 2 skipped: non-finite loss (1 in a row, 1 in total)" in out
    assert "update 2 skipped: non-finite loss (2 in a row, 2 in total)" in out
    assert "train.max_bad_steps" in out


def test_non_finite_gradient_is_named_as_such(prepared, tmp_path, capsys):
    trainer = _trainer(prepared, tmp_path / "run", "train.max_steps=2", "train.log_interval=2",
                       poisoned={1}, grad_only=True)
    trainer.fit(MetricLogger(tmp_path / "run", 0))
    assert trainer.step == 2 and trainer.skipped_updates == 1
    assert "update 1 skipped: non-finite gradient (1 in a row, 1 in total)" in capsys.readouterr().out


@pytest.mark.parametrize("grad_only", [False, True])
def test_fp16_scaler_backs_off_on_a_non_finite_update(prepared, tmp_path, capsys, grad_only):
    trainer = _trainer(prepared, tmp_path / "run", "train.max_steps=2", "train.log_interval=2",
                       poisoned={1}, grad_only=grad_only)
    # the fp16 GradScaler path without a GPU: the scaler alone, no fp16 autocast
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=128.0, enabled=True)
    trainer.fit(MetricLogger(tmp_path / "run", 0))
    assert trainer.step == 2 and trainer.skipped_updates == 1
    assert trainer.scaler.get_scale() == 64.0
    reason = "non-finite gradient" if grad_only else "non-finite loss"
    assert f"update 1 skipped: {reason} (fp16 overflow: loss scale lowered to 64)" in capsys.readouterr().out


def test_stop_names_the_last_checkpoint_or_where_checkpoints_go(prepared, tmp_path, capsys):
    run = tmp_path / "run"
    trainer = _trainer(prepared, run, "train.max_steps=5", "train.max_bad_steps=2")
    with pytest.raises(TrainingError, match=r"no checkpoint was saved yet \(they go to (.*)\)") as err:
        trainer.fit(MetricLogger(run, 0))
    where = re.search(r"they go to (.*)\)", str(err.value)).group(1)
    assert Path(where) == ckpt.checkpoint_dir(run).resolve()

    trainer = _trainer(prepared, run, "train.max_steps=5", "train.max_bad_steps=2")
    trainer.step = 3
    trainer.save()  # where a real run's checkpoints are: RUN/checkpoints/step_N.pt
    saved = ckpt.latest(run)
    assert saved.parent == (run / "checkpoints").resolve()
    with pytest.raises(TrainingError) as err:
        trainer.fit(MetricLogger(run, 3))
    message = str(err.value)
    assert "2 consecutive updates were skipped (the last, update 4: non-finite loss)" in message
    assert f"the last good checkpoint is {saved}," in message and "optim.clip_norm" in message
    assert "update 4 skipped: non-finite loss (2 in a row, 2 in total)" in capsys.readouterr().out
