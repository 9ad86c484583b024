"""One training loop for every stage: accumulation, mixed precision, DDP, checkpoints, logging."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data_prep.loader import AudioLoader, LoaderConfig
from data_prep.sources import open_source, read_labels
from pretrain.config import RunConfig, batch_summary, dumps
from pretrain.distributed import DistInfo, all_reduce_sum
from pretrain.models.compiled import compile_task
from pretrain.models.encoder import set_activation_checkpointing
from pretrain.models.flops import peak_flops
from pretrain.objectives.task import Task, TrainingError
from pretrain.training import checkpoint as ckpt
from pretrain.training import hardware
from pretrain.training import parallel
from pretrain.training.metrics import MetricLogger
from pretrain.training.optimizer import build_optimizer
from pretrain.training.schedule import lr_at
from pretrain.training.trainer_state import CheckpointMixin

log = logging.getLogger(__name__)
SAMPLE_RATE = 16_000

def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer(CheckpointMixin):
    def __init__(
        self, cfg: RunConfig, task: Task, run_dir: Path, data_dir: Path, device: torch.device,
        dist_info: DistInfo | None = None, labels: str | None = None,
    ) -> None:
        self.cfg, self.task, self.run_dir, self.device = cfg, task, Path(run_dir), device
        self.dist = dist_info or DistInfo()
        t = cfg.train
        t.validate()  # a config built in code skips apply_overrides
        self.precision, why = hardware.resolve_precision(t.precision, t.bf16_for_fp16, device)
        if why:
            log.warning(why)
        seed_all(t.seed + self.dist.rank)
        task.to(device)
        set_activation_checkpointing(task.model, t.activation_checkpointing)
        compile_task(task, t.compile, device)
        self.model: nn.Module = parallel.wrap_model(task, device, self.dist, t.parallelism, self.precision)
        self.ddp = self.dist.world_size > 1
        self.optimizer = build_optimizer(task.model, cfg.optim, device)
        self.scaler = parallel.grad_scaler(self.model, device, t.fp16_init_scale, enabled=self.precision == "fp16")
        self.train_loader = self._loader(data_dir, t.train_split, cfg.data, labels, t.seed)
        valid_cfg = dataclasses.replace(cfg.data, shuffle=False, num_workers=0)
        self.valid_loader = None
        if (Path(data_dir) / f"{t.valid_split}.tsv").exists():
            self.valid_loader = self._loader(data_dir, t.valid_split, valid_cfg, labels, t.seed, packed=False)
        self.step = 0
        self.best_valid = math.inf
        self.bad_steps = 0  # consecutive skipped updates
        self.skipped_updates = 0  # all skipped updates since this process started
        self.stop_signals = None  # a `preemption.StopSignals`, polled between updates
        self.interrupted = False
        text, warning = batch_summary(self.dist.world_size, t.update_freq, cfg.data.max_tokens, t.reference_batch)
        if self.dist.is_main:
            print(text, flush=True)
            if warning:
                log.warning(warning)
                print(f"WARNING: {warning}", flush=True)

    def _loader(self, data_dir, split, cfg: LoaderConfig, labels, seed, packed=None) -> AudioLoader:
        source = open_source(data_dir, split, packed=packed)
        label_lines = read_labels(source, labels) if labels else None
        return AudioLoader(source, cfg, seed=seed, labels=label_lines, rank=self.dist.rank, world_size=self.dist.world_size,
                           extras=getattr(self.task, "batch_extras", None), pin_memory=self.device.type == "cuda")

    # -- the loop ------------------------------------------------------------------------------------
    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def _batches(self):
        while True:
            yield from self.train_loader

    def _slot(self, micro: int) -> int:
        """Global index of a micro-batch within an update: the same batch gets the same slot
        whether it runs on rank r of N or as micro-batch r of update_freq N on one process."""
        return micro * self.dist.world_size + self.dist.rank

    def _reseed(self, micro: int) -> None:
        # Dropout and Gumbel noise depend only on (seed, step, slot): exact resumes, and DDP
        # runs that reproduce single-process gradient accumulation.
        torch.manual_seed(hash((self.cfg.train.seed, self.step, self._slot(micro))) % 2**63)

    def train_update(self, batches) -> dict | None:
        """One optimizer update over `update_freq` micro-batches; None if it was skipped.

        Nothing here waits for the device per micro-batch: logs and the non-finite check stay on
        the device, and the update ends with one all-reduce (sample count, non-finite losses,
        audio, stop requests) and one read of it together with the gradient norm."""
        t = self.cfg.train
        self.model.train()
        self.task.before_update(self.step)
        sums: dict[str, torch.Tensor | float] = defaultdict(float)
        on_device = torch.zeros(2, dtype=torch.float64, device=self.device)  # sample size, non-finite losses
        sample_size, audio_samples = 0, 0  # the host-side parts
        for micro in range(t.update_freq):
            batch = next(batches)
            self._reseed(micro)
            with parallel.no_sync(self.model, micro == t.update_freq - 1):
                with self._autocast():
                    rec = self.task.train_step(self.model, batch, self.task.step_rng(t.seed, self.step, self._slot(micro)))
                loss = rec.loss * (0.0 if batch.is_dummy else 1.0)
                finite = torch.isfinite(loss.detach())
                on_device[1] += (~finite).double()
                # a non-finite loss still runs backward, zeroed, so DDP ranks stay in step; the update is skipped below
                self.scaler.scale(torch.where(finite, loss, torch.zeros_like(loss))).backward()
            if batch.is_dummy:  # every rank logs the same keys, or the all-reduce breaks
                for k in rec.logs:
                    sums[k] += 0.0
                continue
            audio_samples += batch.num_samples
            if isinstance(rec.sample_size, torch.Tensor):
                on_device[0] += rec.sample_size.detach().double()
            else:
                sample_size += rec.sample_size
            for k, v in rec.logs.items():
                sums[k] += v.detach().double() if isinstance(v, torch.Tensor) else v
        stop = float(self.stop_signals is not None and self.stop_signals.received is not None)
        host = torch.tensor([sample_size, 0.0, audio_samples, stop], dtype=torch.float64)
        stats = all_reduce_sum(host.to(self.device) + torch.cat([on_device, on_device.new_zeros(2)]))
        params = [p for p in self.task.model.parameters() if p.requires_grad]
        self.scaler.unscale_(self.optimizer)
        # DDP averaged over ranks; fairseq normalises by the global number of samples instead
        # (no samples anywhere: an infinite scale, an infinite norm, a skipped update)
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, (self.dist.world_size / stats[0]).to(grads[0].dtype))
        gnorm = parallel.clip_grad_norm(params, self.cfg.optim.clip_norm)
        total_size, any_nonfinite, total_audio, stops, gnorm_f = torch.cat(
            [stats, gnorm.detach().reshape(1).to(stats)]).tolist()  # the update's one wait for the device
        self._stop_votes = stops
        if any_nonfinite or not total_size or not math.isfinite(gnorm_f):
            self.optimizer.zero_grad(set_to_none=True)
            reason = "non-finite loss" if any_nonfinite else "non-finite gradient" if total_size else "no samples"
            if self.scaler.is_enabled():
                if any_nonfinite:  # the scaler may have seen no overflow: lower the scale by hand
                    self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
                elif total_size:
                    self.scaler.update()
                else:  # nothing was learned from: keep the scale, end the scaler's step
                    self.scaler.update(self.scaler.get_scale())
                if total_size:
                    reason += f" (fp16 overflow: loss scale lowered to {self.scaler.get_scale():g})"
            self._skip_update(reason)
            return None
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(max(self.step, 1), self.cfg.optim, t.max_steps)
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if scale_before is not None and self.scaler.get_scale() < scale_before:
            # fp16 overflow that only the scaler saw: it skipped the optimizer step
            self._skip_update(f"fp16 overflow: loss scale lowered to {self.scaler.get_scale():g}")
            return None
        self.bad_steps = 0
        self.step += 1
        self.task.after_update(self.step)
        sums["_gnorm"] = gnorm_f
        sums["_audio"] = total_audio
        sums["_micro"] = t.update_freq
        return sums

    def _skip_update(self, reason: str) -> None:
        """Count an update that changed no weight, say why, and stop after `max_bad_steps` in a row.
        Every rank takes the same decision (the loss check and gradients are all-reduced)."""
        self.bad_steps += 1
        self.skipped_updates += 1
        limit = self.cfg.train.max_bad_steps
        if self.dist.is_main:
            print(f"update {self.step + 1} skipped: {reason} ({self.bad_steps} in a row, {self.skipped_updates} "
                  f"in total); the run stops after {limit} in a row (train.max_bad_steps)", flush=True)
        if self.bad_steps >= limit:
            last = ckpt.latest(self.run_dir)
            where = (f"the last good checkpoint is {last}, where the command resumes with the new settings" if last
                     else f"no checkpoint was saved yet (they go to {ckpt.checkpoint_dir(self.run_dir).resolve()})")
            raise TrainingError(
                f"{self.bad_steps} consecutive updates were skipped (the last, update {self.step + 1}: {reason}). "
                "Lower optim.lr, set optim.clip_norm (e.g. 10), or train in bf16/fp32 (--set train.precision=bf16); "
                f"{where}."
            )

    def validate(self) -> dict[str, float] | None:
        if self.valid_loader is None:
            return None
        self.model.eval()
        sums: dict[str, float] = defaultdict(float)
        count = 0
        cap = self.cfg.train.max_valid_batches  # global: each rank takes its share
        limit = -(-cap // self.dist.world_size) if cap else len(self.valid_loader)
        self.valid_loader.epoch, self.valid_loader.position = 1, 0
        with torch.no_grad(), self._autocast():
            for i, batch in enumerate(self.valid_loader):
                if i >= limit:
                    break
                slot = i * self.dist.world_size + self.dist.rank  # masks follow the batch, not the rank
                rec = self.task.valid_step(self.model, batch, np.random.default_rng([self.cfg.train.seed, 10**9, slot]))
                # a dummy batch (a rank with nothing left) counts zero but keeps the logged keys equal
                weight = 0.0 if batch.is_dummy else 1.0
                for k, v in rec.logs.items():
                    sums[k] += weight * v
                count += int(weight)
        keys = all_reduce_sum(_stacked([sums[k] for k in sorted(sums)] + [count], self.device))
        merged = dict(zip(sorted(sums), keys[:-1].tolist()))
        return self.task.summarize(merged, int(keys[-1]))

    def fit(self, logger: MetricLogger) -> dict[str, float]:
        t = self.cfg.train
        batches = self._batches()
        window: dict[str, float] = defaultdict(float)
        updates_in_window, started = 0, time.perf_counter()
        skipped_before = self.skipped_updates  # `skipped` counts per log window, the same on every rank
        flops = self.task.train_flops_per_audio_second()
        peak = peak_flops(self.device)
        last_metrics: dict[str, float] = {}
        warned = False
        while self.step < t.max_steps:
            sums = self.train_update(batches)
            if sums is None:
                continue
            for k, v in sums.items():
                window[k] += v
            updates_in_window += 1
            if self.step % t.log_interval == 0 or self.step == t.max_steps:
                elapsed = time.perf_counter() - started
                keys = sorted(window)
                stats = all_reduce_sum(_stacked([window[k] for k in keys], self.device))  # the window's one read
                merged = dict(zip(keys, stats.tolist()))
                metrics = self.task.summarize(merged, int(merged.get("_micro", updates_in_window)))
                audio_per_s = merged["_audio"] / SAMPLE_RATE / elapsed
                metrics.update(
                    lr=self.optimizer.param_groups[0]["lr"],
                    gnorm=window["_gnorm"] / updates_in_window,
                    skipped=self.skipped_updates - skipped_before,
                    audio_s_per_s=audio_per_s,
                    mfu=(audio_per_s * flops / (peak * self.dist.world_size)) if peak and flops else float("nan"),
                )
                if self.scaler.is_enabled():
                    metrics["loss_scale"] = self.scaler.get_scale()
                logger.log("train", self.step, metrics)
                last_metrics = metrics
                warning = self.task.check_health(self.step, metrics)
                if warning and self.dist.is_main and not warned:
                    log.warning(warning)
                    print(f"WARNING: {warning}", flush=True)
                    warned = True
                window, updates_in_window, started = defaultdict(float), 0, time.perf_counter()
                skipped_before = self.skipped_updates
            if self.step % t.valid_interval == 0 or self.step == t.max_steps:
                valid = self.validate()
                is_best = False
                if valid is not None:
                    logger.log("valid", self.step, valid)
                    score = valid[self.task.best_metric]
                    is_best = score < self.best_valid
                    self.best_valid = min(self.best_valid, score)
                if self.step % t.save_interval == 0 or self.step == t.max_steps or is_best:
                    self.save(is_best)
                started = time.perf_counter()
            elif self.step % t.save_interval == 0:
                self.save()
                started = time.perf_counter()
            if self._stop_requested():
                self.interrupted = True
                break
        return last_metrics

    #: stop requests of all ranks, counted by the last update's all-reduce
    _stop_votes: float = 0.0

    def _stop_requested(self) -> bool:
        """True on every rank once any rank got a stop signal, so all stop at the same update: the
        count travels in the update's own all-reduce (no collective of its own)."""
        if not self.ddp:
            return self.stop_signals is not None and self.stop_signals.received is not None
        return self._stop_votes > 0


def _stacked(values: list, device: torch.device) -> torch.Tensor:
    """Floats and device tensors (logs) as one float64 vector on `device`."""
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    from data_prep.fsutil import atomic_write_text

    atomic_write_text(Path(run_dir) / "config.json", dumps(cfg))
