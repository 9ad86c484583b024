"""Schedules, checkpoint files, config overrides and the non-finite guard."""

import math
import os

import pytest
import torch

from pretrain.config import OptimConfig, apply_overrides
from pretrain.presets import PRESETS, get_preset
from pretrain.training import checkpoint as ckpt
from pretrain.training.schedule import lr_at, polynomial_decay, tri_stage


def test_polynomial_decay_matches_fairseq():
    assert polynomial_decay(0, 100, 1000, 1.0, 0.0, 1.0) == 0.0
    assert polynomial_decay(50, 100, 1000, 1.0, 0.0, 1.0) == 0.5
    assert polynomial_decay(100, 100, 1000, 1.0, 0.0, 1.0) == 1.0
    assert math.isclose(polynomial_decay(550, 100, 1000, 1.0, 0.0, 1.0), 0.5)
    assert polynomial_decay(1000, 100, 1000, 1.0, 0.0, 1.0) == 0.0


def test_tri_stage_phases():
    phases = [0.1, 0.4, 0.5]
    assert math.isclose(tri_stage(0, 1000, 1.0, phases, 0.01, 0.05), 0.01)
    assert math.isclose(tri_stage(50, 1000, 1.0, phases, 0.01, 0.05), 0.505)
    assert tri_stage(100, 1000, 1.0, phases, 0.01, 0.05) == 1.0
    assert tri_stage(499, 1000, 1.0, phases, 0.01, 0.05) == 1.0
    assert math.isclose(tri_stage(750, 1000, 1.0, phases, 0.01, 0.05), math.sqrt(0.05))  # exponential decay
    assert math.isclose(tri_stage(1000, 1000, 1.0, phases, 0.01, 0.05), 0.05)
    with pytest.raises(ValueError):
        lr_at(1, OptimConfig(schedule="inverse_sqrt"), 10)


def test_overrides_are_typed_and_checked():
    cfg = apply_overrides(get_preset("wav2vec2_tiny"), ["optim.lr=1e-4", "train.precision=bf16",
                                                        "optim.betas=[0.9, 0.95]", "data.max_sample_size=None"])
    assert cfg.optim.lr == 1e-4 and cfg.train.precision == "bf16" and cfg.optim.betas == [0.9, 0.95]
    assert cfg.data.max_sample_size is None
    for bad, msg in [("optim.lr=fast", "expects float"), ("model.nope=1", "unknown config key"),
                     ("lr=1", "unknown config key"), ("train.update_freq", "section.key=value")]:
        with pytest.raises(ValueError, match=msg):
            apply_overrides(get_preset("wav2vec2_tiny"), [bad])


def test_presets_derive_from_base():
    base, large = get_preset("wav2vec2_base"), get_preset("wav2vec2_large_lv60k")
    assert {"wav2vec2_tiny", "wav2vec2_base", "wav2vec2_large", "wav2vec2_large_lv60k"} <= set(PRESETS)
    assert base.model.mask_prob == large.model.mask_prob == 0.65
    assert large.model.layer_norm_first and large.model.extractor_mode == "layer_norm" and large.data.normalize
    assert base.optim.warmup_updates == 32_000 and base.train.max_steps == 400_000


def test_checkpoints_are_atomic_pruned_and_linked(tmp_path):
    for step in (10, 20, 30, 40):
        ckpt.save(tmp_path, step, {"step": step, "w": torch.ones(2) * step}, keep_last=2, is_best=step == 20)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best.pt", "last.pt", "step_00000020.pt", "step_00000030.pt", "step_00000040.pt"]
    assert os.readlink(tmp_path / "checkpoints" / "last.pt") == "step_00000040.pt"
    assert ckpt.load(tmp_path)["step"] == 40  # a run directory means its last checkpoint
    assert ckpt.load(tmp_path / "checkpoints" / "best.pt")["step"] == 20  # the best is kept
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        ckpt.resolve(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.resolve(tmp_path / "elsewhere.pt")


def test_corrupt_checkpoint_error_names_the_file(tmp_path):
    bad = tmp_path / "step_1.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="cannot read checkpoint .*step_1.pt"):
        ckpt.load(bad)


def test_nonfinite_updates_are_skipped_then_stop_with_advice(prepared, tmp_path):
    from pretrain.build import build_task
    from pretrain.training.metrics import MetricLogger
    from pretrain.training.trainer import Trainer, TrainingError

    cfg = apply_overrides(get_preset("wav2vec2_tiny"), ["train.max_bad_steps=3", "train.max_steps=5"])
    task = build_task(cfg.model)
    trainer = Trainer(cfg, task, tmp_path / "run", prepared, torch.device("cpu"))
    ckpt.save(tmp_path / "run", 0, trainer.state_dict(), keep_last=3)
    with torch.no_grad():
        task.model.final_proj.weight.fill_(float("nan"))
    before = {k: v.clone() for k, v in task.model.state_dict().items() if "final_proj" not in k}
    with pytest.raises(TrainingError, match="3 consecutive updates.*optim.lr.*clip_norm"):
        trainer.fit(MetricLogger(tmp_path / "run", 0))
    assert trainer.step == 0  # no update was applied
    after = task.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "run" / "checkpoints" / "step_00000000.pt").exists()
