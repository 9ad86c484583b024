"""The training update does not wait on the device per micro-batch.

On a GPU every read of a device tensor on the host (`.item()`, `float()`, `bool()`, `.tolist()`,
`.numpy()`) stalls the step until the queued kernels finish. CPUs have no such stall, so the test
counts the reads instead: an update over 4 micro-batches must make exactly as many as an update
over 1 (logs, sample counts and the non-finite check stay on the device; the update ends with one
read), and a handful at most. The batches are drawn before counting: the loader works on the host.
"""

import itertools
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pretrain.build import build_task
from pretrain.config import apply_overrides
from pretrain.presets import get_preset
from pretrain.training.trainer import Trainer

READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"}


class CountReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            where = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()[:-1]]
            # the non-fused AdamW keeps its step counters on the host (the fused one on the device)
            if not any("/torch/optim/" in w for w in where):
                self.reads.append(f"{func.__name__} at {where[-1]}")
        return func(*args, **(kwargs or {}))


def _reads_per_update(preset: str, update_freq: int, data, run_dir) -> list[str]:
    cfg = apply_overrides(get_preset(preset), [f"train.update_freq={update_freq}", "train.max_steps=10",
                                               "model.collapse_check_after=0"])
    trainer = Trainer(cfg, build_task(cfg.model), run_dir, data, torch.device("cpu"))
    batches = iter(list(itertools.islice(trainer._batches(), 2 * update_freq)))  # the loader runs before counting
    assert trainer.train_update(batches) is not None  # the first update (lazy set-up) is not counted
    with CountReads() as mode:
        assert trainer.train_update(batches) is not None
    return mode.reads


@pytest.mark.parametrize("preset", ["wav2vec2_tiny", "data2vec_tiny", "data2vec2_tiny"])
def test_reads_do_not_grow_with_micro_batches(preset, prepared, tmp_path):
    one = _reads_per_update(preset, 1, prepared, tmp_path / "one")
    four = _reads_per_update(preset, 4, prepared, tmp_path / "four")
    assert len(four) == len(one), (one, four)
    assert len(one) <= 3, one


def test_masked_frames_are_picked_as_boolean_indexing_would():
    from pretrain.models.masked_select import select_masked

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 8, generator=g, requires_grad=True)
    mask = torch.rand(3, 50, generator=g) < 0.4  # ragged rows, as data2vec 2.0's cropped batches
    picked = select_masked(x, mask, int(mask.sum()))
    assert torch.equal(picked, x[mask])
    (picked * torch.arange(picked.numel()).view_as(picked)).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    (x[mask] * torch.arange(picked.numel()).view_as(picked)).sum().backward()
    assert torch.equal(grad, x.grad)


def test_identical_negatives_found_without_candidates():
    """The GPU path of `_identical_rows` (every pair compared, no host read) finds exactly what
    the CPU path (fingerprint candidates, then those pairs) finds."""
    from pretrain.models import wav2vec2

    g = torch.Generator().manual_seed(1)
    targets = torch.randn(2, 30, 4, generator=g)
    targets[0, 5] = targets[0, 7]
    targets[1, 2] = targets[1, 9] = targets[1, 11]
    targets[1, 20] = targets[1, 21].flip(0)  # same fingerprint (sum), different vector
    negatives = torch.randint(0, 30, (2, 30, 20), generator=g)
    negatives[0, 7, 0], negatives[1, 9, 3], negatives[1, 2, 4], negatives[1, 20, 0] = 5, 11, 9, 21
    sparse = wav2vec2._identical_rows(targets, negatives, dense=False)
    assert sparse[0, 7, 0] and sparse[1, 9, 3] and sparse[1, 2, 4] and not sparse[1, 20, 0]
    assert torch.equal(wav2vec2._identical_rows(targets, negatives, dense=True), sparse)


def test_unpadded_masks_are_dropped_only_where_looking_is_free():
    from pretrain.models.masked_select import padding_or_none

    nothing, some = torch.zeros(2, 5, dtype=torch.bool), torch.zeros(2, 5, dtype=torch.bool)
    some[1, 3:] = True
    assert padding_or_none(None) is None and padding_or_none(nothing) is None
    assert padding_or_none(some) is some
    on_device = nothing.to("meta")  # stands for a GPU tensor: kept, never read
    assert padding_or_none(on_device) is on_device
