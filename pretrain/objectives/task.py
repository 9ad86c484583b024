"""What differs between training stages: the model, the step function and its metrics.

The trainer (`pretrain.training.trainer`) is the same for wav2vec 2.0, data2vec and CTC fine-tuning; each
stage supplies a `Task`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from data_prep.loader import Batch


class TrainingError(RuntimeError):
    """A run that cannot continue, with what went wrong and what to try."""


@dataclass
class LossRecord:
    loss: torch.Tensor
    """Summed over masked frames (divide by `sample_size`)."""
    sample_size: int
    logs: dict[str, float]
    """Sums (divided by sample_size when logged) and plain values, see `metric_kinds`."""


class Task:
    """Interface; see `Wav2Vec2Task` for an implementation."""

    model: nn.Module
    #: log keys that are sums over samples (divided when summarised) vs. per-step values (averaged)
    sum_keys: tuple[str, ...] = ()
    #: validation metric that picks the best checkpoint (lower is better)
    best_metric: str = "loss"

    def step_rng(self, seed: int, step: int, slot: int) -> np.random.Generator:
        """Masks and negatives of micro-batch `slot` of update `step`."""
        return np.random.default_rng([seed, step, slot])

    def train_step(self, model: nn.Module, batch: Batch, rng: np.random.Generator) -> LossRecord:
        raise NotImplementedError

    def valid_step(self, model: nn.Module, batch: Batch, rng: np.random.Generator) -> LossRecord:
        return self.train_step(model, batch, rng)

    def before_update(self, step: int) -> None:
        """Called before update `step` + 1 (e.g. the Gumbel temperature for this update)."""

    def after_update(self, step: int) -> None:
        """Called after the optimizer step that made `step` updates (e.g. the EMA teacher)."""

    def summarize(self, sums: dict[str, float], count: int) -> dict[str, float]:
        raise NotImplementedError

    def check_health(self, step: int, metrics: dict[str, float]) -> str | None:
        """A warning to print, if the metrics show trouble."""
        return None

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def train_flops_per_audio_second(self) -> float:
        return 0.0

    def to(self, device: torch.device) -> "Task":
        self.model.to(device)
        return self
