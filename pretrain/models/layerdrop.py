"""LayerDrop decisions for a transformer's blocks, kept consistent across FSDP ranks.

Each rank draws its own LayerDrop (per micro-batch slot), so ranks skip different blocks. Under
DDP that is harmless. Under FSDP every block's forward all-gathers its parameters and its backward
reduce-scatters its gradients, collectives that all ranks must enter together. So when the
trainer shards the model (`pretrain.training.parallel`), it gives each encoder a `layerdrop_sync`
that ORs the ranks' "runs this block" flags: a block no rank runs is skipped everywhere (its
gradient stays None, as with DDP), and a block that only other ranks run is a *ghost* here: it
runs on an empty batch and adds 0 to the residual stream, so its collectives happen, the result
is unchanged and its gradient is exactly zero (DDP also contributes zeros for a rank that did not
use a parameter).
"""

from __future__ import annotations

import torch
from torch import nn

RUN, SKIP, GHOST = 0, 1, 2


def plan(encoder: nn.Module, draws: torch.Tensor | None, stop: int) -> list[int]:
    """RUN, SKIP or GHOST for each of the first `stop` blocks of `encoder` (which has `layerdrop`
    and `training`; block i is dropped when `draws[i] < layerdrop`)."""
    if not (encoder.training and encoder.layerdrop > 0 and draws is not None):
        return [RUN] * stop
    runs = (draws[:stop] >= encoder.layerdrop).to(torch.int32)
    sync = getattr(encoder, "layerdrop_sync", None)
    anyone = sync(runs) if sync is not None else runs
    return [RUN if mine else GHOST if any_rank else SKIP for mine, any_rank in zip(runs.tolist(), anyone.tolist())]


def ghost(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """0 (a scalar that depends on every parameter of `layer`): the block run on no utterances,
    in eval mode so that it draws no dropout randomness and the rank's RNG stream stays that of DDP."""
    layer.train(False)
    try:
        out, _ = layer(x[:0], None if mask is None else mask[:0])
    finally:
        layer.train(True)
    return out.sum() * 0.0
