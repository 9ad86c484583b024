"""The CTC model (fairseq `Wav2VecCtc`): a pretrained wav2vec 2.0 / data2vec / data2vec 2.0 encoder
and a linear projection to the output vocabulary."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from pretrain.config import ModelConfig
from pretrain.models.data2vec2 import Data2Vec2Model
from pretrain.models.ops import dropout
from pretrain.models.wav2vec2 import Wav2Vec2Model


def encoder_model(cfg: ModelConfig) -> Wav2Vec2Model | Data2Vec2Model:
    """The pretrained part without its pretraining heads (data2vec 2.0: no decoder)."""
    if cfg.arch == "data2vec2":
        return Data2Vec2Model(cfg, pretraining_heads=False)
    return Wav2Vec2Model(cfg, pretraining_heads=False)


class CTCModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, final_dropout: float = 0.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.w2v = encoder_model(cfg)
        self.final_dropout = final_dropout
        self.proj = nn.Linear(cfg.encoder_embed_dim, vocab_size)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(
        self,
        source: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        mask_indices: torch.Tensor | None = None,
        channel_mask: torch.Tensor | None = None,
        layer_drop_draws: torch.Tensor | None = None,
        frozen: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) and the frame padding mask (B, T) (None without padding).

        mask_indices: (B, T) frames replaced by the mask embedding (data2vec 2.0: by small
        noise); channel_mask: (B, C) encoder
        input channels zeroed at every frame; `frozen` runs the pretrained part under no_grad.
        """
        with torch.no_grad() if frozen else contextlib.nullcontext():
            front = self.w2v.frontend(source, padding_mask)
            x = self.w2v.apply_mask(front.features, mask_indices)
            if channel_mask is not None:
                x = x.masked_fill(channel_mask[:, None, :], 0.0)
            x, _ = self.w2v.encoder(x, front.padding_mask, layer_drop_draws)
        x = dropout(x, self.final_dropout, self.training)
        return self.proj(x), front.padding_mask

    @property
    def num_layers(self) -> int:
        """Blocks in the encoder, each with its own LayerDrop draw (data2vec 2.0: prenet included)."""
        return len(self.w2v.encoder.layers)

    def output_lengths(self, logits: torch.Tensor, frame_padding: torch.Tensor | None) -> torch.Tensor:
        b, t = logits.shape[:2]
        if frame_padding is None:
            return torch.full((b,), t, dtype=torch.long, device=logits.device)
        return (~frame_padding).long().sum(-1)


#: pretraining-only parameters that a CTC model does not take over
PRETRAINING_HEADS = ("quantizer.", "project_q.", "final_proj.", "regression_head.", "decoder.")
