"""The convolutional waveform encoder (fairseq `ConvFeatureExtractionModel`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models.conv_matmul import conv1d_phases


class _ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over channels of a (B, C, T) tensor, computed in fp32 (fairseq `Fp32LayerNorm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.transpose(1, 2).float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return y.transpose(1, 2).type_as(x)


class _Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in fp32 even under autocast (fairseq `Fp32GroupNorm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return y.type_as(x)


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
        #: on CPUs, layers after the first run as matrix products (see `conv_matmul`)
        self.matmul_on_cpu = True

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        x = source.unsqueeze(1)
        # Layer 0 has one input channel: oneDNN's convolution is faster there.
        matmul = self.matmul_on_cpu and x.device.type == "cpu"
        for i, layer in enumerate(self.conv_layers):
            x = layer(x, matmul=matmul and i > 0)
        return x.transpose(1, 2)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames produced from `lengths` samples (no padding in the convolutions)."""
        for _, kernel, stride in self.layers_spec:
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return lengths.clamp(min=0)
