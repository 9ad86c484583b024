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


def _random_int16(shape: torch.Size) -> torch.Tensor:
    n = math.prod(shape)
    return torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64).view(torch.int16)[:n].view(shape)


def _keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    return _random_int16(shape) >= -32768 + round(p * 65536)


def _drop_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """Exactly the complement of `_keep_mask` for the same random state."""
    return _random_int16(shape) < -32768 + round(p * 65536)


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


class _ZeroWhere(torch.autograd.Function):
    """x with the `drop` positions zeroed; the caller applies the 1 / (1 - p) scale elsewhere."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(drop)
        return torch.where(drop, 0.0, x)  # one pass (masked_fill would copy, then fill)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (drop,) = ctx.saved_tensors
        return torch.where(drop, 0.0, grad), None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    # inside a compiled graph the stock op wins: inductor draws its mask in the fused kernel
    if x.device.type != "cpu" or p >= 1.0 or torch.compiler.is_compiling():
        return F.dropout(x, p, True)
    return _MaskedScale.apply(x, _keep_mask(x.shape, p), 1.0 / (1.0 - p))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, p: float, training: bool
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with dropout on the weights; (B, H, T, d) tensors.

    attn_mask: bool (True = attend) or an additive float bias, broadcastable to (B, H, T, T).
    Inside a compiled graph (`train.compile`) this is `scaled_dot_product_attention`, which inductor lowers."""
    if not training or p == 0.0 or q.device.type != "cpu" or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p if training else 0.0)
    b, h, t, d = q.shape
    # 3-D bmm on (B*H, T, d): its backward reads the transposed weights in place, where a 4-D
    # matmul would copy them. Keys are padded to a multiple of 16 (masked with -inf, so the
    # result is unchanged): batched GEMMs on odd sizes such as T=499 run at half speed here.
    q3, k3, v3 = (x.reshape(b * h, t, d) for x in (q, k, v))
    tk = -(-t // 16) * 16
    if tk != t:
        k3, v3 = F.pad(k3, (0, 0, 0, tk - t)), F.pad(v3, (0, 0, 0, tk - t))
    weights = torch.bmm(q3 * (d**-0.5), k3.transpose(1, 2))
    if tk != t:
        weights[:, :, t:] = float("-inf")
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        weights.view(b, h, t, tk)[..., :t].masked_fill_(~attn_mask, float("-inf"))
    elif attn_mask is not None:  # an additive bias (ALiBi), broadcast over (B, H, T, T)
        weights.view(b, h, t, tk)[..., :t] += attn_mask.to(weights.dtype)
    # Dropout on the weights, with its 1 / (1 - p) applied to the (much smaller) output.
    weights = _ZeroWhere.apply(torch.softmax(weights, dim=-1), _drop_mask(weights.shape, p))
    return (torch.bmm(weights, v3) * (1.0 / (1.0 - p))).view(b, h, t, d)
