"""The trainer's checkpoint side: what a checkpoint holds, how a run resumes, how a step is saved.

Kept apart from the loop (`trainer.py`); `Trainer` mixes it in. Every rank takes part in the same
collectives, so a save or resume failure on rank 0 stops all ranks rather than leaving them waiting.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch

from pretrain.distributed import all_reduce_sum
from pretrain.training import checkpoint as ckpt
from pretrain.training import parallel


class CheckpointMixin:
    """Needs: cfg, task, optimizer, scaler, train_loader, run_dir, dist, device, ddp, step, best_valid."""

    def state_dict(self) -> dict:
        """The whole state. Sharded (FSDP): gathered by collectives that every rank must call, in
        this order (model, teacher, optimizer); complete on rank 0 only."""
        return {
            "version": 1,
            "step": self.step,
            "config": self.cfg.to_dict(),
            "model": parallel.model_state(self.task.model),
            "task": self.task.extra_state(),
            "optimizer": parallel.optimizer_state(self.task.model, self.optimizer),
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
        parallel.load_model_state(self.task.model, state["model"])
        names = [n for n, p in self.task.model.named_parameters() if p.requires_grad]
        opt = ckpt.align_optimizer_state(state["optimizer"], state["model"].keys(), names)
        parallel.load_optimizer_state(self.task.model, self.optimizer, opt)
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
        sharded = parallel.is_sharded(self.task.model)
        state = self.state_dict() if sharded else None  # every rank joins the gathers; rank 0 writes
        if self.dist.is_main:
            state = state or self.state_dict()
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
