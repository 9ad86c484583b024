"""data2vec 2.0's ALiBi biases and the block masks the loader draws (DATA2VEC2.md sections 4-5)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from data_prep.loader import AudioLoader
from data_prep.sources import open_source
from pretrain.models.alibi import alibi_bias, alibi_slopes
from pretrain.objectives import block_mask
from pretrain.objectives.block_mask import block_mask_1d, frames_for, kept_frames
from pretrain.objectives.data2vec2_task import masker_for
from pretrain.presets import get_preset


# -- ALiBi ---------------------------------------------------------------------------------------


def test_alibi_slopes_for_12_and_16_heads():
    assert alibi_slopes(12) == pytest.approx(
        [2.0**-k for k in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5], rel=1e-12)
    assert alibi_slopes(16) == pytest.approx([2 ** (-0.5 * h) for h in range(1, 17)], rel=1e-12)


def test_alibi_bias_scale_padding_and_kept_frames():
    slopes = torch.tensor(alibi_slopes(4))
    t = 7
    full = alibi_bias(torch.arange(t), slopes, None)
    assert full.shape == (1, 4, t, t)
    dist = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).abs().float()
    assert torch.allclose(full[0], -slopes[:, None, None] * dist, rtol=0, atol=1e-7)
    assert torch.equal(full, full.transpose(-1, -2))
    assert not full[0].diagonal(dim1=-2, dim2=-1).any()
    assert (full[0, :, 0, 1] < 0).all()

    scale = torch.tensor([2.0, 0.5, -1.0, 1.0], requires_grad=True)
    scaled = alibi_bias(torch.arange(t), slopes, scale)
    for h, s in enumerate([2.0, 0.5, 0.0, 1.0]):  # a negative scale is clamped at 0
        assert torch.allclose(scaled[0, h], s * full[0, h], rtol=1e-6, atol=0)
    scaled.sum().backward()
    assert scale.grad[2] == 0  # nothing flows through the clamp
    assert scale.grad[0] == pytest.approx(-float(slopes[0]) * float(dist.sum()), rel=1e-6)

    pad = torch.tensor([[False] * 5 + [True] * 2])
    padded = alibi_bias(torch.arange(t), slopes, None, pad)
    assert torch.isneginf(padded[..., 5:]).all()
    assert torch.equal(padded[..., :5], full[..., :5])

    # kept frames keep their original time distances: rows and columns of the full bias
    keep = torch.tensor([[0, 2, 3, 6], [1, 4, 5, 6]])
    reference = alibi_bias(torch.arange(t), slopes, scale.detach())[0]
    kept = alibi_bias(keep, slopes, scale.detach())
    assert kept.shape == (2, 4, 4, 4)
    for r in range(2):
        assert torch.equal(kept[r], reference[:, keep[r]][:, :, keep[r]])


# -- block masks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("length, prob, adjust, masked", [
    (249, 0.5, 0.05, 124), (249, 0.55, 0.1, 136), (999, 0.5, 0.05, 499), (999, 0.55, 0.1, 549),
])
def test_block_mask_rows_have_exactly_int_t_times_p(length, prob, adjust, masked):
    mask = block_mask_1d(32, length, prob, 5, adjust, np.random.default_rng(0))
    assert mask.shape == (32, length) and (mask.sum(1) == masked).all()
    assert len({r.tobytes() for r in mask}) == 32  # independent rows


@pytest.mark.parametrize("preset, samples, masked, kept", [
    ("data2vec2_base", 80_000, 124, 125), ("data2vec2_large", 80_000, 136, 113),
    ("data2vec2_base", 320_000, 499, 500), ("data2vec2_large", 320_000, 549, 450),
])
def test_masker_on_an_uncropped_batch(preset, samples, masked, kept):
    cfg = get_preset(preset).model
    out = masker_for(cfg)(torch.zeros(2, samples), [samples, samples], np.random.default_rng(1))
    mask, keep = out["mask"], out["keep"]
    assert mask.shape == (2 * cfg.clone_batch, masked + kept)
    assert (mask.sum(1) == masked).all() and keep.shape == (2 * cfg.clone_batch, kept)
    for m, k in zip(mask, keep):  # exactly the unmasked frames, in time order
        assert torch.equal(k, torch.nonzero(~m).squeeze(1))


@pytest.mark.parametrize("prob, adjust, coverage, isolated", [(0.5, 0.05, 0.42, 0.094), (0.55, 0.1, 0.475, 0.075)])
def test_spans_cover_less_than_target_before_equalising(monkeypatch, prob, adjust, coverage, isolated):
    rng = np.random.default_rng(0)
    final = block_mask_1d(1000, 249, prob, 5, adjust, rng)
    padded = np.pad(final, ((0, 0), (1, 1)))
    alone = final & ~padded[:, :-2] & ~padded[:, 2:]
    # most masked frames lie in runs; the few isolated ones come from equalisation
    assert abs(alone.sum() / final.sum() - isolated) < 0.02
    monkeypatch.setattr(block_mask, "equalize", lambda mask, target, rng: None)
    spans = block_mask_1d(1000, 249, prob, 5, adjust, rng)
    assert abs(spans.mean() - coverage) < 0.015
    assert (spans.sum(1) < int(249 * prob)).mean() > 0.95  # equalising almost always adds frames


def test_cropped_rows_differ_unless_recounted():
    masker = masker_for(get_preset("data2vec2_base").model)  # 8 clones
    lengths = [80_000, 96_000, 120_000]
    out = masker(torch.zeros(3, 80_000), lengths, np.random.default_rng(0))
    mask, keep = out["mask"], out["keep"]
    counts = mask.sum(1)
    assert mask.shape == (24, 249) and (counts[:8] == 124).all()
    assert len(set(counts[8:].tolist())) > 1  # each row cropped at its own offset
    assert keep.shape == (24, 249 - int(counts[0]))  # row 0 sets every row's kept count
    assert (keep.diff(dim=1) > 0).all()
    for m, k, n in zip(mask, keep, counts.tolist()):
        unmasked = set(torch.nonzero(~m).squeeze(1).tolist())
        if n >= 124:  # all unmasked frames, plus n - 124 masked ones
            assert unmasked <= set(k.tolist()) and int(m[k].sum()) == n - 124
        else:  # only unmasked frames, some of them left out
            assert set(k.tolist()) < unmasked
    exact = replace(masker, exact_after_crop=True)(torch.zeros(3, 80_000), lengths, np.random.default_rng(0))
    assert (exact["mask"].sum(1) == 124).all()
    for m, k in zip(exact["mask"], exact["keep"]):
        assert torch.equal(k, torch.nonzero(~m).squeeze(1))


def test_masks_are_a_function_of_the_generator():
    masker = masker_for(get_preset("data2vec2_tiny").model)
    src = torch.zeros(2, 30_000)
    a, b, c = (masker(src, [30_000, 40_000], np.random.default_rng(s)) for s in ([1, 3, 1, 5], [1, 3, 1, 5], [1, 3, 1, 6]))
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["keep"], b["keep"])
    assert not torch.equal(a["mask"], c["mask"])
    assert kept_frames(np.zeros((0, 5), dtype=bool)).shape == (0, 5)


def test_loader_masks_survive_workers_and_resume(prepared):
    masker = masker_for(get_preset("data2vec2_tiny").model)
    cfg = get_preset("data2vec2_tiny").data
    reference = AudioLoader(open_source(prepared, "train"), replace(cfg, num_workers=0), seed=3, extras=masker)
    expected = list(reference) + list(reference)  # two epochs
    loader = AudioLoader(open_source(prepared, "train"), replace(cfg, num_workers=2), seed=3, extras=masker)
    got = []
    for b in loader:
        got.append(b)
        if len(got) == 3:
            break
    resumed = AudioLoader(open_source(prepared, "train"), replace(cfg, num_workers=2), seed=3, extras=masker)
    resumed.load_state_dict(loader.state_dict())
    got += list(resumed) + list(resumed)
    assert len(got) == len(expected) > 6
    for x, y in zip(got, expected):
        assert torch.equal(x.indices, y.indices)
        assert torch.equal(x.extras["mask"], y.extras["mask"]) and torch.equal(x.extras["keep"], y.extras["keep"])
        n = len(x.indices) * masker.clone_batch
        assert x.extras["mask"].shape == (n, frames_for(x.source.shape[1], masker.conv_layers))
    # the epochs draw different masks
    half = len(expected) // 2
    assert not all(torch.equal(x.extras["mask"], y.extras["mask"]) for x, y in zip(expected[:half], expected[half:]))
