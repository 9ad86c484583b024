"""data2vec 2.0's block masks, drawn by the data loader as fairseq does (`compute_block_mask_1d`
with `precompute_mask_config`), one (clone_batch, T) block of rows per utterance.

Per row: int(T * (mask_prob + mask_prob_adjust) / mask_length) span centres are drawn with
replacement, each masks centre +- mask_length // 2 (clamped to the utterance), and the row is
then brought to exactly int(T * mask_prob) masked frames by unmasking random masked frames or
masking random unmasked ones. `mask_prob_adjust` only over-draws centres to make up for overlap.

T is the frame count of the whole (uncropped) utterance; the rows are then cropped to the batch's
frame count at their own random offset, independent of the audio crop. That is fairseq's collater,
and it leaves cropped rows with unequal counts (see `BlockMasker.exact_after_crop`).

Everything is a function of the numpy Generator the loader seeds with (seed, epoch, batch id):
the masks do not depend on worker processes, ranks or resumption.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def frames_for(samples: int, conv_layers: list) -> int:
    """Frames the conv feature extractor makes of `samples` samples."""
    for _, kernel, stride in conv_layers:
        samples = (samples - kernel) // stride + 1
    return max(samples, 0)


def equalize(mask: np.ndarray, target: int, rng: np.random.Generator) -> None:
    """Bring every row of `mask` (in place) to exactly `target` True entries, at random positions."""
    for row in mask:
        on = np.flatnonzero(row)
        if len(on) > target:
            row[rng.choice(on, len(on) - target, replace=False)] = False
        elif len(on) < target:
            off = np.flatnonzero(~row)
            row[rng.choice(off, min(len(off), target - len(on)), replace=False)] = True


def block_mask_1d(
    rows: int, length: int, mask_prob: float, mask_length: int, mask_prob_adjust: float, rng: np.random.Generator,
) -> np.ndarray:
    """(rows, length) bool: spans of `mask_length` around random centres, then exactly
    int(length * mask_prob) masked frames per row."""
    mask = np.zeros((rows, length), dtype=bool)
    if length == 0:
        return mask
    num_centres = int(length * ((mask_prob + mask_prob_adjust) / mask_length))
    centres = rng.integers(0, length, size=(rows, num_centres))
    row_ids = np.repeat(np.arange(rows), num_centres)
    offset = mask_length // 2
    for k in range(mask_length):
        mask[row_ids, np.clip(centres.reshape(-1) + k - offset, 0, length - 1)] = True
    equalize(mask, int(length * mask_prob), rng)
    return mask


@dataclass
class BlockMasker:
    """The loader's per-batch hook: {"mask": (B * clone_batch, T) bool, rows utterance-major, and
    "keep": (B * clone_batch, T_keep) the frames the student encodes}."""

    conv_layers: list
    clone_batch: int
    mask_prob: float
    mask_length: int
    mask_prob_adjust: float
    exact_after_crop: bool = False
    """After cropping, bring every row back to exactly int(T * mask_prob) masked frames."""

    def __call__(self, source: torch.Tensor, full_lengths: list[int], rng: np.random.Generator) -> dict:
        num_frames = frames_for(source.shape[1], self.conv_layers)
        blocks = []
        for n in full_lengths:
            length = frames_for(n, self.conv_layers)
            m = block_mask_1d(self.clone_batch, length, self.mask_prob, self.mask_length, self.mask_prob_adjust, rng)
            if length > num_frames:
                start = int(rng.integers(0, length - num_frames + 1))
                m = m[:, start : start + num_frames]
            elif length < num_frames:  # a padded batch (data.pad=true): padding is never masked
                m = np.pad(m, ((0, 0), (0, num_frames - length)))
            blocks.append(m)
        mask = np.concatenate(blocks) if blocks else np.zeros((0, num_frames), dtype=bool)
        if self.exact_after_crop:
            equalize(mask, int(num_frames * self.mask_prob), rng)
        return {"mask": torch.from_numpy(np.ascontiguousarray(mask)), "keep": kept_frames(mask),
                "masked_total": int(mask.sum())}  # an int: the step sizes its gathers without a read


def kept_frames(mask: np.ndarray) -> torch.Tensor:
    """(N, T_keep) indices of the frames the student encodes, in time order. As in fairseq, row 0's
    count of unmasked frames is every row's T_keep (rows are equal unless cropping made them differ)."""
    if len(mask) == 0:
        return torch.zeros((0, mask.shape[1]), dtype=torch.long)
    num_keep = mask.shape[1] - int(mask[0].sum())
    order = np.argsort(mask, axis=1, kind="stable")  # unmasked (False) first, each group in time order
    # a row with more masked frames than row 0 keeps some masked ones too: sort them into place
    return torch.from_numpy(np.sort(order[:, :num_keep], axis=1).astype(np.int64))
