"""Dropout and attention kernels: the stock ones on GPUs, cheaper ones on CPUs.

On CPUs, drawing one random number per element dominates dropout (and attention dropout, which
sends `scaled_dot_product_attention` to its math path anyway). Here one 64-bit draw feeds four
elements: each 16-bit slice is compared with round(p * 2**16), so an element is dropped with
probability p to within 2**-16 of the requested value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    n = math.prod(shape)
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64).view(torch.int16)[:n]
    return (bits >= -32768 + round(p * 65536)).view(shape)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x * scale, 0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad * ctx.scale, 0.0), None, None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    return _MaskedScale.apply(x, _keep_mask(x.shape, p), 1.0 / (1.0 - p))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, p: float, training: bool
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with dropout on the weights; (B, H, T, d) tensors."""
    if not training or p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p if training else 0.0)
    weights = torch.matmul(q * (q.shape[-1] ** -0.5), k.transpose(-2, -1))
    if attn_mask is not None:
        weights = weights.masked_fill(~attn_mask, float("-inf"))
    weights = dropout(torch.softmax(weights, dim=-1), p, True)
    return torch.matmul(weights, v)
