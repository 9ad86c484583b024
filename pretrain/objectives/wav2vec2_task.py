"""The wav2vec 2.0 training step: sample masks and negatives, run the model, compute the loss."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from data_prep.loader import Batch
from pretrain.config import ModelConfig
from pretrain.models.flops import train_flops_per_audio_second
from pretrain.models.masked_select import padding_or_none
from pretrain.models.wav2vec2 import Wav2Vec2Model
from pretrain.objectives.span_masks import batch_masks, span_masker_for
from pretrain.objectives.task import LossRecord, Task
from pretrain.objectives.wav2vec2_loss import wav2vec2_loss


def draw_masks(model: Wav2Vec2Model, batch: Batch, cfg: ModelConfig, rng: np.random.Generator, device):
    """Frame padding mask and span mask for a batch (fairseq: min_masks spans, equal counts); the
    in-step draw (CTC fine-tuning), the same function the pretraining loader runs in its workers."""
    masker = span_masker_for(cfg, model.feature_extractor.layers_spec, negatives=False)
    return masker(batch.source, [int(n) for n in batch.lengths], rng)["mask"].to(device)


class Wav2Vec2Task(Task):
    sum_keys = ("loss", "contrastive", "diversity", "features_pen", "correct", "count", "sample_size")

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.model = Wav2Vec2Model(cfg)
        self.batch_extras = span_masker_for(cfg)
        """Run by the loader for every batch (in its worker processes): masks and negatives."""

    def _run(self, model: nn.Module, batch: Batch, rng: np.random.Generator) -> LossRecord:
        device = self.model.mask_emb.device
        src = batch.source.to(device, non_blocking=True)
        pad = padding_or_none(batch.padding_mask)  # looked at on the host, before the copy
        pad = None if pad is None else pad.to(device, non_blocking=True)
        extras = batch_masks(self.batch_extras, batch, rng)  # CPU tensors: nothing read back from the device
        mask = extras["mask"].to(device, non_blocking=True)
        negs = extras["negatives"].to(device, non_blocking=True)
        # LayerDrop draws stay per update (seed, step, slot), like dropout; a CPU tensor, no sync
        draws = torch.from_numpy(rng.random(self.cfg.encoder_layers))
        out = model(src, pad, mask, negs, draws)
        record = wav2vec2_loss(out, self.cfg.diversity_weight, self.cfg.feature_pen_weight)
        record.logs["sample_size"] = float(record.sample_size)
        return record

    def train_step(self, model: nn.Module, batch: Batch, rng: np.random.Generator) -> LossRecord:
        return self._run(model, batch, rng)

    def valid_step(self, model: nn.Module, batch: Batch, rng: np.random.Generator) -> LossRecord:
        return self._run(model, batch, rng)

    def before_update(self, step: int) -> None:
        self.model.set_num_updates(step)

    def summarize(self, sums: dict[str, float], count: int) -> dict[str, float]:
        n = max(sums.get("sample_size", 0.0), 1.0)
        return {
            "loss": sums["loss"] / n,
            "contrastive": sums["contrastive"] / n,
            "diversity": sums["diversity"] / n,
            "features_pen": sums["features_pen"] / n,
            "accuracy": sums["correct"] / max(sums["count"], 1.0),
            "prob_perplexity": sums["prob_perplexity"] / max(count, 1),
            "code_perplexity": sums["code_perplexity"] / max(count, 1),
            "temperature": sums["temperature"] / max(count, 1),
        }

    def check_health(self, step: int, metrics: dict[str, float]) -> str | None:
        total = self.cfg.latent_vars * self.cfg.latent_groups
        ppl = metrics.get("code_perplexity", math.inf)
        if step >= 1000 and ppl < 0.1 * total:
            return (
                f"codebook collapse: code perplexity {ppl:.1f} of {total} entries at step {step}; "
                "raise model.diversity_weight, lower optim.lr, or check the input normalisation"
            )
        return None

    def train_flops_per_audio_second(self) -> float:
        return train_flops_per_audio_second(self.cfg)
