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
from pretrain.training.metrics import MetricLogger
from pretrain.training.optimizer import build_optimizer
from pretrain.training.schedule import lr_at

log = logging.getLogger(__name__)
SAMPLE_RATE = 16_000

def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(
        self, cfg: RunConfig, task: Task, run_dir: Path, data_dir: Path, device: torch.device,
        dist_info: DistInfo | None = None, labels: str | None = None,
    ) -> None:
        self.cfg, self.task, self.run_dir, self.device = cfg, task, Path(run_dir), device
        self.dist = dist_info or DistInfo()
        t = cfg.train
        t.validate()  # a config built in code skips apply_overrides
        self.precision = t.precision
        if device.type != "cuda" and t.precision == "fp16":
            # fp16 needs dynamic loss scaling and fast fp16 kernels, which only CUDA has here
            log.warning("train.precision=fp16 needs a CUDA GPU; this run is on %s and trains in fp32 instead "
                        "(--set train.precision=bf16 gives mixed precision on a CPU, fp32 silences this)", device.type)
            self.precision = "fp32"
        seed_all(t.seed + self.dist.rank)
        task.to(device)
        set_activation_checkpointing(task.model, t.activation_checkpointing)
        compile_task(task, t.compile, device)
        self.model: nn.Module = task.model
        self.ddp = self.dist.world_size > 1
        if self.ddp:
            layerdrop = getattr(task.model.cfg, "encoder_layerdrop", 0.0) if hasattr(task.model, "cfg") else 0.0
            self.model = nn.parallel.DistributedDataParallel(
                task.model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=layerdrop > 0 or getattr(task, "has_unused_parameters", False),
            )
        self.optimizer = build_optimizer(task.model, cfg.optim, device)
        self.scaler = torch.amp.GradScaler(device.type, init_scale=t.fp16_init_scale, enabled=self.precision == "fp16")
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
                           extras=getattr(self.task, "batch_extras", None))

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": 1,
            "step": self.step,
            "config": self.cfg.to_dict(),
            "model": self.task.model.state_dict(),
            "task": self.task.extra_state(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loader": self.train_loader.state_dict(),
            "best_valid": self.best_valid,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

    def load_state_dict(self, state: dict, where: Path) -> None:
        ckpt.check_architecture(state["config"]["model"], self.cfg.to_dict()["model"], where)
        self.task.load_extra_state(state.get("task", {}))  # first: it may refuse an incompatible checkpoint
        self.task.model.load_state_dict(state["model"])
        names = [n for n, p in self.task.model.named_parameters() if p.requires_grad]
        self.optimizer.load_state_dict(ckpt.align_optimizer_state(state["optimizer"], state["model"].keys(), names))
        self.scaler.load_state_dict(state["scaler"])
        self.train_loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.best_valid = float(state.get("best_valid", math.inf))
        self.best_step = state.get("best_step")
        rng = state.get("rng") or {}
        if rng:
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def resume_if_possible(self) -> bool:
        """Resume from the run's newest readable checkpoint, if it has one. Rank 0 inspects the
        directory (`checkpoint.recover`: fallbacks, repairs) and tells the other ranks which step
        to load, so every rank resumes from the same one or all stop together."""
        found: tuple[Path, dict] | None = None
        error: ckpt.CheckpointError | None = None
        if self.dist.is_main:
            try:
                found = ckpt.recover(self.run_dir)
            except ckpt.CheckpointError as err:
                error = err
        if self.ddp:
            mine = -2 if error else -1 if found is None else int(found[1]["step"])
            shared = torch.tensor([mine if self.dist.is_main else 0], dtype=torch.float64, device=self.device)
            chosen = int(all_reduce_sum(shared).item())
            if chosen == -2 and not self.dist.is_main:
                raise ckpt.CheckpointError("rank 0 found no readable checkpoint to resume from; see its message")
            if chosen >= 0 and not self.dist.is_main:
                path = ckpt.step_path(self.run_dir, chosen)
                path = path if path.exists() else ckpt.resolve(self.run_dir)  # a plain-file last.pt
                found = path, ckpt.load(path)
        if error is not None:
            raise error
        if found is None:
            return False
        path, state = found
        self.load_state_dict(state, path)
        self.saved_step = self.step  # already on disk: the run's final save need not write it again
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)
        return True

    #: the step of the best checkpoint so far (recorded in every checkpoint; `best.pt` follows it)
    best_step: int | None = None
    #: the step last written to disk, so that no step is saved twice
    saved_step: int | None = None

    def save(self, is_best: bool = False) -> None:
        """Checkpoint the current step on rank 0, once per step: the runner's save after `fit`
        writes only when `fit` stopped between checkpoints (a stop signal). A failed save raises
        `checkpoint.CheckpointError` on every rank, so none waits for rank 0 in a collective."""
        if self.step == self.saved_step:
            return
        if is_best:
            self.best_step = self.step
        error: ckpt.CheckpointError | None = None
        if self.dist.is_main:
            state = self.state_dict()
            state["best_step"] = self.best_step
            try:
                ckpt.save(self.run_dir, self.step, state, self.cfg.train.keep_last, is_best)
            except ckpt.CheckpointError as err:
                error = err
        if self.ddp:
            failed = all_reduce_sum(torch.tensor([float(error is not None)], device=self.device)).item() > 0
            if failed and error is None:
                error = ckpt.CheckpointError(f"rank 0 could not save step {self.step}; see its message")
        if error is not None:
            raise error
        self.saved_step = self.step

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
        """One optimizer update over `update_freq` micro-batches; None if it was skipped."""
        t = self.cfg.train
        self.model.train()
        self.task.before_update(self.step)
        sums: dict[str, float] = defaultdict(float)
        sample_size, audio_samples, nonfinite = 0, 0, 0
        for micro in range(t.update_freq):
            batch = next(batches)
            self._reseed(micro)
            sync = micro == t.update_freq - 1
            ctx = self.model.no_sync() if self.ddp and not sync else contextlib.nullcontext()
            with ctx:
                with self._autocast():
                    rec = self.task.train_step(self.model, batch, self.task.step_rng(t.seed, self.step, self._slot(micro)))
                loss = rec.loss * (0.0 if batch.is_dummy else 1.0)
                if not torch.isfinite(loss.detach()):
                    nonfinite += 1
                    loss = loss.nan_to_num(0.0, 0.0, 0.0) * 0.0  # still run backward so DDP ranks stay in step
                self.scaler.scale(loss).backward()
            if not batch.is_dummy:
                sample_size += rec.sample_size
                audio_samples += batch.num_samples
            for k, v in rec.logs.items():  # every rank logs the same keys, or the all-reduce breaks
                sums[k] += 0.0 if batch.is_dummy else v
        stats = all_reduce_sum(torch.tensor([sample_size, nonfinite, audio_samples], dtype=torch.float64, device=self.device))
        total_size, any_nonfinite, total_audio = float(stats[0]), float(stats[1]), float(stats[2])
        params = [p for p in self.task.model.parameters() if p.requires_grad]
        if any_nonfinite == 0 and total_size > 0:
            self.scaler.unscale_(self.optimizer)
            # DDP averaged over ranks; fairseq normalises by the global number of samples instead.
            scale = self.dist.world_size / total_size
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
            max_norm = self.cfg.optim.clip_norm if self.cfg.optim.clip_norm > 0 else math.inf
            gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            gnorm_f = float(gnorm)
        else:
            gnorm_f = math.nan
        if not math.isfinite(gnorm_f):
            self.optimizer.zero_grad(set_to_none=True)
            reason = "non-finite loss" if any_nonfinite else "non-finite gradient" if total_size else "no samples"
            if self.scaler.is_enabled() and total_size > 0:
                if any_nonfinite:  # unscale_ did not run, so the scaler saw no overflow: lower it by hand
                    self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
                else:
                    self.scaler.update()
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
        keys = torch.tensor([sums[k] for k in sorted(sums)] + [count], dtype=torch.float64, device=self.device)
        keys = all_reduce_sum(keys)
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
                stats = torch.tensor([window[k] for k in keys], dtype=torch.float64, device=self.device)
                if self.ddp:
                    stats = all_reduce_sum(stats)
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

    def _stop_requested(self) -> bool:
        """True on every rank once any rank got a stop signal, so all stop at the same update."""
        local = self.stop_signals is not None and self.stop_signals.received is not None
        if not self.ddp:
            return local
        return bool(all_reduce_sum(torch.tensor([float(local)], device=self.device)).item() > 0)


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    from data_prep.fsutil import atomic_write_text

    atomic_write_text(Path(run_dir) / "config.json", dumps(cfg))
