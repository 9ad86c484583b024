"""The audio data loader shared by pretraining and fine-tuning.

Semantics follow fairseq's `FileAudioDataset` + `EpochBatchIterator`:
- utterances shorter than `min_sample_size` are dropped;
- an utterance longer than `max_sample_size` is cropped at a random offset;
- batches hold at most `max_tokens` samples (batch size x longest item);
- pretraining (`pad=False`) crops every item of a batch to its shortest item, fine-tuning
  (`pad=True`) pads to the longest and returns a padding mask;
- `normalize` standardises each whole utterance (zero mean, unit variance) before cropping;
- an utterance that cannot be read stops the run with its manifest line and path, or, with
  `skip_bad_files`, is left out of its batch with a warning (never the batch: DDP ranks stay in step).

Everything random is a function of (seed, epoch, batch id), so the batches do not depend on the
number of worker processes, and a loader restored from `state_dict()` mid-epoch yields exactly
the batches the original would have yielded next.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .batching import DUMMY, batch_by_size, epoch_order, ordered_indices, rank_batches
from .sources import BadUtteranceError

log = logging.getLogger(__name__)
_SKIP_HINT = (
    " To train on without such files, set data.skip_bad_files=true (`--set data.skip_bad_files=true`): "
    "each is then left out of its batch with a warning."
)


@dataclass
class LoaderConfig:
    """How utterances are filtered, cropped and batched."""

    max_tokens: int = 1_400_000
    """Samples per batch on one rank (batch size x longest item)."""
    min_sample_size: int = 32_000
    """Utterances shorter than this many samples are dropped."""
    max_sample_size: int | None = 250_000
    """Longer utterances are cropped to this many samples at a random offset (None: no crop)."""
    pad: bool = False
    """False: crop a batch to its shortest item (pretraining); True: pad and mask (fine-tuning)."""
    normalize: bool = False
    """Standardise each utterance's waveform (data2vec; must match between pretraining and fine-tuning)."""
    required_batch_size_multiple: int = 8
    max_batch_size: int | None = None
    shuffle: bool = True
    num_workers: int = 0
    """Worker processes that read and collate batches (0: in the training process)."""
    prefetch_factor: int = 4
    skip_bad_files: bool = False
    """Leave an unreadable or damaged utterance out of its batch with a warning, instead of stopping."""

    def validate(self) -> None:
        """Raise ValueError for settings that can build no batch (checked before any data is read)."""
        if self.max_tokens < self.min_sample_size:
            one = max(self.min_sample_size, self.max_sample_size or 0)  # room for one cropped utterance
            raise ValueError(
                f"data.max_tokens={self.max_tokens} is smaller than data.min_sample_size={self.min_sample_size}: "
                "every utterance long enough to keep would be too long for any batch. Raise data.max_tokens "
                f"(--set data.max_tokens={one} fits one utterance of up to data.max_sample_size; fairseq's BASE "
                "recipe uses 1400000) or lower data.min_sample_size."
            )


@dataclass
class Batch:
    source: torch.Tensor
    """(B, T) float32 waveforms."""
    padding_mask: torch.Tensor | None
    """(B, T) bool, True at padding; None when the batch was cropped to its shortest item."""
    indices: torch.Tensor
    """(B,) utterance indices in the source."""
    labels: list[str] | None = None
    is_dummy: bool = False
    """A stand-in for a rank with no batch left this epoch: run it, but give it weight zero."""
    lengths: torch.Tensor = field(default=None)  # type: ignore[assignment]
    extras: dict | None = None
    """What the loader's `extras` hook drew for this batch (e.g. data2vec 2.0's masks): tensors,
    moved and pinned with the batch, and plain numbers counted on the host."""
    audio_samples: int | None = None
    """Real (unpadded) samples, counted where the batch is made, so the training step never reads
    `lengths` back from a device."""

    def __post_init__(self) -> None:
        if self.lengths is None:
            if self.padding_mask is None:
                self.lengths = torch.full((len(self.source),), self.source.shape[1], dtype=torch.long)
            else:
                self.lengths = (~self.padding_mask).sum(1)
        if self.audio_samples is None:
            self.audio_samples = int(self.lengths.sum())

    @property
    def num_samples(self) -> int:
        return 0 if self.is_dummy else self.audio_samples

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        extras = None if self.extras is None else {k: _tensors(move, v) for k, v in self.extras.items()}
        return Batch(move(self.source), move(self.padding_mask), self.indices, self.labels, self.is_dummy,
                     move(self.lengths), extras, self.audio_samples)

    def pin_memory(self) -> "Batch":
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        extras = None if self.extras is None else {k: _tensors(pin, v) for k, v in self.extras.items()}
        return Batch(pin(self.source), pin(self.padding_mask), self.indices, self.labels, self.is_dummy,
                     pin(self.lengths), extras, self.audio_samples)



def _tensors(fn, value):
    """`fn` on a tensor; plain values in extras (counts made on the host) pass as they are."""
    return fn(value) if isinstance(value, torch.Tensor) else value


def collate(
    waves: list[np.ndarray], pad: bool, max_sample_size: int | None, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fairseq `RawAudioDataset.collater`: crop to min (or pad to max) length, capped by max_sample_size.

    int16 waves (views of packed shards) are converted while being copied into the batch, so only
    the cropped part of each utterance is ever read.
    """
    sizes = [len(w) for w in waves]
    target = max(sizes) if pad else min(sizes)
    if max_sample_size is not None:
        target = min(target, max_sample_size)
    out = np.zeros((len(waves), target), dtype=np.float32)
    mask = np.zeros((len(waves), target), dtype=bool) if pad else None
    for i, w in enumerate(waves):
        diff = len(w) - target
        if diff > 0:
            start = int(rng.integers(0, diff + 1))
            out[i] = w[start : start + target]
        else:
            out[i, : len(w)] = w
            if diff < 0:
                mask[i, len(w) :] = True  # type: ignore[index]
    if waves and waves[0].dtype == np.int16:
        out *= np.float32(1 / 32768)
    return torch.from_numpy(out), None if mask is None else torch.from_numpy(mask)


def normalize_wave(w: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the whole utterance (torch's layer_norm with eps 1e-5)."""
    w = w.astype(np.float32, copy=False)
    return ((w - w.mean()) / np.sqrt(w.var() + 1e-5)).astype(np.float32)


@dataclass
class _Loaded:
    """What reading one batch gives back: the batch, or the error that stopped it, and the skips.

    Errors and skips travel as values: a DataLoader worker would re-raise an error buried in its
    traceback, and its log lines could be lost.
    """

    batch: Batch | None
    skipped: list[str]
    error: str | None = None

    def pin_memory(self) -> "_Loaded":
        """Called by DataLoader's pinning thread (pin_memory=True), or directly without workers."""
        if self.batch is not None:
            self.batch = self.batch.pin_memory()
        return self


class _EpochBatches(Dataset):
    """Map-style view of one rank's remaining batches of one epoch; item j is a `_Loaded` batch."""

    def __init__(self, loader: "AudioLoader", batch_ids: np.ndarray, epoch: int) -> None:
        self.source = loader.source
        self.labels = loader.labels
        self.batches = loader.batches
        self.cfg = loader.cfg
        self.seed = loader.seed
        self.batch_ids = batch_ids
        self.epoch = epoch
        self.fallback = loader.first_batch_id
        self.extras = loader.extras

    def __len__(self) -> int:
        return len(self.batch_ids)

    def __getitem__(self, j: int) -> _Loaded:
        try:
            return self._load(j)
        except BadUtteranceError as err:
            return _Loaded(None, [], str(err))

    def _load(self, j: int) -> _Loaded:
        bid = int(self.batch_ids[j])
        dummy = bid == DUMMY
        if dummy:
            bid = self.fallback
        idx = self.batches[bid]
        waves, kept, skipped = self._read(idx)
        if kept:
            idx = idx[kept]
        else:  # nothing readable: silence with weight zero, so this rank still takes its step
            waves = [np.zeros(int(self.source.sizes[i]), dtype=np.float32) for i in idx]
            dummy = True
        rng = np.random.default_rng([self.seed, 2, self.epoch, bid])
        source, mask = collate(waves, self.cfg.pad, self.cfg.max_sample_size, rng)
        labels = None if self.labels is None else [self.labels[int(i)] for i in idx]
        batch = Batch(source, mask, torch.from_numpy(idx), labels, is_dummy=dummy)
        if self.extras is not None:  # in the worker, from the whole utterances' lengths
            batch.extras = self.extras(source, [len(w) for w in waves], np.random.default_rng([self.seed, 3, self.epoch, bid]))
        return _Loaded(batch, skipped)

    def _read(self, idx: np.ndarray) -> tuple[list[np.ndarray], list[int], list[str]]:
        """The readable utterances of `idx`, their positions in it, and why each other one was skipped."""
        waves, kept, skipped = [], [], []
        for pos, i in enumerate(idx.tolist()):
            try:
                waves.append(normalize_wave(self.source.read(i)) if self.cfg.normalize else self.source.read_raw(i))
            except BadUtteranceError as err:
                if not self.cfg.skip_bad_files:
                    raise
                skipped.append(str(err))
                continue
            kept.append(pos)
        return waves, kept, skipped


class AudioLoader:
    """Iterates one epoch per `iter()`; `state_dict()` records the epoch and batches consumed."""

    def __init__(
        self,
        source,
        cfg: LoaderConfig,
        seed: int = 1,
        labels: list[str] | None = None,
        rank: int = 0,
        world_size: int = 1,
        extras=None,
        pin_memory: bool = False,
    ) -> None:
        """`extras(source, full_lengths, rng)`, if given, runs where the batch is collated (a worker
        process with num_workers > 0; so it must pickle) and returns tensors for `Batch.extras`;
        its rng is seeded by (seed, epoch, batch id) like the crops. `pin_memory` (for a GPU):
        batches arrive in page-locked memory, so the step's `non_blocking` copies do not wait."""
        cfg.validate()
        self.source, self.cfg, self.seed, self.labels = source, cfg, seed, labels
        self.extras, self.pin_memory = extras, pin_memory
        self.rank, self.world_size = rank, world_size
        sizes = np.asarray(source.sizes)
        keep = sizes >= cfg.min_sample_size
        # Every item is cropped to max_sample_size, so that is what it costs in a batch.
        num_tokens = sizes if cfg.max_sample_size is None else np.minimum(sizes, cfg.max_sample_size)
        too_long = num_tokens > cfg.max_tokens
        self.num_dropped_short = int((~keep).sum())
        self.num_dropped_long = int((keep & too_long).sum())
        if self.num_dropped_short or self.num_dropped_long:
            log.info(
                "dropped %d utterances shorter than %d samples and %d longer than max_tokens=%d",
                self.num_dropped_short, cfg.min_sample_size, self.num_dropped_long, cfg.max_tokens,
            )
        keep &= ~too_long
        order = ordered_indices(num_tokens, seed, cfg.shuffle)
        order = order[keep[order]]
        if len(order) == 0:
            raise ValueError(
                f"no utterance of {len(sizes)} is at least min_sample_size={cfg.min_sample_size} samples long "
                f"and fits in max_tokens={cfg.max_tokens} (after cropping to max_sample_size={cfg.max_sample_size})"
            )
        self.batches = batch_by_size(
            order, num_tokens, cfg.max_tokens, cfg.max_batch_size, cfg.required_batch_size_multiple
        )
        if len(self.batches) < world_size:
            raise ValueError(f"{len(self.batches)} batches cannot feed {world_size} ranks; lower max_tokens")
        self.first_batch_id = 0
        self.epoch = 1
        self.position = 0  # batches of this epoch already handed out on this rank

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return -(-len(self.batches) // self.world_size)

    def epoch_batch_ids(self, epoch: int) -> np.ndarray:
        order = epoch_order(len(self.batches), self.seed, epoch, self.cfg.shuffle)
        return rank_batches(order, self.rank, self.world_size)

    def __iter__(self):
        if self.position >= len(self):  # the previous epoch was consumed to its last batch
            self.epoch, self.position = self.epoch + 1, 0
        epoch = self.epoch
        ids = self.epoch_batch_ids(epoch)[self.position :]
        view = _EpochBatches(self, ids, epoch)
        if self.cfg.num_workers > 0 and len(ids) > 0:
            it = iter(
                DataLoader(
                    view,
                    batch_size=None,
                    shuffle=False,
                    num_workers=self.cfg.num_workers,
                    prefetch_factor=self.cfg.prefetch_factor,
                    persistent_workers=False,
                    pin_memory=self.pin_memory,  # in the loader's pinning thread (Batch.pin_memory)
                )
            )
        else:
            it = (view[j] for j in range(len(view)))
            if self.pin_memory:
                it = (loaded.pin_memory() for loaded in it)
        for loaded in it:
            if loaded.error is not None:
                raise BadUtteranceError(loaded.error + _SKIP_HINT)
            for note in loaded.skipped:
                log.warning("skipped an utterance (data.skip_bad_files=true): %s", note)
            self.position += 1
            yield loaded.batch
        if self.epoch == epoch and self.position >= len(self):
            self.epoch, self.position = epoch + 1, 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "world_size": self.world_size,
            "num_batches": len(self.batches),
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_batches") != len(self.batches) or state.get("seed") != self.seed:
            raise ValueError(
                f"the saved loader state is for {state.get('num_batches')} batches with seed "
                f"{state.get('seed')}, but this data gives {len(self.batches)} with seed {self.seed}: "
                "the data or batching settings changed since the checkpoint"
            )
        self.epoch = int(state["epoch"])
        position = int(state["position"])
        if state.get("world_size", self.world_size) != self.world_size:
            # Keep the epoch's progress: the same number of global batches counts as consumed.
            consumed = position * int(state["world_size"])
            position = consumed // self.world_size
            log.warning(
                "resuming with %d ranks instead of %d: batches are redistributed from global batch %d",
                self.world_size, state["world_size"], consumed,
            )
        self.position = min(position, len(self))
