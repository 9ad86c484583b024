"""data2vec-audio (fairseq `Data2VecAudioModel`): a student that regresses an EMA teacher's targets.

The student is the wav2vec 2.0 frontend and encoder (LayerNorm conv extractor, 5-layer
positional convolution) with a linear regression head; it sees the masked input. The teacher
(`pretrain.objectives.ema`) sees the same projected features unmasked and without dropout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pretrain.config import ModelConfig
from pretrain.models.masked_select import select_masked
from pretrain.models.wav2vec2 import Wav2Vec2Model


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
        num_masked: int | None = None,
    ) -> Data2VecOutput:
        """num_masked: the mask's True count, known on the host (saves reading it back)."""
        front = self.frontend(source, padding_mask)
        x = self.apply_mask(front.features, mask_indices)
        x, _ = self.encoder(x, front.padding_mask, layer_drop_draws)
        if mask_indices is not None:
            x = select_masked(x, mask_indices, num_masked)
        preds = self.final_proj(x)
        return Data2VecOutput(preds, front.projected.detach(), front.padding_mask, x)
