"""Batch construction with fairseq's semantics, as pure functions of sizes and seeds.

Batches are built once (fairseq builds them once per run with the run's seed): indices sorted by
length, longest first, with ties in random order, then packed greedily under `max_tokens`
(batch size x longest item). Each epoch shuffles the batch order with (seed, epoch), and the
shuffled list is dealt out to ranks round-robin.
"""

from __future__ import annotations

import numpy as np

DUMMY = -1  # a rank with one batch fewer than the others gets a dummy step (weight zero)


def ordered_indices(num_tokens: np.ndarray, seed: int, shuffle: bool = True) -> np.ndarray:
    """Longest first; ties broken by a seeded permutation (fairseq `RawAudioDataset.ordered_indices`)."""
    if not shuffle:
        return np.arange(len(num_tokens))
    perm = np.random.default_rng([seed, 0]).permutation(len(num_tokens))
    return np.lexsort((perm, num_tokens))[::-1]


def batch_by_size(
    indices: np.ndarray,
    num_tokens: np.ndarray,
    max_tokens: int,
    max_sentences: int | None = None,
    required_multiple: int = 1,
) -> list[np.ndarray]:
    """Greedy batching of `indices` in order: a batch is full when (size + 1) x longest > max_tokens.

    As in fairseq, a full batch is cut to a multiple of `required_multiple` (when it holds at
    least that many) and the remainder starts the next batch.
    """
    batches: list[np.ndarray] = []
    batch: list[int] = []
    lens: list[int] = []
    longest = 0
    for idx in indices.tolist():
        n = int(num_tokens[idx])
        if n > max_tokens:
            raise ValueError(f"utterance {idx} has {n} samples, more than max_tokens={max_tokens}")
        lens.append(n)
        longest = max(longest, n)
        full = len(batch) > 0 and (
            (max_sentences is not None and len(batch) == max_sentences) or (len(batch) + 1) * longest > max_tokens
        )
        if full:
            keep = max(required_multiple * (len(batch) // required_multiple), len(batch) % required_multiple)
            batches.append(np.asarray(batch[:keep], dtype=np.int64))
            batch, lens = batch[keep:], lens[keep:]
            longest = max(lens)
        batch.append(idx)
    if batch:
        batches.append(np.asarray(batch, dtype=np.int64))
    return batches


def epoch_order(num_batches: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order in which batch ids are visited in `epoch` (same on every rank)."""
    if not shuffle:
        return np.arange(num_batches)
    return np.random.default_rng([seed, 1, epoch]).permutation(num_batches)


def rank_batches(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Round-robin share of `order` for `rank`; every rank gets the same count (padded with DUMMY)."""
    per_rank = -(-len(order) // world_size)
    mine = order[rank::world_size]
    return np.concatenate([mine, np.full(per_rank - len(mine), DUMMY, dtype=mine.dtype)])
