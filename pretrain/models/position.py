"""Convolutional relative position embeddings added to the encoder input."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models.conv_matmul import grouped_conv1d


class PositionalConv(nn.Module):
    """wav2vec 2.0: one grouped Conv1d, weight-normed over the kernel axis, then GELU.

    An even kernel gives one frame too many; the last one is dropped (fairseq `SamePad`).
    """

    def __init__(self, dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4.0 / (kernel * dim)))
        nn.init.zeros_(conv.bias)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.remove = 1 if kernel % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        conv = self.conv  # the weight-normed weight is recomputed at each access, as in conv.forward
        y = grouped_conv1d(x.transpose(1, 2), conv.weight, conv.bias, conv.padding[0], conv.groups)
        if self.remove:
            y = y[:, :, : -self.remove]
        return F.gelu(y).transpose(1, 2)


class _PosConvBlock(nn.Module):
    def __init__(self, dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        self.remove = 1 if kernel % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T)
        y = self.conv(x)
        if self.remove:
            y = y[:, :, : -self.remove]
        y = F.layer_norm(y.transpose(1, 2), (y.shape[1],)).transpose(1, 2)  # no affine parameters
        return F.gelu(y)


class StackedPositionalConv(nn.Module):
    """data2vec: `depth` blocks of Conv1d -> LayerNorm (no affine) -> GELU, no weight norm.

    The kernel is max(3, total_kernel // depth): 19 for fairseq's conv_pos=95, depth=5.
    """

    def __init__(self, dim: int, total_kernel: int, groups: int, depth: int) -> None:
        super().__init__()
        kernel = max(3, total_kernel // depth)
        self.layers = nn.ModuleList(_PosConvBlock(dim, kernel, groups) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.transpose(1, 2)
        for layer in self.layers:
            y = layer(y)
        return y.transpose(1, 2)


def make_positional_conv(dim: int, kernel: int, groups: int, depth: int) -> nn.Module:
    return PositionalConv(dim, kernel, groups) if depth <= 1 else StackedPositionalConv(dim, kernel, groups, depth)
