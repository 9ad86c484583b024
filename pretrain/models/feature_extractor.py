"""The convolutional waveform encoder (fairseq `ConvFeatureExtractionModel`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models.conv_matmul import conv1d_channels_last, conv1d_phases


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 if it is of a lower precision (fp64 stays fp64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over channels of a (B, C, T) tensor, computed in fp32 (fairseq `Fp32LayerNorm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(_fp32(x.transpose(1, 2)), self.normalized_shape, _fp32(self.weight), _fp32(self.bias), self.eps)
        return y.transpose(1, 2).type_as(x)


class _Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in fp32 even under autocast (fairseq `Fp32GroupNorm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.group_norm(_fp32(x), self.num_groups, _fp32(self.weight), _fp32(self.bias), self.eps)
        return y.type_as(x)


class _TimeNorm(torch.autograd.Function):
    """GroupNorm with one group per channel (normalise over time) on a channels-last (B, T, C)
    tensor, with F.group_norm's arithmetic (y = x * a + b, a = gamma * rstd, b = beta - mean * a).
    Only x and the (B, C) statistics are kept; the backward is three passes over x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        n = x.shape[1]
        # var_mean over the outer time axis is slow here; sums over it are fast
        mean = x.sum(1, keepdim=True) / n
        var = _chunked_sum(x, lambda xc: (xc - mean).square_()) / n
        rstd = (var + eps).rsqrt_()
        a = rstd * weight
        ctx.save_for_backward(x, mean, rstd, weight)
        return torch.addcmul(bias - mean * a, x, a)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, mean, rstd, weight = ctx.saved_tensors
        n = x.shape[1]
        db = grad.sum(1, keepdim=True)  # (B, 1, C)
        dxy = _chunked_sum(x, lambda xc, i: xc * grad[:, i : i + xc.shape[1]], True) - mean * db  # sum_t grad (x - mean)
        a = rstd * weight
        # d/dx = a * grad + c1 * x + c0 (fairseq's / F.group_norm's gradient, regrouped)
        c1 = -a * rstd * rstd * dxy / n
        c0 = -a * db / n - c1 * mean
        gx = torch.addcmul(c0, x, c1).addcmul_(grad, a)
        gw = (dxy * rstd).sum((0, 1))
        return gx, gw, db.sum((0, 1)), None


def _chunked_sum(x: torch.Tensor, fn, with_start: bool = False, rows: int = 1024) -> torch.Tensor:
    """sum over time (dim 1) of fn(chunk), a chunk of rows at a time: the temporaries stay in cache."""
    total = None
    for i in range(0, x.shape[1], rows):
        xc = x[:, i : i + rows]
        part = (fn(xc, i) if with_start else fn(xc)).sum(1, keepdim=True)
        total = part if total is None else total.add_(part)
    return total


class ConvLayer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int, bias: bool, norm: str | None) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel, stride=stride, bias=bias)
        nn.init.kaiming_normal_(self.conv.weight)
        if norm == "group":
            self.norm: nn.Module | None = _Fp32GroupNorm(out_dim, out_dim, affine=True)
        elif norm == "layer":
            self.norm = _ChannelLayerNorm(out_dim, elementwise_affine=True)
        else:
            self.norm = None

    def forward(self, x: torch.Tensor, matmul: bool = False) -> torch.Tensor:  # (B, C, T)
        if matmul:
            x = conv1d_phases(x, self.conv.weight, self.conv.bias, self.conv.stride[0])
        else:
            x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return F.gelu(x)

    def forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C), CPU
        x = conv1d_channels_last(x, self.conv.weight, self.conv.bias, self.conv.stride[0])
        if isinstance(self.norm, _Fp32GroupNorm):
            n = self.norm
            x = _TimeNorm.apply(_fp32(x), _fp32(n.weight), _fp32(n.bias), n.eps).type_as(x)
        elif self.norm is not None:  # LayerNorm over channels: the last, contiguous axis here
            n = self.norm
            x = F.layer_norm(_fp32(x), n.normalized_shape, _fp32(n.weight), _fp32(n.bias), n.eps).type_as(x)
        return F.gelu(x)


class FeatureExtractor(nn.Module):
    """Waveform (B, S) -> features (B, T, C).

    mode "default": GroupNorm (one group per channel) after the first conv only (BASE);
    mode "layer_norm": LayerNorm over channels after every conv (LARGE-LV60k, data2vec).
    """

    def __init__(self, layers: list[tuple[int, int, int]], mode: str = "default", bias: bool = False) -> None:
        super().__init__()
        if mode not in ("default", "layer_norm"):
            raise ValueError(f"extractor_mode must be 'default' or 'layer_norm', got {mode!r}")
        self.layers_spec = [tuple(x) for x in layers]
        convs = []
        in_dim = 1
        for i, (dim, kernel, stride) in enumerate(self.layers_spec):
            norm = "layer" if mode == "layer_norm" else ("group" if i == 0 else None)
            convs.append(ConvLayer(in_dim, dim, kernel, stride, bias, norm))
            in_dim = dim
        self.conv_layers = nn.ModuleList(convs)
        #: on CPUs, the layers run as matrix products on channels-last tensors (see `conv_matmul`)
        self.matmul_on_cpu = True

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        if self.matmul_on_cpu and source.device.type == "cpu" and not torch.compiler.is_compiling():
            # (B, T, C) throughout: no phase copies, contiguous LayerNorms, no final transpose
            x = source.unsqueeze(-1)
            for layer in self.conv_layers:
                x = layer.forward_channels_last(x)
            return x
        x = source.unsqueeze(1)
        for layer in self.conv_layers:
            x = layer(x)
        return x.transpose(1, 2)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames produced from `lengths` samples (no padding in the convolutions)."""
        for _, kernel, stride in self.layers_spec:
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return lengths.clamp(min=0)
