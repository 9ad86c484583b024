"""A strided 1-D convolution computed as matrix products (the CPU fast path of the feature encoder).

With stride s, tap j of output frame t reads input frame s*t + j, which is frame t + j // s of
phase j % s (the input frames r, r + s, r + 2s, ...). Each phase is copied once into a contiguous
(C, T / s) matrix, a cache-friendly stride-s read within each channel's row; then every tap is a
plain (C_out x C) @ (C x T_out) product over a column window of one phase. These products reach
the BLAS peak where oneDNN's direct convolution reaches about half of it on the shapes of the
wav2vec 2.0 feature encoder (see benchmarks/wav2vec2_step.py). Layout stays (B, C, T).
"""

from __future__ import annotations

import torch


class PhaseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int) -> torch.Tensor:
        b, _, t = x.shape
        c_out, _, k = weight.shape
        t_out = (t - k) // stride + 1
        phases = [x[:, :, r::stride].contiguous() for r in range(min(stride, k))]
        taps = weight.permute(2, 0, 1).contiguous()  # (k, C_out, C): each tap a contiguous matrix
        y = x.new_empty(b, c_out, t_out)
        for i in range(b):
            for j in range(k):
                window = phases[j % stride][i, :, j // stride : j // stride + t_out]
                if j == 0:
                    torch.mm(taps[0], window, out=y[i])
                else:
                    y[i].addmm_(taps[j], window)
        if bias is not None:
            y += bias[:, None]
        ctx.save_for_backward(taps, *phases)
        ctx.stride, ctx.length, ctx.has_bias = stride, t, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        taps, *phases = ctx.saved_tensors
        s = ctx.stride
        grad = grad.contiguous()
        b, c_out, t_out = grad.shape
        k = taps.shape[0]
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gw = grad.new_empty(c_out, phases[0].shape[1], k) if want_w else None
        gphases = [torch.empty_like(p) for p in phases] if want_x else None
        for j in range(k):
            acc = None
            for i in range(b):
                window = phases[j % s][i, :, j // s : j // s + t_out]
                if want_w:
                    acc = torch.mm(grad[i], window.t()) if acc is None else acc.addmm_(grad[i], window.t())
                if want_x:
                    target = gphases[j % s][i]
                    if j < s:  # the first tap of a phase overwrites (beta 0) and clears the rest
                        target[:, t_out:].zero_()
                        target[:, :t_out].addmm_(taps[j].t(), grad[i], beta=0)
                    else:
                        target[:, j // s : j // s + t_out].addmm_(taps[j].t(), grad[i])
            if want_w:
                gw[:, :, j] = acc
        gx = None
        if want_x:
            # every input frame belongs to one of the s phases (k >= s), so all get written
            make = grad.new_empty if len(phases) == s else grad.new_zeros
            gx = make(b, phases[0].shape[1], ctx.length)
            for r, g in enumerate(gphases):
                gx[:, :, r::s] = g
        gb = grad.sum((0, 2)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


def conv1d_phases(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int) -> torch.Tensor:
    """(B, C, T) -> (B, C_out, T_out); the same numbers as F.conv1d(x, weight, bias, stride),
    in the autocast dtype under autocast (as F.conv1d would be)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        # The kernel writes into preallocated outputs, which autocast does not cast: cast the
        # operands once here (differentiably, so fp32 weights get fp32 gradients) and run it
        # with autocast off, so input, weights and outputs share one dtype.
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return PhaseConv.apply(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), stride)
    if weight.dtype != x.dtype:
        raise TypeError(f"conv1d_phases: input is {x.dtype} but weight is {weight.dtype}; cast one or use autocast")
    return PhaseConv.apply(x, weight, bias, stride)
