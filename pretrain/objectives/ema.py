"""The data2vec teacher: an exponential moving average of the student's transformer encoder.

As in fairseq (`ema_transformer_only`, `ema_layers_only`): only the encoder is averaged (the
conv feature encoder and projection are shared with the student), the positional convolution
is copied from the student at every update instead of averaged, and the average is kept in
fp32 whatever precision the student trains in.

Under FSDP (`train.parallelism=fsdp`) the trainer shards the teacher as it shards the student:
each rank averages its own shards (the same slices of the same parameters, no communication)
and the teacher's forward all-gathers its blocks in fp32.
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
            t, s = _local_pair(t, theirs[name].detach(), name)
            s = s.float()
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
        if _sharded(self.model):
            self.model.reshard()  # FSDP keeps a root gathered after forward; `update` needs its shards
        return build_targets(ffn, top_k, instance_norm)

    def state_dict(self) -> dict:
        """Whole tensors. Sharded: a collective every rank calls; rank 0 gets the state (on the CPU)."""
        if _sharded(self.model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """From whole tensors (sharded: each rank keeps its shards of them)."""
        if _sharded(self.model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))
            return
        self.model.load_state_dict(state)


def _sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _local_pair(t: torch.Tensor, s: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student parameter as plain tensors: under FSDP their local shards, which hold
    the same elements when both are sharded alike (a `_foreach` op on them stays local)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor) and not isinstance(s, DTensor):
        return t, s
    if not (isinstance(t, DTensor) and isinstance(s, DTensor) and t.placements == s.placements
            and t.device_mesh == s.device_mesh and t.shape == s.shape):
        raise RuntimeError(f"EMA teacher and student are not sharded alike at {name}")
    return t.to_local(), s.to_local()
