"""data2vec-audio (fairseq `Data2VecAudioModel`): a student that regresses an EMA teacher's targets.

The student is the wav2vec 2.0 frontend and encoder (LayerNorm conv extractor, 5-layer
positional convolution) with a linear regression head; it sees the masked input. The teacher
(`pretrain.ema`) sees the same projected features unmasked and without dropout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .model import Wav2Vec2Model


@dataclass
class Data2VecOutput:
    predictions: torch.Tensor
    """(N, D) regression-head outputs at the N masked frames (batch-major order)."""
    teacher_input: torch.Tensor
    """(B, T, D) projected features before dropout and masking, detached."""
    padding_mask: torch.Tensor | None
    encoder_out: torch.Tensor


class Data2VecModel(Wav2Vec2Model):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.final_proj = nn.Linear(cfg.encoder_embed_dim, cfg.encoder_embed_dim)

    def forward(  # type: ignore[override]
        self,
        source: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        mask_indices: torch.Tensor | None = None,
        layer_drop_draws: torch.Tensor | None = None,
    ) -> Data2VecOutput:
        front = self.frontend(source, padding_mask)
        x = self.apply_mask(front.features, mask_indices)
        x, _ = self.encoder(x, front.padding_mask, layer_drop_draws)
        preds = self.final_proj(x[mask_indices]) if mask_indices is not None else self.final_proj(x)
        return Data2VecOutput(preds, front.projected.detach(), front.padding_mask, x)


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


def mean_std(stats: torch.Tensor) -> float:
    """fairseq `compute_var`: mean over dimensions of sqrt(unbiased variance + 1e-6)."""
    d = (stats.numel() - 1) // 2
    n, s, ss = stats[0], stats[1 : 1 + d], stats[1 + d :]
    var = ss / (n - 1) - s * s / (n * (n - 1))
    return float(torch.sqrt(var.clamp_min(0) + 1e-6).mean())
