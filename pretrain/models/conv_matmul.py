"""A strided 1-D convolution computed as matrix products on CPUs.

The feature encoder uses `conv1d_channels_last` (below, no copies of the input at all);
`conv1d_phases` keeps the (B, C, T) layout. With stride s, tap j of output frame t reads input frame s*t + j, which is frame t + j // s of
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
    return _apply(PhaseConv, "conv1d_phases", x, weight, bias, stride)


def _apply(fn: type[torch.autograd.Function], name: str, x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None, stride: int) -> torch.Tensor:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        # The kernels write into preallocated outputs, which autocast does not cast: cast the
        # operands once here (differentiably, so fp32 weights get fp32 gradients) and run them
        # with autocast off, so input, weights and outputs share one dtype.
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return fn.apply(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), stride)
    if weight.dtype != x.dtype:
        raise TypeError(f"{name}: input is {x.dtype} but weight is {weight.dtype}; cast one or use autocast")
    return fn.apply(x, weight, bias, stride)


class ChannelsLastConv(torch.autograd.Function):
    """The same convolution on channels-last (B, T, C) tensors, with no phase copies at all.

    Frames s*t .. s*t + s - 1 lie side by side in memory, so for a group of up to s consecutive
    taps the input of output frame t is one contiguous run of n*C values, and the runs of
    successive frames are s*C apart: a strided view that is a valid GEMM operand. A kernel of k
    taps is then ceil(k / s) GEMMs with K = s*C (layer 1: taps {0, 1} and {2}), each writing the
    (T_out, C_out) output in the layout the next layer reads. The input gradient is written into
    the same strided views. With few input values per frame (the waveform layer: C = 1) an im2col
    copy is small, and the whole kernel is one GEMM over every batch row.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int) -> torch.Tensor:
        x = x.contiguous()
        b, t, c = x.shape
        c_out, _, k = weight.shape
        t_out = (t - k) // stride + 1
        wt = weight.permute(0, 2, 1).reshape(c_out, k * c)  # column j*C + c: tap-major, like the runs
        if c * k <= 64:
            cols = x.unfold(1, k, stride) if c == 1 else None  # (B, T_out, k) view for C = 1
            if cols is None:
                cols = torch.stack([_run(x[i], 0, k, stride, t_out) for i in range(b)])
            cols = cols.reshape(b * t_out, k * c)  # the copy: k*C values per frame
            y = torch.mm(cols, wt.t()) if bias is None else torch.addmm(bias, cols, wt.t())
            y = y.view(b, t_out, c_out)
            ctx.save_for_backward(cols, wt)
        else:
            y = x.new_empty(b, t_out, c_out)
            for i in range(b):
                for j0 in range(0, k, stride):
                    n = min(stride, k - j0)
                    run, w = _run(x[i], j0, n, stride, t_out), wt[:, j0 * c : (j0 + n) * c].t()
                    if j0 == 0:
                        torch.mm(run, w, out=y[i]) if bias is None else torch.addmm(bias, run, w, out=y[i])
                    else:
                        y[i].addmm_(run, w)
            ctx.save_for_backward(x, wt)
        ctx.stride, ctx.shape, ctx.has_bias = stride, (b, t, c, k), bias is not None
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved, wt = ctx.saved_tensors
        s, (b, t, c, k) = ctx.stride, ctx.shape
        grad = grad.contiguous()
        _, t_out, c_out = grad.shape
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = gw = None
        if saved.dim() == 2:  # im2col path: `saved` holds the (B*T_out, k*C) columns
            g2 = grad.view(b * t_out, c_out)
            if want_w:
                gw = torch.mm(g2.t(), saved)
            if want_x:
                gcols = torch.mm(g2, wt).view(b, t_out, k, c)
                gx = grad.new_zeros(b, t, c)
                for j in range(k):
                    gx[:, j : j + s * (t_out - 1) + 1 : s] += gcols[:, :, j]
        else:
            x = saved
            if want_w:
                gw = torch.empty_like(wt)
                for j0 in range(0, k, s):
                    n = min(s, k - j0)
                    acc = None
                    for i in range(b):
                        run = _run(x[i], j0, n, s, t_out)
                        acc = torch.mm(grad[i].t(), run) if acc is None else acc.addmm_(grad[i].t(), run)
                    gw[:, j0 * c : (j0 + n) * c] = acc
            if want_x:
                # the first group writes (beta 0) every frame it covers; the rest are zeroed first
                gx = grad.new_zeros(b, t, c) if min(s, k) < s else grad.new_empty(b, t, c)
                if min(s, k) == s:
                    gx[:, s * t_out :].zero_()
                for i in range(b):
                    for j0 in range(0, k, s):
                        n = min(s, k - j0)
                        run = _run(gx[i], j0, n, s, t_out)
                        run.addmm_(grad[i], wt[:, j0 * c : (j0 + n) * c], beta=0 if j0 == 0 else 1)
        if gw is not None:
            gw = gw.view(c_out, k, c).permute(0, 2, 1)
        gb = grad.sum((0, 1)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


def _run(x: torch.Tensor, j0: int, n: int, stride: int, t_out: int) -> torch.Tensor:
    """(T_out, n*C) view of a contiguous (T, C) tensor: row t holds frames s*t + j0 .. s*t + j0 + n - 1."""
    c = x.shape[1]
    return x.as_strided((t_out, n * c), (stride * c, 1), x.storage_offset() + j0 * c)


def conv1d_channels_last(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int) -> torch.Tensor:
    """(B, T, C) -> (B, T_out, C_out): F.conv1d(x.transpose(1, 2), weight, bias, stride).transpose(1, 2)."""
    return _apply(ChannelsLastConv, "conv1d_channels_last", x, weight, bias, stride)


class GroupedConv(torch.autograd.Function):
    """A stride-1 grouped Conv1d ((B, C, T) -> (B, C_out, T + 2p - k + 1)) whose backward is two
    more forward convolutions, which oneDNN runs ~1.7x as fast as its own backward on the
    positional convolution's shapes (k = 128, 16 groups; 150 against 250 ms for BASE on 2 x 10 s,
    2 cores). The input gradient is the output gradient convolved with the flipped, transposed
    kernel; the weight gradient is a convolution of the padded input, with batch and time as the
    contracted axes and the output gradient as its kernel (k outputs, one per tap)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, groups: int):
        x = x.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.groups, ctx.has_bias = padding, groups, bias is not None
        return torch.nn.functional.conv1d(x, weight, bias, padding=padding, groups=groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        p, g = ctx.padding, ctx.groups
        grad = grad.contiguous()
        (b, c, t), (c_out, ci, k) = x.shape, weight.shape
        co, t_out = c_out // g, grad.shape[2]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            flipped = weight.view(g, co, ci, k).transpose(1, 2).flip(-1).reshape(c, co, k)
            gx = torch.nn.functional.conv1d(grad, flipped, None, padding=k - 1 - p, groups=g)
        if ctx.needs_input_grad[1]:
            inp = torch.nn.functional.pad(x, (p, p)).view(b, g, ci, t + 2 * p).permute(2, 1, 0, 3).reshape(ci, g * b, -1)
            kernel = grad.view(b, g, co, t_out).permute(1, 2, 0, 3).reshape(g * co, b, t_out)
            gw = torch.nn.functional.conv1d(inp, kernel, None, groups=g).permute(1, 0, 2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum((0, 2))
        return gx, gw, gb, None, None


def grouped_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, groups: int) -> torch.Tensor:
    """F.conv1d(x, weight, bias, padding=padding, groups=groups), with `GroupedConv`'s backward on
    CPUs (outside autocast and compiled graphs)."""
    if x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return torch.nn.functional.conv1d(x, weight, bias, padding=padding, groups=groups)
    return GroupedConv.apply(x, weight, bias, padding, groups)
