"""Duration-balanced shards and packed audio."""

import numpy as np
import pytest
import soundfile as sf

from data_prep.librispeech import PrepOptions, prepare
from data_prep.manifest import read_manifest
from data_prep.shards import balanced_partition


def test_partition_is_balanced_and_complete():
    rng = np.random.default_rng(0)
    sizes = rng.integers(32_000, 560_000, size=1000)
    for k in [1, 2, 3, 8, 64]:
        groups = balanced_partition(sizes, k)
        assert np.array_equal(np.sort(np.concatenate(groups)), np.arange(1000))
        totals = np.array([sizes[g].sum() for g in groups])
        assert totals.max() - totals.min() <= sizes.max()  # within one utterance
        assert all(np.all(np.diff(g) > 0) for g in groups)  # manifest order kept
    with pytest.raises(ValueError):
        balanced_partition(sizes[:3], 4)


def test_shard_manifests_cover_train_once(prepared):
    train = read_manifest(prepared / "train.tsv")
    shards = [read_manifest(prepared / "shards" / f"train.{k}.tsv") for k in range(2)]
    assert sorted(p for s in shards for p in s.paths) == sorted(train.paths)
    assert all(s.root == train.root for s in shards)
    totals = [int(s.sizes.sum()) for s in shards]
    assert abs(totals[0] - totals[1]) <= int(train.sizes.max())
    wrd = dict(zip(train.paths, (prepared / "train.wrd").read_text().splitlines()))
    for k, s in enumerate(shards):
        assert (prepared / "shards" / f"train.{k}.wrd").read_text().splitlines() == [wrd[p] for p in s.paths]


def test_packed_audio_equals_decoded_flac(prepared):
    for k in range(2):
        m = read_manifest(prepared / "shards" / f"train.{k}.tsv")
        pcm = np.fromfile(prepared / "shards" / f"train.{k}.pcm", dtype="<i2")
        offsets = np.load(prepared / "shards" / f"train.{k}.offsets.npy")
        assert len(offsets) == len(m) + 1 and offsets[-1] == len(pcm)
        for i in range(len(m)):
            audio, _ = sf.read(m.full_path(i), dtype="int16")
            assert np.array_equal(pcm[offsets[i] : offsets[i + 1]], audio)


def test_rerun_with_fewer_shards_removes_stale_ones(tmp_path, toy_corpus):
    out = tmp_path / "m"
    prepare(PrepOptions(root=toy_corpus, out=out, workers=2, num_shards=3, pack=True))
    assert (out / "shards" / "train.2.pcm").exists()
    mtime = (out / "shards" / "train.0.pcm").stat().st_mtime_ns
    prepare(PrepOptions(root=toy_corpus, out=out, workers=2, num_shards=3, pack=True))
    assert (out / "shards" / "train.0.pcm").stat().st_mtime_ns == mtime  # identical pack kept
    prepare(PrepOptions(root=toy_corpus, out=out, workers=2, num_shards=2, pack=True))
    assert sorted(p.name for p in (out / "shards").glob("train.*.tsv")) == ["train.0.tsv", "train.1.tsv"]
    assert not list((out / "shards").glob("train.2.*"))
