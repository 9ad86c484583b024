"""A strided 1-D convolution on channels-last tensors computed as matrix products (CPU fast path).

For stride s and kernel k, output frame t reads input frames s*t .. s*t + k - 1. Grouping the
taps in blocks of s, block q reads frames s*(t + q) + r, r < min(s, k - s*q): for every t those
are `r_q * C` consecutive numbers in a (T, C) tensor, so block q is a strided view of the input
with row stride s*C and no copy. The convolution is then a sum of ceil(k/s) matrix products,
which reach the BLAS peak where oneDNN's direct convolution reaches less than half of it on the
shapes of the wav2vec 2.0 feature encoder (measured in benchmarks/wav2vec2_step.py).
"""

from __future__ import annotations

import torch


def _taps(weight: torch.Tensor, stride: int) -> list[torch.Tensor]:
    """(C_out, C, k) -> per block q a (r_q * C, C_out) matrix, rows ordered (tap, channel)."""
    c_out, c_in, k = weight.shape
    out = []
    for start in range(0, k, stride):
        r = min(stride, k - start)
        out.append(weight[:, :, start : start + r].permute(2, 1, 0).reshape(r * c_in, c_out))
    return out


def _block_view(x: torch.Tensor, t_out: int, width: int, stride_rows: int, offset: int) -> torch.Tensor:
    return x.as_strided((t_out, width), (stride_rows, 1), x.storage_offset() + offset)


class ConvAsMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int) -> torch.Tensor:
        x = x.contiguous()
        b, t, c = x.shape
        c_out, _, k = weight.shape
        t_out = (t - k) // stride + 1
        taps = _taps(weight, stride)
        y = x.new_empty(b, t_out, c_out)
        for i in range(b):
            for q, w in enumerate(taps):
                view = _block_view(x[i], t_out, w.shape[0], stride * c, q * stride * c)
                if q == 0:
                    torch.mm(view, w, out=y[i])
                else:
                    y[i].addmm_(view, w)
        if bias is not None:
            y += bias
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.has_bias = stride, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        s = ctx.stride
        grad = grad.contiguous()
        b, t, c = x.shape
        c_out, _, k = weight.shape
        t_out = grad.shape[1]
        taps = _taps(weight, s)
        gx = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for q, w in enumerate(taps):
            r = w.shape[0] // c
            gw_q = torch.zeros_like(w) if gw is not None else None
            for i in range(b):
                if gx is not None:
                    _block_view(gx[i], t_out, w.shape[0], s * c, q * s * c).addmm_(grad[i], w.t())
                if gw_q is not None:
                    gw_q.addmm_(_block_view(x[i], t_out, w.shape[0], s * c, q * s * c).t(), grad[i])
            if gw is not None:
                gw[:, :, q * s : q * s + r] = gw_q.view(r, c, c_out).permute(2, 1, 0)
        gb = grad.sum((0, 1)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


def conv1d_channels_last(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int) -> torch.Tensor:
    """(B, T, C) -> (B, T_out, C_out); same numbers as F.conv1d on the transposed tensor."""
    return ConvAsMatmul.apply(x, weight, bias, stride)
