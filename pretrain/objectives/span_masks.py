"""wav2vec 2.0 / data2vec span masks (and wav2vec 2.0's negatives), drawn where the batch is
collated: the loader's `extras` hook, run in its worker processes with data.num_workers > 0.

The training step then only moves ready CPU tensors to the device: no numpy in the step, and no
device-to-host read of the masked count. The draws are those of `compute_mask_indices` and
`sample_negatives` (fairseq semantics), from the generator the loader seeds with (seed, epoch,
batch id), so they do not depend on worker processes, ranks or resumption. A batch built by hand
(tests, tools: `Batch.extras is None`) gets the same function applied with the step's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pretrain.objectives.block_mask import frames_for
from pretrain.objectives.masking import compute_mask_indices, sample_negatives


@dataclass
class SpanMasker:
    """The loader's per-batch hook: {"mask": (B, T') bool, "num_masked": (B,) int64 masked frames
    per row, "masked_total": their sum (an int) and, with `num_negatives` > 0, "negatives": (B, M, K) int64 (see `sample_negatives`)}.

    Holds only numbers (it is pickled into the loader's workers), not the model."""

    conv_layers: list
    """(dim, kernel, stride) per conv layer: T' = the conv front end's output length."""
    mask_prob: float
    mask_length: int
    min_masks: int
    num_negatives: int = 0
    """0: masks only (data2vec)."""

    def __call__(self, source: torch.Tensor, full_lengths: list[int], rng: np.random.Generator) -> dict:
        b, samples = source.shape
        frames = frames_for(samples, self.conv_layers)
        # the loader hands over whole-utterance lengths; the batch holds each cropped to `samples`
        # (and padded up to it), which is what `Batch.lengths` carries
        lengths = [min(int(n), samples) for n in full_lengths]
        frame_pad = None
        if any(n < samples for n in lengths):  # only a padded batch has a frame padding mask
            frame_lengths = np.array([frames_for(n, self.conv_layers) for n in lengths])
            frame_pad = np.arange(frames)[None, :] >= frame_lengths[:, None]
        mask = compute_mask_indices((b, frames), frame_pad, self.mask_prob, self.mask_length, rng, self.min_masks)
        counts = mask.sum(1).astype(np.int64)
        # the total as a plain int too: the step sizes its gathers with it without reading a tensor
        out = {"mask": torch.from_numpy(mask), "num_masked": torch.from_numpy(counts), "masked_total": int(counts.sum())}
        if self.num_negatives > 0:
            m = int(counts[0]) if b else 0  # rows have equal counts (require_same_masks)
            out["negatives"] = torch.from_numpy(sample_negatives(b, m, self.num_negatives, rng))
        return out


def span_masker_for(cfg, conv_layers: list | None = None, negatives: bool = True) -> SpanMasker:
    """From a `ModelConfig` (or anything with its mask fields); `conv_layers` overrides the config's."""
    layers = [tuple(x) for x in (cfg.conv_feature_layers if conv_layers is None else conv_layers)]
    return SpanMasker(layers, cfg.mask_prob, cfg.mask_length, cfg.mask_min_masks,
                      cfg.num_negatives if negatives else 0)


def batch_masks(masker: SpanMasker, batch, rng: np.random.Generator) -> dict:
    """The batch's drawn extras, or (a batch built by hand) the same draws from `rng`; CPU tensors."""
    if batch.extras is not None:
        return batch.extras
    return masker(batch.source, [int(n) for n in batch.lengths], rng)
