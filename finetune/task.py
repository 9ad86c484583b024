"""The CTC fine-tuning step (fairseq `CtcCriterion` with `sentence_avg`, `zero_infinity`)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_prep.labels import letters_to_words
from data_prep.loader import Batch
from pretrain.models.flops import train_flops_per_audio_second
from pretrain.models.masked_select import padding_or_none
from pretrain.objectives.masking import compute_mask_indices
from pretrain.objectives.task import LossRecord, Task, TrainingError
from pretrain.objectives.wav2vec2_task import draw_masks

from .config import FinetuneConfig
from .decoder import GreedyDecoder
from .dictionary import BLANK, Dictionary
from .model import CTCModel
from .wer import ErrorCounts


def ctc_loss(logits: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
    """Summed over utterances; logits (B, T, V); an utterance too short for its labels counts zero."""
    lprobs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)
    flat = torch.tensor([i for t in targets for i in t], dtype=torch.long)
    target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
    with torch.backends.cudnn.flags(enabled=False):  # cuDNN's CTC has stricter input rules
        return F.ctc_loss(
            lprobs, flat.to(logits.device), lengths, target_lengths.to(logits.device),
            blank=BLANK, reduction="sum", zero_infinity=True,
        )


def greedy_decode(logits: torch.Tensor, lengths: torch.Tensor, dictionary: Dictionary) -> list[str]:
    """Best path: argmax per frame, merge repeats, drop blanks, letters -> words."""
    decode = GreedyDecoder(dictionary)
    return [decode(logits[i, : int(n)]) for i, n in enumerate(lengths.cpu())]


class CTCTask(Task):
    sum_keys = ("loss", "sample_size", "ntokens", "word_errors", "words", "char_errors", "chars")
    has_unused_parameters = True  # frozen encoder / LayerDrop leave parameters without gradients

    def __init__(self, cfg: FinetuneConfig, dictionary: Dictionary) -> None:
        if cfg.ctc.best_metric not in ("wer", "cer", "loss"):
            raise ValueError(f"ctc.best_metric must be wer, cer or loss, got {cfg.ctc.best_metric!r}")
        self.cfg = cfg
        self.dictionary = dictionary
        self.best_metric = cfg.ctc.best_metric
        self.model = CTCModel(cfg.model, len(dictionary), cfg.ctc.final_dropout)
        self.num_updates = 0

    @property
    def frozen(self) -> bool:
        return self.num_updates < self.cfg.ctc.freeze_finetune_updates

    def before_update(self, step: int) -> None:
        self.num_updates = step

    def _inputs(self, batch: Batch):
        device = self.model.proj.weight.device
        src = batch.source.to(device, non_blocking=True)
        pad = padding_or_none(batch.padding_mask)  # looked at on the host, before the copy
        pad = None if pad is None else pad.to(device, non_blocking=True)
        if batch.labels is None:
            raise TrainingError("fine-tuning needs labels: the manifest has no label file next to it")
        targets = [self.dictionary.encode(line) for line in batch.labels]
        return src, pad, targets

    def train_step(self, model: nn.Module, batch: Batch, rng: np.random.Generator) -> LossRecord:
        src, pad, targets = self._inputs(batch)
        m, c = self.cfg.model, self.cfg.ctc
        time_mask = channel_mask = None
        if c.apply_mask and m.mask_prob > 0:
            time_mask = draw_masks(self.model.w2v, batch, m, rng, src.device)
        if c.apply_mask and c.mask_channel_prob > 0:
            shape = (src.shape[0], m.encoder_embed_dim)
            channel_mask = torch.from_numpy(
                compute_mask_indices(shape, None, c.mask_channel_prob, c.mask_channel_length, rng)
            ).to(src.device)
        draws = torch.from_numpy(rng.random(self.model.num_layers))
        logits, frame_pad = model(src, pad, time_mask, channel_mask, draws, frozen=self.frozen)
        lengths = self.model.output_lengths(logits, frame_pad)
        loss = ctc_loss(logits, lengths, targets)
        n = len(targets)
        logs = {"loss": loss.detach(), "sample_size": float(n), "ntokens": float(sum(map(len, targets)))}
        return LossRecord(loss, n, logs)

    @torch.no_grad()
    def valid_step(self, model: nn.Module, batch: Batch, rng: np.random.Generator) -> LossRecord:
        src, pad, targets = self._inputs(batch)
        logits, frame_pad = model(src, pad)
        lengths = self.model.output_lengths(logits, frame_pad)
        loss = ctc_loss(logits, lengths, targets)
        counts = ErrorCounts()
        for ref, hyp in zip(batch.labels, greedy_decode(logits, lengths, self.dictionary)):
            counts.add(letters_to_words(ref), hyp)
        n = len(targets)
        logs = {
            "loss": float(loss), "sample_size": float(n), "ntokens": float(sum(map(len, targets))),
            "word_errors": float(counts.word_errors), "words": float(counts.words),
            "char_errors": float(counts.char_errors), "chars": float(counts.chars),
        }
        return LossRecord(loss, n, logs)

    def summarize(self, sums: dict[str, float], count: int) -> dict[str, float]:
        out = {"loss": sums["loss"] / max(sums.get("sample_size", 0.0), 1.0)}
        out["loss_per_token"] = sums["loss"] / max(sums.get("ntokens", 0.0), 1.0)
        if sums.get("words"):
            out["wer"] = 100.0 * sums["word_errors"] / sums["words"]
            out["cer"] = 100.0 * sums["char_errors"] / max(sums["chars"], 1.0)
        return out

    def check_health(self, step: int, metrics: dict[str, float]) -> str | None:
        if not math.isfinite(metrics.get("loss", 0.0)):
            return "the CTC loss is not finite: check labels and audio lengths"
        return None

    def extra_state(self) -> dict:
        return {"symbols": self.dictionary.symbols}

    def load_extra_state(self, state: dict) -> None:
        saved = state.get("symbols")
        if saved is not None and saved != self.dictionary.symbols:
            raise TrainingError(
                f"the checkpoint's vocabulary ({len(saved)} symbols) differs from this run's dict.ltr.txt "
                f"({len(self.dictionary)}); resume with the same data directory or start a new --out"
            )

    def train_flops_per_audio_second(self) -> float:
        # every block counts, data2vec 2.0's prenet included
        return train_flops_per_audio_second(dataclasses.replace(self.cfg.model, encoder_layers=self.model.num_layers))
