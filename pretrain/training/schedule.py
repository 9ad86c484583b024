"""Learning-rate schedules as multipliers of the peak lr, per update (fairseq semantics)."""

from __future__ import annotations

import math

from pretrain.config import OptimConfig


def polynomial_decay(step: int, warmup: int, total: int, lr: float, end_lr: float, power: float) -> float:
    """Linear warm-up from 0 to lr over `warmup` updates, then (lr - end) * (1 - progress)**power + end."""
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    if step >= total:
        return end_lr
    remaining = 1 - (step - warmup) / max(1, total - warmup)
    return (lr - end_lr) * remaining**power + end_lr


def tri_stage(step: int, total: int, lr: float, phases: list, init_scale: float, final_scale: float) -> float:
    """Linear warm-up from init_scale*lr, hold at lr, then exponential decay to final_scale*lr."""
    warmup, hold, decay = (int(round(p * total)) for p in phases)
    init_lr, final_lr = init_scale * lr, final_scale * lr
    if step < warmup:
        return init_lr + (lr - init_lr) * step / max(1, warmup)
    step -= warmup
    if step < hold:
        return lr
    step -= hold
    if step <= decay:
        return lr * math.exp(math.log(final_scale) * step / max(1, decay))
    return final_lr


def cosine(step: int, warmup: int, total: int, lr: float) -> float:
    """fairseq `cosine` with warmup_init_lr = min_lr = 0: lr * step / warmup, then
    lr / 2 * (1 + cos(pi * progress)) over the remaining `total - warmup` updates."""
    if step < warmup:
        return lr * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * lr * (1 + math.cos(math.pi * progress))


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    if cfg.schedule == "polynomial_decay":
        return polynomial_decay(step, cfg.warmup_updates, total_steps, cfg.lr, cfg.end_lr, cfg.power)
    if cfg.schedule == "tri_stage":
        return tri_stage(step, total_steps, cfg.lr, cfg.phase_ratio, cfg.init_lr_scale, cfg.final_lr_scale)
    if cfg.schedule == "cosine":
        return cosine(step, cfg.warmup_updates, total_steps, cfg.lr)
    raise ValueError(f"unknown optim.schedule {cfg.schedule!r}; use polynomial_decay, tri_stage or cosine")
