"""data2vec 2.0's prediction decoder (fairseq `Decoder1d`): a few grouped convolutions over the whole
time axis, where masked positions hold noise, and a linear projection back to the model width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _DecoderBlock(nn.Module):
    """Conv1d (same padding) -> LayerNorm over channels without affine parameters -> GELU."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel, padding=kernel // 2, groups=groups)
        self.remove = 1 if kernel % 2 == 0 else 0  # fairseq `SamePad`

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, T)
        y = self.conv(x)
        if self.remove:
            y = y[:, :, : -self.remove]
        y = F.layer_norm(y.transpose(1, 2), (y.shape[1],)).transpose(1, 2)
        return F.gelu(y)


class Decoder1d(nn.Module):
    """(N, T, D) -> (N, T, D). A block whose input and output widths agree adds its input back
    (so with D != decoder_dim the first block has no residual, the others do)."""

    def __init__(self, dim: int, decoder_dim: int, kernel: int, num_layers: int, groups: int) -> None:
        super().__init__()
        widths = [dim] + [decoder_dim] * num_layers
        self.blocks = nn.ModuleList(_DecoderBlock(widths[i], decoder_dim, kernel, groups) for i in range(num_layers))
        self.proj = nn.Linear(decoder_dim, dim)  # PyTorch's default init, as fairseq resets it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.transpose(1, 2)
        for block in self.blocks:
            z = block(y)
            y = z + y if z.shape[1] == y.shape[1] else z
        return self.proj(y.transpose(1, 2))
