"""Span masking and negative sampling with fairseq's semantics, as functions of a numpy Generator.

Randomness comes from an explicit generator (seeded per step by the trainer), so a resumed run
draws exactly the masks and negatives of an uninterrupted one.
"""

from __future__ import annotations

import numpy as np


def compute_mask_indices(
    shape: tuple[int, int],
    padding_mask: np.ndarray | None,
    mask_prob: float,
    mask_length: int,
    rng: np.random.Generator,
    min_masks: int = 0,
    require_same_masks: bool = True,
) -> np.ndarray:
    """Boolean (B, T) mask of spans (fairseq `compute_mask_indices`, static lengths, overlaps allowed).

    Per utterance of unpadded length `sz`: num_spans = int(mask_prob * sz / mask_length + U[0,1))
    (at least `min_masks`), span starts drawn without replacement from [0, sz - mask_length),
    spans clipped at `sz`. With `require_same_masks`, every utterance is then cut down (random
    subset) to the smallest masked count in the batch, so masked frames reshape to (B, M, C).
    """
    bsz, all_sz = shape
    mask = np.zeros((bsz, all_sz), dtype=bool)
    all_num_mask = max(min_masks, int(mask_prob * all_sz / float(mask_length) + rng.random()))
    chosen = []
    for i in range(bsz):
        if padding_mask is not None:
            sz = all_sz - int(padding_mask[i].sum())
            num_mask = max(min_masks, int(mask_prob * sz / float(mask_length) + rng.random()))
        else:
            sz, num_mask = all_sz, all_num_mask
        if num_mask == 0:
            chosen.append(np.zeros(0, dtype=np.int64))
            continue
        length = min_len = mask_length
        if sz - min_len <= num_mask:
            min_len = sz - num_mask - 1
        starts = rng.choice(sz - min_len, num_mask, replace=False)
        idc = (starts[:, None] + np.arange(length)[None, :]).reshape(-1)
        chosen.append(np.unique(idc[idc < sz]))
    min_count = min(len(c) for c in chosen)
    for i, idc in enumerate(chosen):
        if require_same_masks and len(idc) > min_count:
            idc = rng.choice(idc, min_count, replace=False)
        mask[i, idc] = True
    return mask


def sample_negatives(
    batch_size: int, num_masked: int, num_negatives: int, rng: np.random.Generator
) -> np.ndarray:
    """(B, M, K) indices into the M masked frames of the same utterance, never the frame itself.

    fairseq draws from [0, M - 1) and shifts draws >= the frame's own index up by one, so each
    negative is uniform over the other M - 1 frames (with replacement).
    """
    if num_masked < 2:
        raise ValueError("negative sampling needs at least 2 masked frames per utterance")
    draws = rng.integers(0, num_masked - 1, size=(batch_size, num_masked, num_negatives))
    own = np.arange(num_masked)[None, :, None]
    return draws + (draws >= own)
