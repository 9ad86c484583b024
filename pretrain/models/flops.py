"""Model FLOPs per second of audio, for MFU (a matmul-and-conv count; norms and softmax ignored)."""

from __future__ import annotations

import torch

from pretrain.config import ModelConfig

SAMPLE_RATE = 16_000
# Dense bf16/fp16 tensor-core peaks (FLOP/s) of common training GPUs.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10": 125e12, "L40": 181e12, "V100": 125e12, "A6000": 155e12}


def forward_flops_per_audio_second(cfg: ModelConfig, frames_per_sequence: int = 500) -> float:
    flops, rate, in_dim = 0.0, float(SAMPLE_RATE), 1
    for dim, kernel, stride in cfg.conv_feature_layers:
        rate /= stride
        flops += 2 * rate * dim * in_dim * kernel
        in_dim = dim
    d, f, n = cfg.encoder_embed_dim, cfg.encoder_ffn_embed_dim, cfg.encoder_layers
    per_frame = n * (2 * (4 * d * d + 2 * d * f) + 4 * frames_per_sequence * d)
    per_frame += 2 * in_dim * d  # post_extract_proj
    per_frame += 2 * d * (d // cfg.conv_pos_groups) * cfg.conv_pos  # positional conv
    return flops + rate * per_frame


def train_flops_per_audio_second(cfg: ModelConfig, frames_per_sequence: int = 500) -> float:
    """Forward + backward ~ 3x forward."""
    return 3.0 * forward_flops_per_audio_second(cfg, frames_per_sequence)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None
