"""The data2vec loss terms as functions: regression onto teacher targets, and the variance statistics
that fairseq logs and checks for collapse."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig


def regression_loss(pred: torch.Tensor, target: torch.Tensor, beta: float, scale: float) -> torch.Tensor:
    """Summed over frames and dimensions, times `scale` (fairseq: 1 / sqrt(D)); L2 or smooth L1."""
    if beta == 0:
        per_frame = F.mse_loss(pred.float(), target.float(), reduction="none").sum(-1)
    else:
        per_frame = F.smooth_l1_loss(pred.float(), target.float(), reduction="none", beta=beta).sum(-1)
    return per_frame.sum() * scale


def default_scale(cfg: ModelConfig) -> float:
    return cfg.loss_scale or 1.0 / math.sqrt(cfg.encoder_embed_dim)


def std_stats(y: torch.Tensor) -> torch.Tensor:
    """[count, sum, sum of squares] per dimension, for a variance that can be summed over ranks."""
    y = y.reshape(-1, y.shape[-1]).float()
    return torch.cat([y.new_tensor([y.shape[0]]), y.sum(0), (y * y).sum(0)])


def mean_std(stats: torch.Tensor) -> torch.Tensor:
    """fairseq `compute_var`: mean over dimensions of sqrt(unbiased variance + 1e-6); a 0-d
    tensor on the statistics' device (reading it on the host would stall the step)."""
    d = (stats.numel() - 1) // 2
    n, s, ss = stats[0], stats[1 : 1 + d], stats[1 + d :]
    var = ss / (n - 1) - s * s / (n * (n - 1))
    return torch.sqrt(var.clamp_min(0) + 1e-6).mean()
