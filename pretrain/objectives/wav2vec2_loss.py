"""wav2vec 2.0 loss terms as functions (fairseq `Wav2vecCriterion` with infonce=True).

loss = CE_sum(logits, positive=0) + w_div * (GV - prob_ppl) / GV * S + w_pen * features_pen * S
with S the number of masked frames. The trainer divides by the global S (over all ranks and
micro-batches), so gradients are normalised per masked frame.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pretrain.models.wav2vec2 import Wav2Vec2Output
from pretrain.objectives.task import LossRecord


def contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy with the positive at index 0; logits (..., 1 + K)."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(flat, flat.new_zeros(flat.shape[0], dtype=torch.long), reduction="sum")


def diversity_loss(prob_perplexity: torch.Tensor, num_vars: int) -> torch.Tensor:
    """(G*V - perplexity) / (G*V): 0 when every codebook entry is used equally."""
    return (num_vars - prob_perplexity) / num_vars


def contrastive_accuracy(logits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(correct, count): the positive has the largest logit (ties where all are equal excluded);
    `correct` stays a device tensor."""
    flat = logits.reshape(-1, logits.shape[-1])
    is_max = flat.argmax(-1) == 0
    is_min = flat.argmin(-1) == 0
    return (is_max & ~is_min).sum(), flat.shape[0]


def wav2vec2_loss(out: Wav2Vec2Output, diversity_weight: float, feature_pen_weight: float) -> LossRecord:
    assert out.logits is not None and out.quantizer is not None
    sample_size = out.logits.shape[0] * out.logits.shape[1]
    ce = contrastive_loss(out.logits)
    div = diversity_loss(out.quantizer.prob_perplexity, out.quantizer.num_vars) * sample_size
    pen = out.features_pen * sample_size
    loss = ce + diversity_weight * div + feature_pen_weight * pen
    correct, count = contrastive_accuracy(out.logits.detach())
    # device tensors: the trainer sums them on the device and reads them once per log interval
    logs = {
        "loss": loss.detach() / math.log(2),
        "contrastive": ce.detach() / math.log(2),
        "diversity": div.detach(),
        "features_pen": pen.detach(),
        "correct": correct,
        "count": float(count),
        "prob_perplexity": out.quantizer.prob_perplexity.detach(),
        "code_perplexity": out.quantizer.code_perplexity.detach(),
        "temperature": out.quantizer.temperature,
    }
    return LossRecord(loss, sample_size, logs)
