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


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    # inside a compiled graph the stock op wins: inductor draws its mask in the fused kernel
    if x.device.type != "cpu" or p >= 1.0 or torch.compiler.is_compiling():
        return F.dropout(x, p, True)
    return _MaskedScale.apply(x, _keep_mask(x.shape, p), 1.0 / (1.0 - p))


class _CpuAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + mask) with dropout, times v, from the packed (B, T, 3*D) input
    projection to the (B, T, D) input of the output projection, with a hand-written backward.

    The (B*H, T, tk) weights are written by one GEMM, then normalised and gradient-filtered in
    place, so each step is one pass over them; the head split and merge are fused into the passes
    that scale q, the output and the incoming gradient, and autograd adds no copies (pad, slice
    fill, stack). 3-D bmm on (B*H, T, d) copies of q, k, v; keys are zero-padded to `tk`, a
    multiple of 16, and the padded keys get -inf (so the result is unchanged): batched GEMMs on
    odd sizes such as T=499 run at half speed here. The dropout mask is drawn over the padded weights.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, attn_mask: torch.Tensor | None, p: float, heads: int):
        b, t, d3 = qkv.shape
        h, d = heads, d3 // (3 * heads)
        q, k, v = qkv.view(b, t, 3, h, d).permute(2, 0, 3, 1, 4)  # (B, H, T, d) views
        tk = -(-t // 16) * 16
        q3 = q.new_empty(b * h, t, d)
        torch.mul(q, d**-0.5, out=q3.view(b, h, t, d))  # scaled and made contiguous in one pass
        k3, v3 = _padded(k, tk), _padded(v, tk)
        weights = torch.bmm(q3, k3.transpose(1, 2))
        if tk != t:
            weights[:, :, t:] = float("-inf")
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            weights.view(b, h, t, tk)[..., :t].masked_fill_(~attn_mask, float("-inf"))
        elif attn_mask is not None:  # an additive bias (ALiBi), broadcast over (B, H, T, T)
            weights.view(b, h, t, tk)[..., :t] += attn_mask.to(weights.dtype)
        probs = torch._softmax(weights, -1, False, out=weights)  # in place
        drop = _drop_mask(probs.shape, p)
        dropped = torch.where(drop, 0.0, probs)
        # the 1 / (1 - p) scale is applied to the (much smaller) output, with the head merge
        out = qkv.new_empty(b, t, h * d)
        torch.mul(torch.bmm(dropped, v3).view(b, h, t, d).transpose(1, 2), 1.0 / (1.0 - p), out=out.view(b, t, h, d))
        ctx.save_for_backward(q3, k3, v3, probs, dropped, drop)
        ctx.p, ctx.heads = p, heads
        ctx.bias_shape = attn_mask.shape if ctx.needs_input_grad[1] else None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q3, k3, v3, probs, dropped, drop = ctx.saved_tensors
        b, t, dm = grad.shape
        h, d, tk = ctx.heads, dm // ctx.heads, k3.shape[1]
        g = grad.new_empty(b * h, t, d)
        torch.mul(grad.view(b, t, h, d).transpose(1, 2), 1.0 / (1.0 - ctx.p), out=g.view(b, h, t, d))
        gqkv = grad.new_empty(b, t, 3, h, d)
        gq_out, gk_out, gv_out = (gqkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, d) views
        gv_out.copy_(torch.bmm(dropped.transpose(1, 2), g)[:, :t].view(b, h, t, d))
        gw = torch.bmm(g, v3.transpose(1, 2)).masked_fill_(drop, 0.0)
        # softmax backward in place (the kernel reads each row whole before writing it)
        torch.ops.aten._softmax_backward_data.out(gw, probs, -1, probs.dtype, grad_input=gw)
        # padded and masked keys have probability 0, so their columns of gw are 0
        torch.mul(torch.bmm(gw, k3).view(b, h, t, d), d**-0.5, out=gq_out)
        gk_out.copy_(torch.bmm(gw.transpose(1, 2), q3)[:, :t].view(b, h, t, d))
        gmask = None
        if ctx.bias_shape is not None:
            gmask = gw.view(b, h, t, tk)[..., :t].sum_to_size(ctx.bias_shape)
        return gqkv.view(b, t, 3 * dm), gmask, None, None


def _fast_path(x: torch.Tensor, p: float, training: bool) -> bool:
    return training and p > 0.0 and x.device.type == "cpu" and not torch.compiler.is_compiling()


def self_attention(
    qkv: torch.Tensor, heads: int, attn_mask: torch.Tensor | None, p: float, training: bool
) -> torch.Tensor:
    """Multi-head attention from the packed (B, T, 3*D) projection (q, k, v; heads within each)
    to (B, T, D); see `attention` for the mask."""
    if _fast_path(qkv, p, training):
        return _CpuAttention.apply(qkv, attn_mask, p, heads)
    b, t, d3 = qkv.shape
    q, k, v = qkv.view(b, t, 3, heads, d3 // (3 * heads)).permute(2, 0, 3, 1, 4)
    return attention(q, k, v, attn_mask, p, training).transpose(1, 2).reshape(b, t, d3 // 3)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, p: float, training: bool
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with dropout on the weights; (B, H, T, d) tensors.

    attn_mask: bool (True = attend) or an additive float bias, broadcastable to (B, H, T, T).
    Inside a compiled graph (`train.compile`) this is `scaled_dot_product_attention`, which inductor lowers."""
    if not _fast_path(q, p, training):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p if training else 0.0)
    b, h, t, d = q.shape
    qkv = torch.stack((q, k, v), 2).transpose(1, 3).reshape(b, t, 3 * h * d)  # (B, T, 3, H, d)
    return _CpuAttention.apply(qkv, attn_mask, p, h).view(b, t, h, d).transpose(1, 2)


def _padded(x: torch.Tensor, tk: int) -> torch.Tensor:
    """(B, H, T, d) -> contiguous (B*H, tk, d) with zero rows after T, in one copy."""
    b, h, t, d = x.shape
    out = x.new_empty(b * h, tk, d)
    out[:, t:].zero_()
    out[:, :t].view(b, h, t, d).copy_(x)
    return out
