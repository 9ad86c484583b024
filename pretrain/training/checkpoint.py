"""Atomic, complete checkpoints: `RUN/checkpoints/step_N.pt`, with `last.pt` and `best.pt` links.

A checkpoint is written to a temporary file, fsynced and renamed, so a file named `step_N.pt`
is always complete. Every checkpoint the trainer writes records which step is the best so far
(`best_step`); that record, not the links, is the truth. `best.pt` is pointed first, then
`last.pt` (the commit), then old checkpoints are pruned, never the best or the last. A kill
between the two link updates therefore leaves `best.pt` on a real best and `last.pt` on the
previous checkpoint, and `recover` points both links at what the resumed checkpoint records.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_STEP = re.compile(r"^step_(\d+)\.pt$")
_PARTIAL = re.compile(r"^\..+\.tmp$")  # `.step_N.pt.tmp`, `.last.pt.tmp`: a write that never finished
LAST, BEST = "last.pt", "best.pt"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or none of a run's can be read; the message says what to do."""


class _Unreadable(Exception):
    """Why one checkpoint file cannot be resumed from."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}.pt"


def _step_of(name: str) -> int | None:
    m = _STEP.match(name)
    return int(m.group(1)) if m else None


def _step_files(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """`(step, path)` of every `step_N.pt`, oldest first."""
    return sorted((n, p) for p in ckpt_dir.iterdir() if (n := _step_of(p.name)) is not None)


def _linked_step(link: Path) -> int | None:
    """The step of the existing checkpoint a link names, else None."""
    return _step_of(Path(os.readlink(link)).name) if link.is_symlink() and link.exists() else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _point(link: Path, name: str | None) -> None:
    """Make `link` a symlink to `name` in its directory (atomically), or remove it for None."""
    if name is None:
        if link.is_symlink():
            link.unlink()
        return
    if link.is_symlink() and os.readlink(link) == name:
        return
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(name, tmp)
    os.replace(tmp, link)


def _write(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # our own partial file: never leave a half checkpoint behind
        raise
    _fsync_dir(path.parent)  # the rename itself survives a power cut


def save(run_dir: Path, step: int, state: dict, keep_last: int, is_best: bool = False) -> Path:
    """Write `state` as `step_N.pt` and make it the last checkpoint; prune to `keep_last`.

    The best checkpoint is this one if `is_best`, else the one `state["best_step"]` records,
    else (a state without that record) the one `best.pt` names now. Raises CheckpointError,
    saying what to do, when the write fails (a full disk above all); earlier checkpoints and
    both links are then left as they were."""
    ckpt_dir = checkpoint_dir(run_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = step_path(run_dir, step)
    best = step if is_best else state.get("best_step", _linked_step(ckpt_dir / BEST))
    if best is not None and best != step and not step_path(run_dir, best).exists():
        best = None  # never a dangling best.pt
    previous = os.readlink(ckpt_dir / LAST) if (ckpt_dir / LAST).is_symlink() else None
    try:
        _write(path, state)
        # best.pt before last.pt: a kill in between leaves best.pt on the true best
        _point(ckpt_dir / BEST, step_path(run_dir, best).name if best is not None else None)
        _point(ckpt_dir / LAST, path.name)
    except OSError as err:
        raise _save_error(err, step, ckpt_dir, previous) from err
    _prune(ckpt_dir, step, keep_last, best)
    return path


def _save_error(err: OSError, step: int, ckpt_dir: Path, previous: str | None) -> CheckpointError:
    kept = (f"the earlier checkpoints are intact (last.pt is still {previous})" if previous
            else "no earlier checkpoint exists")
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if err.errno == errno.ENOSPC else "disk quota exceeded"
        return CheckpointError(
            f"{what} while saving step {step} to {ckpt_dir}; {kept}. Free some space there (or lower "
            "train.keep_last), then run the same command again: it resumes from the last checkpoint."
        )
    return CheckpointError(
        f"cannot save step {step} to {ckpt_dir}: {err.strerror or err}; {kept}. "
        "Fix the cause, then run the same command again: it resumes from the last checkpoint."
    )


def _prune(ckpt_dir: Path, step: int, keep_last: int, best: int | None) -> None:
    # Files past `step` are left: they belong to a timeline being redone and will be overwritten.
    older = [(n, p) for n, p in _step_files(ckpt_dir) if n <= step]
    for n, path in older[: max(0, len(older) - keep_last)]:
        if n not in (step, best):
            path.unlink()


def _resume_candidates(ckpt_dir: Path) -> list[Path]:
    """What `last.pt` names first (even a missing file: a dangling link is reported), then the
    step files before it, newest first; every step file, newest first, when there is no last.pt."""
    steps = _step_files(ckpt_dir)
    link = ckpt_dir / LAST
    if link.is_symlink():
        target = ckpt_dir / os.readlink(link)
    elif link.exists():
        target = link  # a plain file copied in place of the link
    else:
        return [p for _, p in reversed(steps)]
    limit = _step_of(target.name)
    return [target] + [p for n, p in reversed(steps) if p != target and (limit is None or n < limit)]


def _read(path: Path) -> dict:
    if not path.exists():
        raise _Unreadable("missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated zip, a bad pickle, an I/O error: all mean "cannot resume from it"
        raise _Unreadable(str(err).split(". ")[0].strip() or type(err).__name__) from err
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise _Unreadable("not a training checkpoint")
    return state


def _set_aside(path: Path) -> Path:
    """Rename an unreadable checkpoint out of the run's way (the run will write its step again)."""
    target = path.with_name(path.name + ".unreadable")
    i = 1
    while target.exists():
        target, i = path.with_name(f"{path.name}.unreadable{i}"), i + 1
    os.replace(path, target)
    return target


def recover(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest readable checkpoint of a run and its state, or None if the run has none.

    For the one process that owns the run (it holds the run lock): removes partial files of a
    killed save; renames unreadable checkpoints newer than the one it resumes from to
    `*.unreadable`, with a warning (never deletes them); points `last.pt` and `best.pt` at what
    the resumed checkpoint records. Raises CheckpointError when checkpoints exist but none can
    be read, changing none of them."""
    ckpt_dir = checkpoint_dir(run_dir)
    if not ckpt_dir.is_dir():
        return None
    partial = [p for p in ckpt_dir.iterdir() if _PARTIAL.match(p.name)]
    for p in partial:
        p.unlink()
    if partial:
        log.info("removed %d partial file(s) of an interrupted save from %s", len(partial), ckpt_dir)
    failures: list[tuple[Path, str]] = []
    for path in _resume_candidates(ckpt_dir):
        try:
            state = _read(path)
        except _Unreadable as why:
            failures.append((path, str(why)))
            continue
        for bad, why in failures:
            if not bad.exists():
                log.warning("checkpoint %s, named by last.pt, does not exist; resuming from %s instead", bad, path.name)
                continue
            kept = f"kept as {_set_aside(bad).name}" if bad.parent == ckpt_dir else "left where it is"
            log.warning("checkpoint %s cannot be read (%s); %s, resuming from %s instead", bad, why, kept, path.name)
        _repoint(ckpt_dir, path, state)
        return path, state
    if not failures:
        return None
    listed = "; ".join(f"{p.name}: {why}" for p, why in failures)
    raise CheckpointError(
        f"cannot resume {run_dir}: none of its checkpoints can be read ({listed}). They are left as they are. "
        f"If they were copied or synced from elsewhere, copy them again; to start this run from scratch "
        f"instead, move {ckpt_dir} aside or pass another --out."
    )


def _repoint(ckpt_dir: Path, path: Path, state: dict) -> None:
    """Point both links at what `state` records; fill in `best_step` for states written before it existed."""
    step = int(state["step"])
    if "best_step" not in state:
        linked = _linked_step(ckpt_dir / BEST)
        state["best_step"] = linked if linked is not None and linked <= step else None
    best = state["best_step"]
    if best is not None and not (ckpt_dir / f"step_{best:08d}.pt").exists():
        log.warning("the best checkpoint, step %d, is gone; best.pt returns with the next best", best)
        best = state["best_step"] = None
    _point(ckpt_dir / BEST, f"step_{best:08d}.pt" if best is not None else None)
    if path.parent == ckpt_dir and _step_of(path.name) is not None:
        _point(ckpt_dir / LAST, path.name)


def resolve(path_or_run: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory meaning its last checkpoint."""
    p = Path(path_or_run)
    if p.is_dir():
        found = latest(p) or ((p / LAST).resolve() if (p / LAST).exists() else None)  # a run, or its checkpoints/
        if found is not None:
            return found
        raise FileNotFoundError(f"{p} holds no checkpoint (looked for checkpoints/last.pt)")
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    return p.resolve()


def latest(run_dir: Path) -> Path | None:
    """The checkpoint `last.pt` names, else the newest `step_N.pt` (a dangling link), else None.
    Read-only: what a resume would try first, not checked for readability."""
    ckpt_dir = checkpoint_dir(run_dir)
    link = ckpt_dir / LAST
    if link.exists():
        return link.resolve()
    steps = _step_files(ckpt_dir) if ckpt_dir.is_dir() else []
    return steps[-1][1].resolve() if steps else None


def load(path: str | os.PathLike) -> dict:
    path = resolve(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err


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


#: model settings that change parameter shapes: a checkpoint is only resumable if they agree
ARCH_KEYS = (
    "arch", "conv_feature_layers", "extractor_mode", "conv_bias", "encoder_layers", "encoder_embed_dim",
    "encoder_ffn_embed_dim", "encoder_attention_heads", "layer_norm_first", "conv_pos", "conv_pos_groups",
    "pos_conv_depth", "latent_vars", "latent_groups", "latent_dim", "final_dim", "head_layers", "vocab_size",
    "prenet_depth", "decoder_dim", "decoder_kernel", "decoder_layers", "decoder_groups",
)


def _norm(v):
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v


def check_architecture(saved: dict, current: dict, where: Path) -> None:
    from pretrain.config import ModelConfig

    defaults = ModelConfig()  # a key added since the checkpoint was written had its default then
    saved = {k: saved.get(k, getattr(defaults, k, None)) for k in ARCH_KEYS}
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, config {current.get(k, getattr(defaults, k, None))!r}"
        for k in ARCH_KEYS
        if _norm(saved.get(k)) != _norm(current.get(k, getattr(defaults, k, None)))
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {where} holds a different architecture than the config:\n  " + "\n  ".join(diffs)
            + "\nResume with the same preset and model settings, or start a new run directory (--out)."
        )
