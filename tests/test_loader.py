"""The shared data loader: fairseq batching, cropping, padding, rank partition, exact resume."""

import numpy as np
import pytest
import torch

from data_prep.batching import DUMMY, batch_by_size, rank_batches
from data_prep.loader import AudioLoader, LoaderConfig, collate, normalize_wave
from data_prep.sources import ManifestSource, PackedSource, open_source, read_labels


class ArraySource:
    """An in-memory source whose utterance i is a ramp i*1000 + [0, 1, ...] (crop offsets show)."""

    def __init__(self, sizes):
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.ids = [str(i) for i in range(len(sizes))]

    def __len__(self):
        return len(self.sizes)

    def read(self, i):
        return (np.arange(self.sizes[i], dtype=np.float32) + 1000.0 * i)

    read_raw = read


SIZES = np.random.default_rng(0).integers(1_000, 20_000, size=203)


def _all(loader):
    return list(loader)


def test_batch_by_size_follows_fairseq():
    sizes = np.array([10, 9, 8, 7, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3])
    batches = batch_by_size(np.arange(14), sizes, max_tokens=30)
    assert [b.tolist() for b in batches] == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13]]
    # a full batch is cut to a multiple of 8 and the rest carried over
    batches = batch_by_size(np.arange(14), np.full(14, 3), max_tokens=30, required_multiple=8)
    assert [len(b) for b in batches] == [8, 6]
    assert [len(b) for b in batch_by_size(np.arange(14), np.full(14, 3), 100, max_sentences=5)] == [5, 5, 4]
    with pytest.raises(ValueError, match="more than max_tokens"):
        batch_by_size(np.arange(2), np.array([5, 50]), max_tokens=30)


def test_min_size_crop_and_max_tokens():
    cfg = LoaderConfig(max_tokens=60_000, min_sample_size=5_000, max_sample_size=12_000, required_batch_size_multiple=1)
    loader = AudioLoader(ArraySource(SIZES), cfg, seed=3)
    seen = set()
    for b in _all(loader):
        idx = b.indices.numpy()
        assert b.padding_mask is None
        assert b.source.shape[1] == min(min(SIZES[idx]), 12_000)  # cropped to the shortest item
        assert b.source.shape[0] * min(SIZES[idx].max(), 12_000) <= 60_000
        for row, i in zip(b.source.numpy(), idx):
            start = row[0] - 1000.0 * i
            assert 0 <= start <= SIZES[i] - len(row)  # a contiguous window of the utterance
            assert np.array_equal(row, np.arange(len(row), dtype=np.float32) + row[0])
        seen.update(idx.tolist())
    assert seen == set(np.nonzero(SIZES >= 5_000)[0].tolist())
    assert loader.num_dropped_short == int((SIZES < 5_000).sum())


def test_padding_mode_masks_the_tail():
    cfg = LoaderConfig(max_tokens=80_000, min_sample_size=0, max_sample_size=None, pad=True)
    for b in _all(AudioLoader(ArraySource(SIZES), cfg, seed=1)):
        idx = b.indices.numpy()
        assert b.source.shape[1] == SIZES[idx].max()
        assert torch.equal(b.lengths, torch.from_numpy(SIZES[idx]))
        for row, m, i in zip(b.source, b.padding_mask, idx):
            assert not m[: SIZES[i]].any() and m[SIZES[i] :].all()
            assert torch.all(row[SIZES[i] :] == 0)
            assert row[0] == 1000.0 * i  # padding mode never crops when no max is set


def test_normalize_each_utterance():
    w = np.random.default_rng(1).normal(3.0, 2.0, 5000).astype(np.float32)
    n = normalize_wave(w)
    assert abs(n.mean()) < 1e-5 and abs(n.std() - 1) < 1e-3
    ref = torch.nn.functional.layer_norm(torch.from_numpy(w), (5000,))
    assert torch.allclose(torch.from_numpy(n), ref, atol=1e-5)
    waves, _ = collate([np.ones(10, np.float32), np.arange(12, dtype=np.float32)], True, None, np.random.default_rng())
    assert waves.shape == (2, 12)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_utterance_once_per_epoch_across_ranks(world_size):
    cfg = LoaderConfig(max_tokens=50_000, min_sample_size=2_000, max_sample_size=15_000)
    loaders = [AudioLoader(ArraySource(SIZES), cfg, seed=7, rank=r, world_size=world_size) for r in range(world_size)]
    for epoch in (1, 2):
        per_rank = [_all(ld) for ld in loaders]
        assert len({len(x) for x in per_rank}) == 1  # same number of steps on every rank
        real = [int(i) for batches in per_rank for b in batches if not b.is_dummy for i in b.indices]
        assert sorted(real) == sorted(np.nonzero(SIZES >= 2_000)[0].tolist())
        assert sum(b.is_dummy for batches in per_rank for b in batches) == (-len(loaders[0].batches)) % world_size
        assert all(ld.epoch == epoch + 1 for ld in loaders)


def test_rank_batches_pads_with_dummy():
    assert rank_batches(np.arange(5), 1, 2).tolist() == [1, 3, DUMMY]
    assert rank_batches(np.arange(5), 0, 2).tolist() == [0, 2, 4]


def test_shuffle_depends_on_seed_and_epoch():
    cfg = LoaderConfig(max_tokens=50_000, min_sample_size=0, max_sample_size=15_000)
    a, b = AudioLoader(ArraySource(SIZES), cfg, seed=1), AudioLoader(ArraySource(SIZES), cfg, seed=1)
    ea1, eb1 = _all(a), _all(b)
    assert all(torch.equal(x.source, y.source) for x, y in zip(ea1, eb1))
    ea2 = _all(a)
    assert [x.indices.tolist() for x in ea1] != [x.indices.tolist() for x in ea2]
    other = _all(AudioLoader(ArraySource(SIZES), cfg, seed=2))
    assert [x.indices.tolist() for x in ea1] != [x.indices.tolist() for x in other]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restore_mid_epoch_gives_identical_batches(prepared, num_workers):
    cfg = LoaderConfig(max_tokens=200_000, min_sample_size=16_000, max_sample_size=60_000, num_workers=num_workers)
    src = open_source(prepared, "train")
    reference = AudioLoader(src, LoaderConfig(**{**cfg.__dict__, "num_workers": 0}), seed=5)
    expected = _all(reference) + _all(reference)  # two epochs
    loader = AudioLoader(src, cfg, seed=5)
    got, state = [], None
    for b in loader:
        got.append(b)
        if len(got) == 3:
            state = loader.state_dict()
            break
    resumed = AudioLoader(open_source(prepared, "train"), cfg, seed=5)
    resumed.load_state_dict(state)
    got += _all(resumed) + _all(resumed)
    assert len(got) == len(expected)
    for x, y in zip(got, expected):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.source, y.source)


def test_state_from_other_data_is_refused():
    cfg = LoaderConfig(max_tokens=50_000, min_sample_size=0, max_sample_size=15_000)
    state = AudioLoader(ArraySource(SIZES), cfg, seed=1).state_dict()
    with pytest.raises(ValueError, match="changed since the checkpoint"):
        AudioLoader(ArraySource(SIZES[:100]), cfg, seed=1).load_state_dict(state)


def test_packed_and_flac_sources_read_the_same_audio(prepared):
    packed, flac = open_source(prepared, "train"), open_source(prepared, "train", packed=False)
    assert isinstance(packed, PackedSource) and isinstance(flac, ManifestSource)
    where = {u: i for i, u in enumerate(flac.ids)}
    assert sorted(packed.ids) == sorted(flac.ids)
    for i, u in enumerate(packed.ids):
        assert np.array_equal(packed.read(i), flac.read(where[u]))
    assert read_labels(packed) == [read_labels(flac)[where[u]] for u in packed.ids]
    cfg = LoaderConfig(max_tokens=300_000, min_sample_size=16_000, max_sample_size=50_000)
    a = {packed.ids[i] for b in AudioLoader(packed, cfg, seed=2) for i in b.indices}
    assert a == {flac.ids[i] for b in AudioLoader(flac, cfg, seed=2) for i in b.indices}


def test_missing_file_error_names_the_file(tmp_path, prepared):
    lines = (prepared / "dev-clean.tsv").read_text().splitlines()
    broken = tmp_path / "broken.tsv"
    broken.write_text("\n".join(lines[:2] + ["no/such/file.flac\t40000"]) + "\n")
    src = ManifestSource(broken)
    with pytest.raises(RuntimeError, match="no/such/file.flac.*line 3"):
        src.read(1)
