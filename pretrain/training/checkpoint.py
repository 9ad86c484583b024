"""Atomic, complete checkpoints: `RUN/checkpoints/step_N.pt`, with `last.pt` and `best.pt` links.

A checkpoint is written to a temporary file, fsynced and renamed, so a file named `step_N.pt`
is always complete; `last.pt` is a symlink replaced atomically after the rename.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

_STEP = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _link(target: Path, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target.name, tmp)
    os.replace(tmp, link)


def save(run_dir: Path, step: int, state: dict, keep_last: int, is_best: bool = False) -> Path:
    ckpt_dir = checkpoint_dir(run_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step_{step:08d}.pt"
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _link(path, ckpt_dir / "last.pt")
    if is_best:
        _link(path, ckpt_dir / "best.pt")
    _prune(ckpt_dir, keep_last)
    return path


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    steps = sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP.match(p.name)))
    protected = {os.path.realpath(ckpt_dir / n) for n in ("last.pt", "best.pt") if (ckpt_dir / n).exists()}
    for _, path in steps[: max(0, len(steps) - keep_last)]:
        if str(path.resolve()) not in protected:
            path.unlink()


def resolve(path_or_run: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory meaning its last checkpoint."""
    p = Path(path_or_run)
    if p.is_dir():
        for candidate in (p / "checkpoints" / "last.pt", p / "last.pt"):
            if candidate.exists():
                return candidate.resolve()
        raise FileNotFoundError(f"{p} holds no checkpoint (looked for checkpoints/last.pt)")
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    return p.resolve()


def latest(run_dir: Path) -> Path | None:
    link = checkpoint_dir(run_dir) / "last.pt"
    return link.resolve() if link.exists() else None


def load(path: str | os.PathLike) -> dict:
    path = resolve(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise RuntimeError(f"cannot read checkpoint {path}: {err}") from err


def align_optimizer_state(opt_state: dict, saved_keys, names: list[str]) -> dict:
    """An optimizer state saved for a model that lacked some of today's parameters (added since,
    e.g. data2vec's `post_extract_proj`), renumbered for today's `names`: the parameters it knew
    keep their moments, the new ones start fresh."""
    groups = opt_state["param_groups"]
    known = [n for n in names if n in saved_keys]
    if len(known) == len(names) or len(groups) != 1 or len(groups[0]["params"]) != len(known):
        return opt_state
    old_index = {n: i for i, n in enumerate(known)}
    state = {
        new: opt_state["state"][old_index[n]]
        for new, n in enumerate(names)
        if n in old_index and old_index[n] in opt_state["state"]
    }
    return {"state": state, "param_groups": [dict(groups[0], params=list(range(len(names))))]}
