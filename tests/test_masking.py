"""Span masking and negative sampling: fairseq's semantics."""

import numpy as np
import pytest

from pretrain.objectives.masking import compute_mask_indices, sample_negatives


def test_masks_have_equal_counts_and_respect_bounds():
    rng = np.random.default_rng(0)
    for _ in range(50):
        b, t = rng.integers(1, 6), rng.integers(30, 400)
        mask = compute_mask_indices((b, t), None, 0.65, 10, rng, min_masks=2)
        counts = mask.sum(1)
        assert (counts == counts[0]).all() and counts[0] >= 10  # at least one full span survives
    # about 49% of frames masked at p=0.65, length 10 (overlapping spans)
    mask = compute_mask_indices((64, 500), None, 0.65, 10, np.random.default_rng(1), min_masks=2)
    assert 0.40 < mask.mean() < 0.56


def test_span_starts_stay_below_t_minus_length():
    # 1000 draws: no span may start at or after T - mask_length (fairseq draws from [0, T - len))
    rng = np.random.default_rng(2)
    t = 40
    for _ in range(1000):
        mask = compute_mask_indices((1, t), None, 0.1, 10, rng, min_masks=1)
        first = np.nonzero(mask[0])[0][0]
        assert first < t - 10


def test_min_masks_applies_to_short_inputs():
    mask = compute_mask_indices((3, 25), None, 0.01, 10, np.random.default_rng(3), min_masks=2)
    assert (mask.sum(1) >= 10).all()


def test_padding_is_never_masked():
    rng = np.random.default_rng(4)
    pad = np.zeros((2, 200), dtype=bool)
    pad[1, 120:] = True
    for _ in range(100):
        mask = compute_mask_indices((2, 200), pad, 0.65, 10, rng, min_masks=2)
        assert not (mask & pad).any()
        assert mask[0].sum() == mask[1].sum()


def test_negatives_never_the_positive_and_uniform():
    rng = np.random.default_rng(5)
    negs = sample_negatives(4, 50, 100, rng)
    assert negs.shape == (4, 50, 100)
    own = np.arange(50)[None, :, None]
    assert (negs != own).all() and negs.min() == 0 and negs.max() == 49
    counts = np.bincount(negs[:, 7].reshape(-1), minlength=50)
    assert counts[7] == 0 and counts[np.arange(50) != 7].min() > 0
    with pytest.raises(ValueError):
        sample_negatives(1, 1, 10, rng)
