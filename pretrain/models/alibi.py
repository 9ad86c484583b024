"""ALiBi attention biases (Press et al. 2022) as data2vec 2.0 uses them for audio.

Each head h adds -slope_h * |i - j| to its attention logits; data2vec 2.0 multiplies the biases by
a learned per-head scale (clamped at 0, shared by every layer). The bias is computed from frame
positions, so a student that sees only its kept frames gets the distances of the original time axis.
"""

from __future__ import annotations

import math

import torch

from pretrain.models.masked_select import padding_or_none


def alibi_slopes(num_heads: int) -> list[float]:
    """The standard ALiBi slopes: 2^(-8h/n) for n a power of two; otherwise the slopes of the next
    lower power of two followed by every other slope of the next higher one (fairseq `get_alibi`)."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    lower = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(lower) + alibi_slopes(2 * lower)[0::2][: num_heads - lower]


def alibi_bias(
    positions: torch.Tensor, slopes: torch.Tensor, scale: torch.Tensor | None, padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, H, T, T) fp32 additive attention bias: -slope_h * scale_h * |pos_i - pos_j|.

    positions: (N, T) or (T,) frame indices; slopes: (H,); scale: (H,) learned multipliers or None;
    padding_mask: (N, T) True at padded keys, which get -inf.
    """
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    dist = (positions[:, None, :] - positions[:, :, None]).abs().float()  # (N, T, T)
    per_head = slopes.float()
    if scale is not None:
        per_head = per_head * scale.float().clamp_min(0)
    bias = -per_head[None, :, None, None] * dist[:, None]
    if padding_or_none(padding_mask) is not None:
        bias = bias.masked_fill(padding_mask[:, None, None, :], float("-inf"))
    return bias
