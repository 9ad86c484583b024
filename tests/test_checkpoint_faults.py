"""Checkpoints under faults: unreadable files, a kill between the pointer updates, a full disk,
partial files of a killed save, and the final checkpoint written once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import metric_rows, pretrain_cmd

ROOT = Path(__file__).resolve().parent.parent
#: updates log every step and save every 2; validation only at the end of a run
EXTRA = ["--set", "train.log_interval=1", "--set", "train.save_interval=2", "--set", "train.valid_interval=1000"]

#: `python -m pretrain` with torch.save instrumented: SAVE_LOG gets one line per checkpoint
#: written, and from step FULL_AT_STEP on the disk is "full" (some bytes land, then ENOSPC).
WRAPPER = r"""
import errno, os, runpy, sys
import torch
real_save = torch.save
def save(obj, f, *args, **kwargs):
    step = obj.get("step") if isinstance(obj, dict) else None
    if step is not None and os.environ.get("SAVE_LOG"):
        with open(os.environ["SAVE_LOG"], "a") as log:
            log.write(f"{step}\n")
    if step is not None and 0 <= int(os.environ.get("FULL_AT_STEP", "-1")) <= step:
        f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_save(obj, f, *args, **kwargs)
torch.save = save
runpy.run_module("pretrain", run_name="__main__", alter_sys=True)
"""


def _run(data: Path, out: Path, steps: int, *extra: str, env: dict | None = None, wrapped: bool = False):
    cmd = pretrain_cmd("wav2vec2_tiny", data, out, "--max-steps", str(steps), *EXTRA, *extra)
    if wrapped:
        cmd = [sys.executable, "-c", WRAPPER, *cmd[3:]]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, **(env or {})})


def _step(n: int) -> str:
    return f"step_{n:08d}.pt"


@pytest.fixture(scope="module")
def four_steps(prepared, tmp_path_factory) -> Path:
    """A finished 4-update run with checkpoints at steps 2 and 4 (copy before changing it)."""
    out = tmp_path_factory.mktemp("faults") / "run"
    proc = _run(prepared, out, 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst, symlinks=True)
    return dst


# -- unreadable checkpoints -------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["truncated", "missing"])
def test_unreadable_last_checkpoint_falls_back_to_the_previous_one(fault, four_steps, prepared, tmp_path):
    run = _copy(four_steps, tmp_path)
    before = [r["loss"] for r in metric_rows(run)]
    bad = run / "checkpoints" / _step(4)
    data = bad.read_bytes()
    if fault == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.unlink()  # last.pt now dangles
    proc = _run(prepared, run, 6)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _step(4) in proc.stderr and "WARNING" in proc.stderr  # the warning names the bad file
    assert f"{_step(2)} at step 2" in proc.stdout
    if fault == "truncated":  # kept, not deleted: some file still holds its bytes
        kept = [p for p in (run / "checkpoints").iterdir() if p.is_file() and p.read_bytes() == data[: len(data) // 2]]
        assert kept, sorted(p.name for p in (run / "checkpoints").iterdir())
    rows = metric_rows(run)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["loss"] for r in rows[:4]] == before  # the redone updates match: still an exact resume
    assert (run / "checkpoints" / "last.pt").resolve().name == _step(6)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=False)["step"] == 6


def test_no_readable_checkpoint_stops_with_a_clear_message(four_steps, prepared, tmp_path):
    run = _copy(four_steps, tmp_path)
    for n in (2, 4):
        (run / "checkpoints" / _step(n)).write_bytes(b"garbage")
    proc = _run(prepared, run, 6)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    message = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1, proc.stderr[-3000:]  # one paragraph: what, which files, what to do
    assert _step(2) in message[0] and _step(4) in message[0] and "--out" in message[0]
    for n in (2, 4):  # nothing renamed or removed
        assert (run / "checkpoints" / _step(n)).read_bytes() == b"garbage"


# -- last and best move together --------------------------------------------------------------------
class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def _trainer(data: Path, run: Path, scores: dict[int, float]):
    """A tiny trainer that validates and saves every update, keeping 1, with scripted scores."""
    from pretrain.build import build_task
    from pretrain.config import apply_overrides
    from pretrain.presets import get_preset
    from pretrain.training.trainer import Trainer, seed_all

    cfg = apply_overrides(get_preset("wav2vec2_tiny"), [
        "train.max_steps=6", "train.valid_interval=1", "train.save_interval=1", "train.keep_last=1",
        "train.log_interval=1000"])
    seed_all(cfg.train.seed)
    trainer = Trainer(cfg, build_task(cfg.model), run, data, torch.device("cpu"))
    trainer.validate = lambda: {"loss": scores[trainer.step]}
    return trainer


def test_kill_between_pointer_updates_never_loses_the_best(prepared, tmp_path, monkeypatch):
    from pretrain.training.metrics import MetricLogger

    scores = {1: 5.0, 2: 4.0, 3: 3.5, 4: 3.0, 5: 3.2, 6: 3.4}  # step 4 is the best
    run = tmp_path / "run"
    real_replace = os.replace
    links_at_4: list[str] = []

    def kill_between_links(src, dst):
        if Path(dst).name in ("last.pt", "best.pt") and Path(src).name.startswith(".") and trainer.step == 4:
            links_at_4.append(Path(dst).name)
            if len(links_at_4) == 2:  # the first link of step 4 is updated, the second is not
                raise _Killed
        real_replace(src, dst)

    trainer = _trainer(prepared, run, scores)
    monkeypatch.setattr(os, "replace", kill_between_links)
    with pytest.raises(_Killed):
        trainer.fit(MetricLogger(run, 0, enabled=False))
    monkeypatch.setattr(os, "replace", real_replace)
    trainer = _trainer(prepared, run, scores)  # the same command, run again
    assert trainer.resume_if_possible()
    trainer.fit(MetricLogger(run, trainer.step, enabled=False))
    ckpts = run / "checkpoints"
    assert (ckpts / _step(4)).exists(), sorted(p.name for p in ckpts.iterdir())
    assert (ckpts / "best.pt").resolve().name == _step(4)
    assert (ckpts / "last.pt").resolve().name == _step(6)
    assert sorted(p.name for p in ckpts.glob("step_*")) == [_step(4), _step(6)]  # keep_last=1, plus the best


def test_stale_best_link_is_repaired_on_start(prepared, tmp_path):
    run = tmp_path / "run"
    proc = _run(prepared, run, 6, "--set", "train.valid_interval=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    valid = metric_rows(run, "valid")
    best = min(valid, key=lambda r: r["loss"])["step"]
    other = next(r["step"] for r in valid if r["step"] != best)
    ckpts = run / "checkpoints"
    (ckpts / "best.pt").unlink()
    (ckpts / "best.pt").symlink_to(_step(other))  # as a kill between the pointer updates leaves it
    again = _run(prepared, run, 6, "--set", "train.valid_interval=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (ckpts / "best.pt").resolve().name == _step(best)


# -- a full disk and partial files ------------------------------------------------------------------
def test_full_disk_keeps_previous_checkpoints_and_exits_cleanly(prepared, tmp_path):
    run = tmp_path / "run"
    proc = _run(prepared, run, 6, env={"FULL_AT_STEP": "4"}, wrapped=True)
    ckpts = run / "checkpoints"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"no space left on device while saving step 4 to {ckpts}" in proc.stderr
    assert sorted(p.name for p in ckpts.iterdir() if p.name.endswith(".tmp")) == []
    assert (ckpts / "last.pt").resolve().name == _step(2)
    assert torch.load(ckpts / "last.pt", weights_only=False)["step"] == 2
    again = _run(prepared, run, 6)  # space freed: the same command resumes
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{_step(2)} at step 2" in again.stdout


def test_partial_files_of_a_killed_save_are_ignored_and_removed(four_steps, prepared, tmp_path):
    run = _copy(four_steps, tmp_path)
    ckpts = run / "checkpoints"
    for name in (".step_00000010.pt.tmp", ".step_00000003.pt.tmp"):
        (ckpts / name).write_bytes(b"half a checkpoint")
    proc = _run(prepared, run, 6)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{_step(4)} at step 4" in proc.stdout
    assert [p.name for p in ckpts.iterdir() if p.name.endswith(".tmp")] == []
    assert (ckpts / "last.pt").resolve().name == _step(6)


# -- the final checkpoint ---------------------------------------------------------------------------
def test_final_checkpoint_is_written_once(prepared, tmp_path):
    log = tmp_path / "saves.txt"
    proc = _run(prepared, tmp_path / "run", 4, env={"SAVE_LOG": str(log)}, wrapped=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert log.read_text().split() == ["2", "4"]
    again = _run(prepared, tmp_path / "run", 4, env={"SAVE_LOG": str(log)}, wrapped=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert log.read_text().split() == ["2", "4"]  # a finished run, run again, writes nothing
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["step"] == 4
