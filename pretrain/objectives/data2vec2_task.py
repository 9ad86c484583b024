"""The data2vec 2.0 training step: one teacher pass per utterance, `clone_batch` masked student
copies, the decoder's predictions at masked frames regressed onto instance-normed top-k targets.

Masks come with the batch from the loader (`BlockMasker`, drawn in its workers as fairseq does);
the loss, collapse guard, EMA schedule and checkpoint state are data2vec's (`Data2VecTask`): the
sum over masked frames of all clones of ||pred - target||^2 / sqrt(D), divided by their count.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from data_prep.loader import Batch
from pretrain.config import ModelConfig
from pretrain.distributed import all_reduce_sum
from pretrain.models.data2vec2 import Data2Vec2Model
from pretrain.models.flops import forward_flops_per_audio_second
from pretrain.models.masked_select import padding_or_none, select_masked
from pretrain.objectives.block_mask import BlockMasker
from pretrain.objectives.data2vec_loss import (
    default_scale,
    mean_std,
    regression_loss,
    std_stats,
)
from pretrain.objectives.data2vec_task import Data2VecTask
from pretrain.objectives.ema import EMATeacher, ema_decay_at
from pretrain.objectives.task import LossRecord


def masker_for(cfg: ModelConfig) -> BlockMasker:
    return BlockMasker(cfg.conv_feature_layers, cfg.clone_batch, cfg.mask_prob, cfg.mask_length,
                       cfg.mask_prob_adjust, cfg.mask_exact_after_crop)


class Data2Vec2Task(Data2VecTask):
    sum_keys = ("loss", "sample_size", "target_energy")

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.model = Data2Vec2Model(cfg)
        # every teacher parameter is averaged (positional conv and ALiBi scales too); the CNN,
        # projection and decoder have no teacher copy
        self.teacher = EMATeacher(self.model.encoder, copied=())
        self.num_updates = 0
        self.decay = ema_decay_at(0, cfg.ema_decay, cfg.ema_end_decay, cfg.ema_anneal_end_step)
        self.batch_extras = masker_for(cfg)
        """Run by the loader for every batch (in its worker processes)."""

    def _masks(self, batch: Batch, rng: np.random.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(mask, keep) on the device and the masked count, counted on the host (CPU tensors)."""
        extras = batch.extras
        if extras is None:  # a batch from elsewhere (tests, tools): draw with the step's generator
            extras = self.batch_extras(batch.source, [int(n) for n in batch.lengths], rng)
        mask, keep = extras["mask"], extras["keep"]
        return mask.to(device, non_blocking=True), keep.to(device, non_blocking=True), extras.get("masked_total")

    def _run(self, model: nn.Module, batch: Batch, rng: np.random.Generator, check: bool) -> LossRecord:
        c = self.cfg
        device = self.model.post_extract_proj.weight.device
        src = batch.source.to(device, non_blocking=True)
        pad = padding_or_none(batch.padding_mask)  # looked at on the host, before the copy
        pad = None if pad is None else pad.to(device, non_blocking=True)
        mask, keep, n = self._masks(batch, rng, device)
        draws = torch.from_numpy(rng.random(c.prenet_depth + c.encoder_layers))
        out = model(src, pad, mask, keep, draws, num_masked=n)
        clones = mask.shape[0] // src.shape[0]
        y = self.teacher.targets(out.teacher_input, out.padding_mask, c.average_top_k_layers, c.instance_norm_target_layer)
        y = select_masked(y.repeat_interleave(clones, 0), mask, n)  # one teacher pass serves every clone
        scale = default_scale(c)
        loss = regression_loss(out.predictions, y, c.loss_beta, scale)
        with torch.no_grad():
            stats = all_reduce_sum(torch.stack([std_stats(y), std_stats(out.predictions.detach())]))
        target_std, pred_std = mean_std(stats[0]), mean_std(stats[1])
        if check and self.num_updates > c.collapse_check_after:
            self._watch_collapse(target_std, pred_std)
        energy = regression_loss(torch.zeros_like(y[:1]).expand_as(y), y, c.loss_beta, scale)
        n = mask.sum() if n is None else n
        logs = {"loss": loss.detach(), "sample_size": n, "target_energy": energy,
                "target_var": target_std, "pred_var": pred_std, "ema_decay": self.decay,
                "masked_pct": 1.0 - keep.shape[1] / mask.shape[1]}
        return LossRecord(loss, n, logs)

    def valid_step(self, model: nn.Module, batch: Batch, rng: np.random.Generator) -> LossRecord:
        # the decoder's mask noise comes from torch's generator, which validation does not reseed:
        # seed it from the batch's rng, so the loss does not depend on the ranks or on what ran before
        device = self.model.post_extract_proj.weight.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int(rng.integers(2**62)))
            return self._run(model, batch, rng, check=False)

    def summarize(self, sums: dict[str, float], count: int) -> dict[str, float]:
        out = super().summarize(sums, count)
        out["masked_pct"] = sums.get("masked_pct", 0.0) / max(count, 1)
        return out

    def train_flops_per_audio_second(self) -> float:
        """Student: conv front end once, `clone_batch` encoder passes over the kept frames (forward
        + backward); teacher: one forward over all frames. Decoder convs left out (small)."""
        c = self.cfg
        conv_only = forward_flops_per_audio_second(_with_layers(c, 0), 0)
        encoder = forward_flops_per_audio_second(_with_layers(c, c.prenet_depth + c.encoder_layers)) - conv_only
        return 3 * conv_only + c.clone_batch * (1 - c.mask_prob) * 3 * encoder + encoder


def _with_layers(cfg: ModelConfig, n: int) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg, encoder_layers=n)
