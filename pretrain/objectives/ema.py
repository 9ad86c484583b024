"""The data2vec teacher: an exponential moving average of the student's transformer encoder.

As in fairseq (`ema_transformer_only`, `ema_layers_only`): only the encoder is averaged (the
conv feature encoder and projection are shared with the student), the positional convolution
is copied from the student at every update instead of averaged, and the average is kept in
fp32 whatever precision the student trains in.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

COPIED_PREFIXES = ("pos_conv.",)


def ema_decay_at(step: int, start: float, end: float, anneal_steps: int) -> float:
    """Linear from `start` at update 0 to `end` at `anneal_steps`, then constant."""
    if start == end or step >= anneal_steps:
        return end
    return end - (end - start) * (1 - step / anneal_steps)


def build_targets(layer_outputs: list[torch.Tensor], top_k: int, instance_norm: bool) -> torch.Tensor:
    """Average of the last `top_k` layers' FFN outputs (before dropout, residual and final
    LayerNorm), each first normalised over time per utterance and channel (instance norm,
    eps 1e-5, no affine); (B, T, D) fp32."""
    layers = [y.float() for y in layer_outputs[-top_k:]]
    if instance_norm:
        layers = [F.instance_norm(y.transpose(1, 2)).transpose(1, 2) for y in layers]
    return sum(layers) / len(layers)


class EMATeacher:
    def __init__(self, encoder: nn.Module, copied: tuple[str, ...] = COPIED_PREFIXES) -> None:
        """`copied`: parameter-name prefixes copied from the student instead of averaged
        (data2vec: the positional conv; data2vec 2.0 averages everything)."""
        self.copied = tuple(copied)
        self.model = copy.deepcopy(encoder).float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def to(self, device: torch.device) -> "EMATeacher":
        self.model.to(device)
        return self

    @torch.no_grad()
    def update(self, student: nn.Module, decay: float) -> None:
        """teacher = decay * teacher + (1 - decay) * student (positional conv: copied)."""
        theirs = dict(student.named_parameters())
        averaged: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for name, t in self.model.named_parameters():
            s = theirs[name].detach().float()
            if self.copied and name.startswith(self.copied):
                t.copy_(s)
            else:
                averaged[0].append(t)
                averaged[1].append(s)
        if averaged[0]:  # one multi-tensor kernel per op, not two per parameter
            torch._foreach_mul_(averaged[0], decay)
            torch._foreach_add_(averaged[0], averaged[1], alpha=1 - decay)
        for (name, t), (_, s) in zip(self.model.named_buffers(), student.named_buffers()):
            t.copy_(s)

    @torch.no_grad()
    def targets(self, x: torch.Tensor, padding_mask: torch.Tensor | None, top_k: int, instance_norm: bool) -> torch.Tensor:
        """The teacher's targets for unmasked input `x` (B, T, D); see `build_targets`."""
        self.model.eval()
        _, ffn = self.model(x.float(), padding_mask, return_ffn=True)
        return build_targets(ffn, top_k, instance_norm)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
