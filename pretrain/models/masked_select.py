"""Masked frames picked out without reading the mask back to the host.

`x[mask]` with a boolean mask must count the True entries before it can allocate its output: on
a GPU that is a device-to-host copy that stalls the step. The count is known on the host already
(the masks are drawn there), so the frames are gathered by index instead: a stable sort puts the
masked positions first, in the order boolean indexing would return them.
"""

from __future__ import annotations

import torch


def masked_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of the `count` True entries of `mask`, in row-major order (as `mask.nonzero()`)."""
    flat = mask.reshape(-1)
    return torch.sort((~flat).to(torch.uint8), stable=True).indices[:count]


def select_masked(x: torch.Tensor, mask: torch.Tensor, count: int | None) -> torch.Tensor:
    """`x[mask]` for x (B, T, C) and mask (B, T): (count, C). `count` None: boolean indexing."""
    if count is None:
        return x[mask]
    return x.reshape(-1, x.shape[-1]).index_select(0, masked_positions(mask, count))


def padding_or_none(mask: torch.Tensor | None) -> torch.Tensor | None:
    """None for a mask with nothing padded, so the cheaper unmasked path runs. Only a CPU mask is
    looked at: on a GPU the look would be a host read, and an all-False mask gives the same result."""
    if mask is None or (mask.device.type == "cpu" and not mask.any()):
        return None
    return mask
