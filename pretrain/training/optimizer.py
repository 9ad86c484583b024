"""AdamW with decoupled weight decay (fairseq `adam`), built the same way for every stage."""

from __future__ import annotations

import torch
from torch import nn

from pretrain.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """One group with weight decay on everything (`optim.decay_all`, fairseq's behaviour), or a
    second group without decay for 1-D parameters (biases, norms, ALiBi scales). PyTorch's fused
    kernel (one pass over each parameter's state; on CUDA, all parameters in a few launches) on
    CUDA and CPUs, where it is ~5x faster than the default per-tensor loop (65 ms against 364 ms
    a step for a 95M-parameter BASE on 2 cores); transformers' Trainer uses it by default too."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.decay_all:
        groups = [{"params": [p for _, p in named]}]
    else:
        groups = [{"params": [p for _, p in named if p.ndim > 1]},
                  {"params": [p for _, p in named if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=device.type in ("cuda", "cpu") or None)
