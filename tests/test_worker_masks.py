"""wav2vec 2.0 / data2vec span masks and negatives drawn by the loader (`SpanMasker`): the same
function as the in-step fallback, and independent of worker processes, resumption and ranks."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from data_prep.loader import AudioLoader, Batch, LoaderConfig
from pretrain.objectives.block_mask import frames_for
from pretrain.objectives.masking import compute_mask_indices, sample_negatives
from pretrain.objectives.span_masks import batch_masks, span_masker_for
from pretrain.presets import get_preset


class RampSource:
    """In memory: utterance i is i * 10 + a ramp (so crops differ)."""

    def __init__(self, sizes):
        self.sizes = np.asarray(sizes, dtype=np.int64)

    def __len__(self):
        return len(self.sizes)

    def read(self, i):
        return np.arange(self.sizes[i], dtype=np.float32) * 1e-4 + 10.0 * i

    read_raw = read


SIZES = np.random.default_rng(0).integers(8_000, 40_000, size=61)
CFG = LoaderConfig(max_tokens=120_000, min_sample_size=8_000, max_sample_size=30_000, required_batch_size_multiple=1)


def old_draw(model, batch, cfg, rng, negatives=True):
    """The in-step draw as it was before the loader drew the masks (the reference semantics)."""
    b, s = batch.source.shape
    frames = int(model.feature_extractor.output_lengths(torch.tensor(s)))
    frame_pad = None
    if batch.padding_mask is not None and batch.padding_mask.any():
        lengths = model.feature_extractor.output_lengths(batch.lengths.cpu())
        frame_pad = np.arange(frames)[None, :] >= lengths.numpy()[:, None]
    mask = compute_mask_indices((b, frames), frame_pad, cfg.mask_prob, cfg.mask_length, rng, cfg.mask_min_masks)
    negs = sample_negatives(b, int(mask[0].sum()), cfg.num_negatives, rng) if negatives else None
    return mask, negs


def test_frame_count_is_the_conv_front_ends():
    from pretrain.models.feature_extractor import FeatureExtractor

    layers = get_preset("wav2vec2_tiny").model.conv_feature_layers
    fe = FeatureExtractor(layers)
    n = torch.arange(0, 5000, 7)
    assert fe.output_lengths(n).tolist() == [frames_for(int(x), layers) for x in n]


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("preset", ["wav2vec2_tiny", "data2vec_tiny"])
def test_extras_equal_the_in_step_draw(preset, pad):
    from data_prep.loader import collate
    from pretrain.build import build_task

    cfg = get_preset(preset)
    task = build_task(cfg.model)
    model, masker = task.model, task.batch_extras  # the model only for the old in-step reference
    waves = [np.ones(n, dtype=np.float32) for n in (31_000, 24_000, 40_000, 27_500)]
    for seed in range(5):
        source, padding = collate(waves, pad, 30_000, np.random.default_rng(seed))
        batch = Batch(source, padding, torch.arange(4))
        full = [len(w) for w in waves]
        got = masker(source, full, np.random.default_rng([seed, 3]))  # as the loader calls it
        fallback = batch_masks(masker, batch, np.random.default_rng([seed, 3]))  # as the step does
        mask, negs = old_draw(model, batch, cfg.model, np.random.default_rng([seed, 3]), "negatives" in got)
        assert torch.equal(got["mask"], torch.from_numpy(mask)) and torch.equal(fallback["mask"], got["mask"])
        assert got["num_masked"].tolist() == mask.sum(1).tolist()
        if pad:
            assert not got["mask"][padding[:, ::320][:, : mask.shape[1]]].any()  # padding is never masked
        if negs is not None:
            assert torch.equal(got["negatives"], torch.from_numpy(negs)) and torch.equal(fallback["negatives"], got["negatives"])
        else:
            assert "negatives" not in got


def test_step_uses_the_batch_extras():
    from pretrain.objectives.wav2vec2_task import Wav2Vec2Task

    cfg = get_preset("wav2vec2_tiny").model
    task = Wav2Vec2Task(cfg)
    seen = {}

    def spy(src, pad, mask, negs, draws):
        seen.update(mask=mask, negs=negs, draws=draws)
        return task.model(src, pad, mask, negs, draws)

    source = torch.randn(2, 20_000)
    extras = task.batch_extras(source, [20_000, 25_000], np.random.default_rng(7))
    task.train_step(spy, Batch(source, None, torch.arange(2), extras=extras), np.random.default_rng(1))
    assert torch.equal(seen["mask"], extras["mask"]) and torch.equal(seen["negs"], extras["negatives"])
    # the step's generator only draws LayerDrop
    assert torch.equal(seen["draws"], torch.from_numpy(np.random.default_rng(1).random(cfg.encoder_layers)))
    # without extras, the same function with the step's generator (then LayerDrop)
    task.train_step(spy, Batch(source, None, torch.arange(2)), np.random.default_rng(7))
    assert torch.equal(seen["mask"], extras["mask"]) and torch.equal(seen["negs"], extras["negatives"])


def _loader(cfg, masker, **kw):
    return AudioLoader(RampSource(SIZES), cfg, seed=3, extras=masker, **kw)


def _same(x, y):
    assert torch.equal(x.indices, y.indices) and torch.equal(x.source, y.source)
    assert x.extras.keys() == y.extras.keys()
    for k in x.extras:
        a, b = x.extras[k], y.extras[k]
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, k


@pytest.mark.parametrize("pad", [False, True])
def test_loader_masks_survive_workers_and_resume(pad):
    masker = span_masker_for(get_preset("wav2vec2_tiny").model)
    cfg = replace(CFG, pad=pad)
    reference = _loader(replace(cfg, num_workers=0), masker)
    expected = list(reference) + list(reference)  # two epochs
    loader = _loader(replace(cfg, num_workers=2), masker)
    got = []
    for b in loader:
        got.append(b)
        if len(got) == 3:
            break
    resumed = _loader(replace(cfg, num_workers=2), masker)
    resumed.load_state_dict(loader.state_dict())
    got += list(resumed) + list(resumed)
    assert len(got) == len(expected) > 6
    for x, y in zip(got, expected):
        _same(x, y)
    # a function of (seed, epoch, batch id), from the lengths the batch carries (crops and padding)
    half = len(expected) // 2
    for epoch, batches in ((1, expected[:half]), (2, expected[half:])):
        for bid, b in zip(reference.epoch_batch_ids(epoch), batches):
            again = batch_masks(masker, replace(b, extras=None), np.random.default_rng([3, 3, epoch, int(bid)]))
            _same(replace(b, extras=again), b)
            assert b.extras["mask"].shape[1] == frames_for(b.source.shape[1], masker.conv_layers)
    assert any(b.padding_mask is not None and b.padding_mask.any() for b in expected) == pad
    assert not all(torch.equal(x.extras["mask"], y.extras["mask"]) for x, y in zip(expected[:half], expected[half:]))


def test_ranks_draw_what_one_process_draws():
    # the batch at global position p gets the same masks on rank p % N of N as on one process
    masker = span_masker_for(get_preset("data2vec_tiny").model, negatives=False)
    one = list(_loader(CFG, masker))
    ranks = [list(_loader(CFG, masker, rank=r, world_size=2)) for r in range(2)]
    merged = [b for pair in zip(*ranks) for b in pair if not b.is_dummy]
    assert len(merged) == len(one)
    for x, y in zip(merged, one):
        _same(x, y)


@pytest.mark.parametrize("preset", ["wav2vec2_tiny", "data2vec_tiny"])
def test_tasks_hand_the_loader_a_picklable_hook(preset):
    import pickle

    from pretrain.build import build_task

    task = build_task(get_preset(preset).model)
    hook = pickle.loads(pickle.dumps(task.batch_extras))
    assert hook == task.batch_extras and "Module" not in repr(type(hook).__mro__)
