"""Running a training stage end to end: devices, distributed set-up, the run-directory lock
(`run_lock`), resume, fit, final checkpoint.

Shared by `python -m pretrain` and `python -m finetune`; a stage supplies its task.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pretrain.config import RunConfig
from pretrain.objectives.task import Task
from pretrain.training.run_lock import BUSY, RunDirBusy, RunLock


def pick_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass
class _Outcome:
    """What the run's summary needs from the trainer, kept after the trainer is freed."""

    step: int
    interrupted: bool
    best_valid: float
    best_metric: str

    @classmethod
    def of(cls, trainer) -> "_Outcome":
        return cls(trainer.step, trainer.interrupted, trainer.best_valid, trainer.task.best_metric)


def run(
    cfg: RunConfig,
    data: Path,
    out: Path,
    device_name: str | None,
    build: Callable[[], Task],
    init: Callable[[Task], None] | None = None,
    labels: str | None = None,
) -> int:
    """Train `build()` on `data` into `out`; `init(task)` runs only when there is nothing to resume.

    Returns 0 when done, 1 on a training or checkpoint error, `BUSY` when another process holds
    `out`, `preemption.INTERRUPTED` when stopped by a signal (after saving a checkpoint, and
    requeueing the SLURM job after a time-limit warning)."""
    from pretrain import distributed
    from pretrain.training import hardware
    from pretrain.training.checkpoint import CheckpointError, latest
    from pretrain.training.metrics import MetricLogger
    from pretrain.training.preemption import (
        INTERRUPTED,
        StopSignals,
        requeue_after,
        wait_for_requeue,
        will_requeue,
    )
    from pretrain.training.trainer import Trainer, TrainingError, seed_all, write_config

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = pick_device(device_name)
    signals = StopSignals.for_process()
    info = distributed.init(device.type)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)
    hardware.configure_backends(device)
    _, cfg.data.num_workers = hardware.bound_threads(cfg.data.num_workers, device)
    lock = RunLock(None)
    trainer = task = None
    finished = False
    try:
        lock = RunLock.for_ranks(out, info, device)  # before anything reads or writes the run
        seed_all(cfg.train.seed)  # the same initial weights on every rank and every run
        task = build()
        if init is not None and cfg.train.parallelism == "fsdp" and info.world_size > 1 and latest(out) is None:
            # FSDP shards the model in place, and `init` loads whole tensors: load them before
            init(task)
            init = None
        trainer = Trainer(cfg, task, out, data, device, info, labels=labels)
        trainer.stop_signals = signals
        resumed = trainer.resume_if_possible()
        if not resumed and init is not None:
            init(task)
        if info.is_main:
            write_config(out, cfg)
            write_run_info(out, data, info.world_size, device)
        logger = MetricLogger(out, trainer.step, enabled=info.is_main)
        final = trainer.fit(logger)
        trainer.save()  # writes only if fit stopped between checkpoints (a stop signal)
        logger.close()
        finished = True
    except RunDirBusy as err:
        if info.is_main:
            print(f"error: {err}", file=sys.stderr)
        return BUSY
    except (TrainingError, ValueError, FileNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        lock.release()  # before a requeue: the requeued job must find the directory free
        outcome = _Outcome.of(trainer) if trainer is not None else None
        # DDP's reducer holds the process group: free it while Python is fully alive, or gloo's
        # threads die in interpreter shutdown and abort the process (SIGABRT at exit)
        trainer = task = None
        gc.collect()
        distributed.shutdown(wait_for_all=finished)
        StopSignals.release()
    if outcome.interrupted:
        requeued = will_requeue(signals)
        if info.is_main:
            message, requeued = requeue_after(signals)
            print(f"step {outcome.step}: {message}", flush=True)
        if requeued:
            wait_for_requeue()  # SLURM stops this process as it requeues the job
        return INTERRUPTED
    if info.is_main:
        summary = {"step": outcome.step, "run_dir": str(out), **{k: round(v, 4) for k, v in final.items()}}
        if outcome.best_valid != float("inf"):
            summary[f"best_valid_{outcome.best_metric}"] = round(outcome.best_valid, 4)
        print(json.dumps(summary))
    return 0


def write_run_info(out: Path, data: Path, world_size: int, device: torch.device) -> None:
    """`RUN/run.json`: what trained the run beside its config (the data it read, on how many ranks
    of what), for model cards and reports; rewritten by each (re)start."""
    from data_prep.fsutil import atomic_write_text

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    info = {"data": str(Path(data).resolve()), "world_size": int(world_size), "device": name,
            "torch": torch.__version__}
    atomic_write_text(Path(out) / "run.json", json.dumps(info, indent=2) + "\n")
