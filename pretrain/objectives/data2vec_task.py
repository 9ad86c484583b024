"""The data2vec training step: masked student, EMA teacher targets, regression loss, collapse guard."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from data_prep.loader import Batch
from pretrain.config import ModelConfig
from pretrain.distributed import all_reduce_sum
from pretrain.models.data2vec import Data2VecModel
from pretrain.models.flops import train_flops_per_audio_second
from pretrain.models.masked_select import padding_or_none, select_masked
from pretrain.objectives.data2vec_loss import (
    default_scale,
    mean_std,
    regression_loss,
    std_stats,
)
from pretrain.objectives.ema import EMATeacher, ema_decay_at
from pretrain.objectives.span_masks import batch_masks, span_masker_for
from pretrain.objectives.task import LossRecord, Task, TrainingError


class CollapseError(TrainingError):
    """Target or prediction variance fell below fairseq's thresholds after the warm-up."""


class Data2VecTask(Task):
    sum_keys = ("loss", "sample_size", "target_energy")

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.model = Data2VecModel(cfg)
        self.teacher = EMATeacher(self.model.encoder)
        self.num_updates = 0
        self.decay = ema_decay_at(0, cfg.ema_decay, cfg.ema_end_decay, cfg.ema_anneal_end_step)
        self.batch_extras = span_masker_for(cfg, negatives=False)
        """Run by the loader for every batch (in its worker processes): the span masks."""

    def reset_teacher(self) -> None:
        """Start the teacher from the student's current encoder (after loading weights)."""
        device = next(self.model.parameters()).device
        self.teacher = EMATeacher(self.model.encoder, self.teacher.copied).to(device)

    def to(self, device: torch.device) -> Data2VecTask:
        self.model.to(device)
        self.teacher.to(device)
        return self

    def _run(self, model: nn.Module, batch: Batch, rng: np.random.Generator, check: bool) -> LossRecord:
        device = self.model.mask_emb.device
        src = batch.source.to(device, non_blocking=True)
        pad = padding_or_none(batch.padding_mask)  # looked at on the host, before the copy
        pad = None if pad is None else pad.to(device, non_blocking=True)
        extras = batch_masks(self.batch_extras, batch, rng)
        n = extras["masked_total"]
        mask = extras["mask"].to(device, non_blocking=True)
        draws = torch.from_numpy(rng.random(self.cfg.encoder_layers))
        out = model(src, pad, mask, draws, num_masked=n)
        y = self.teacher.targets(out.teacher_input, out.padding_mask, self.cfg.average_top_k_layers,
                                 self.cfg.instance_norm_target_layer)
        y = select_masked(y, mask, n)
        loss = regression_loss(out.predictions, y, self.cfg.loss_beta, default_scale(self.cfg))
        with torch.no_grad():
            stats = all_reduce_sum(torch.stack([std_stats(y), std_stats(out.predictions.detach())]))
        target_std, pred_std = mean_std(stats[0]), mean_std(stats[1])
        if check and self.num_updates > self.cfg.collapse_check_after:
            self._watch_collapse(target_std, pred_std)
        # the loss of predicting zero: how much there is to explain (loss / target_energy < 1 = learning)
        energy = regression_loss(torch.zeros_like(y[:1]).expand_as(y), y, self.cfg.loss_beta, default_scale(self.cfg))
        logs = {"loss": loss.detach(), "sample_size": n, "target_energy": energy,
                "target_var": target_std, "pred_var": pred_std, "ema_decay": self.decay}
        return LossRecord(loss, n, logs)

    #: (lowest target std, lowest prediction std, update) seen by this update's micro-batches, on
    #: the device: read once, when the update ends, instead of stalling every micro-batch
    _watched: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def _watch_collapse(self, target_std: torch.Tensor, pred_std: torch.Tensor) -> None:
        if self._watched is not None:
            target_std = torch.minimum(target_std, self._watched[0])
            pred_std = torch.minimum(pred_std, self._watched[1])
        self._watched = (target_std, pred_std, self.num_updates)

    def _check_collapse(self) -> None:
        """Raise `CollapseError` if a micro-batch of the update that just ran saw collapsed variances."""
        if self._watched is None:
            return
        target_std, pred_std, update = self._watched
        self._watched = None
        target_std, pred_std = (float(v) for v in torch.stack([target_std, pred_std]).tolist())
        c = self.cfg
        if target_std < c.min_target_var:
            raise CollapseError(
                f"teacher targets collapsed at update {update}: target variance {target_std:.4f} < "
                f"{c.min_target_var}. The teacher now outputs nearly the same vector everywhere. Resume from an "
                "earlier checkpoint with a lower optim.lr, a longer optim warm-up, or a slower EMA "
                "(model.ema_anneal_end_step), and check that data.normalize is on."
            )
        if pred_std < c.min_pred_var:
            raise CollapseError(
                f"student predictions collapsed at update {update}: prediction variance {pred_std:.4f} "
                f"< {c.min_pred_var}. Resume from an earlier checkpoint with a lower optim.lr or clip the "
                "gradients (optim.clip_norm)."
            )

    def train_step(self, model: nn.Module, batch: Batch, rng: np.random.Generator) -> LossRecord:
        return self._run(model, batch, rng, check=True)

    def valid_step(self, model: nn.Module, batch: Batch, rng: np.random.Generator) -> LossRecord:
        return self._run(model, batch, rng, check=False)

    def before_update(self, step: int) -> None:
        self._check_collapse()  # an update that was skipped is checked here
        self.num_updates = step

    def after_update(self, step: int) -> None:
        self._check_collapse()
        self.num_updates = step
        self.decay = ema_decay_at(step, self.cfg.ema_decay, self.cfg.ema_end_decay, self.cfg.ema_anneal_end_step)
        if self.decay < 1:
            self.teacher.update(self.model.encoder, self.decay)

    def summarize(self, sums: dict[str, float], count: int) -> dict[str, float]:
        n = max(sums.get("sample_size", 0.0), 1.0)
        return {
            "loss": sums["loss"] / n,
            "target_energy": sums["target_energy"] / n,
            "target_var": sums["target_var"] / max(count, 1),
            "pred_var": sums["pred_var"] / max(count, 1),
            "ema_decay": sums["ema_decay"] / max(count, 1),
        }

    def extra_state(self) -> dict:
        return {"teacher": self.teacher.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_extra_state(self, state: dict) -> None:
        if "teacher" in state:
            self.teacher.load_state_dict(state["teacher"])
            self.num_updates = int(state.get("num_updates", 0))
            self.decay = float(state.get("decay", self.decay))

    def train_flops_per_audio_second(self) -> float:
        # student forward + backward (3x) and the teacher forward (1x) over the encoder
        return train_flops_per_audio_second(self.cfg) * 4 / 3
