"""Gumbel-softmax product quantizer (fairseq `GumbelVectorQuantizer`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def gumbel_temperature(step: int, start: float, end: float, decay: float) -> float:
    """fairseq: max(start * decay**num_updates, end)."""
    return max(start * decay**step, end)


@dataclass
class QuantizerOutput:
    x: torch.Tensor
    """Quantized vectors, same leading shape as the input, last dim = `vq_dim`."""
    prob_perplexity: torch.Tensor
    """Perplexity of the average softmax over the input frames, summed over groups."""
    code_perplexity: torch.Tensor
    """Perplexity of the average hard code assignment, summed over groups."""
    num_vars: int
    temperature: float


class GumbelQuantizer(nn.Module):
    """G groups of V entries; each group picks one entry by a straight-through hard Gumbel softmax.

    The logits and the Gumbel softmax are computed in fp32 whatever the autocast dtype.
    In eval mode the entry is the argmax (no noise).
    """

    def __init__(self, in_dim: int, num_vars: int, groups: int, vq_dim: int) -> None:
        super().__init__()
        if vq_dim % groups:
            raise ValueError(f"vq_dim {vq_dim} is not divisible by {groups} groups")
        self.num_vars, self.groups = num_vars, groups
        self.vars = nn.Parameter(torch.empty(1, groups * num_vars, vq_dim // groups).uniform_())
        self.weight_proj = nn.Linear(in_dim, groups * num_vars)
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)
        self.temperature = 2.0

    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        lead = x.shape[:-1]
        n = x[..., 0].numel()
        logits = self.weight_proj(x.reshape(n, -1)).float().view(n * self.groups, self.num_vars)
        hard_idx = logits.argmax(dim=-1)
        hard = torch.zeros_like(logits).scatter_(-1, hard_idx.view(-1, 1), 1.0).view(n, self.groups, -1)
        hard_probs = hard.mean(dim=0)
        code_ppl = torch.exp(-torch.sum(hard_probs * torch.log(hard_probs + 1e-7), dim=-1)).sum()
        avg_probs = torch.softmax(logits.view(n, self.groups, -1), dim=-1).mean(dim=0)
        prob_ppl = torch.exp(-torch.sum(avg_probs * torch.log(avg_probs + 1e-7), dim=-1)).sum()
        if self.training:
            onehot = F.gumbel_softmax(logits, tau=self.temperature, hard=True)
        else:
            onehot = hard.view(n * self.groups, -1)
        onehot = onehot.view(n, self.groups, self.num_vars).to(self.vars.dtype)
        # (n, G, V) x (G, V, d) -> (n, G, d): one matmul per group instead of a masked sum.
        codebook = self.vars.view(self.groups, self.num_vars, -1)
        q = torch.einsum("ngv,gvd->ngd", onehot, codebook).reshape(*lead, -1)
        return QuantizerOutput(q, prob_ppl, code_ppl, self.num_vars * self.groups, self.temperature)

