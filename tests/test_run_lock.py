"""One run per directory: a second `python -m pretrain` / `finetune` on a live run's --out refuses."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import finetune_cmd, metric_rows, pretrain_cmd

ROOT = Path(__file__).resolve().parent.parent
EXTRA = ["--set", "train.log_interval=1", "--set", "train.save_interval=5", "--set", "train.valid_interval=1000"]


def _cmd(data: Path, out: Path, steps: int) -> list[str]:
    return pretrain_cmd("wav2vec2_tiny", data, out, "--max-steps", str(steps), *EXTRA)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, "the run ended early"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _hold_lock(run: Path):
    """The lock as a live run holds it, taken by this test process."""
    run.mkdir(parents=True, exist_ok=True)
    f = open(run / ".lock", "a+")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def test_second_run_on_a_live_directory_is_refused(prepared, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(_cmd(prepared, run, 12), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        _wait_for(run / "metrics.jsonl", first)
        first.send_signal(signal.SIGSTOP)  # however slow the machine, the first run is still live
        before = sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file())
        started = time.monotonic()
        second = subprocess.run(_cmd(prepared, run, 12), capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"pid {first.pid}" in second.stderr and socket.gethostname() in second.stderr
        assert time.monotonic() - started < 60  # at once, not after building the model
        after = sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file())
        assert after == before  # the live run was not touched
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert [r["step"] for r in metric_rows(run)] == list(range(1, 13))


def test_lock_of_a_killed_run_is_free_and_the_run_resumes(prepared, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(_cmd(prepared, run, 10), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(run / "checkpoints" / "step_00000005.pt", first)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    again = subprocess.Popen(_cmd(prepared, run, 10), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert "resumed from" in out
    assert f"pid {again.pid} " in (run / ".lock").read_text()  # the new holder wrote its name
    assert [r["step"] for r in metric_rows(run)] == list(range(1, 11))


def test_finetune_on_a_live_directory_is_refused(pretrained_run, prepared, tmp_path):
    run = tmp_path / "ctc"
    with _hold_lock(run):
        proc = subprocess.run(finetune_cmd(pretrained_run, prepared, run, "--max-steps", "2"),
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"pid {os.getpid()}" in proc.stderr
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


@pytest.mark.slow
def test_under_ddp_only_rank_zero_locks_and_all_ranks_refuse(prepared, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pretrain", "--preset", "wav2vec2_tiny", "--data", str(prepared), "--max-steps", "2",
           "--device", "cpu", "--set", "train.valid_interval=1000"]
    busy = tmp_path / "busy"
    with _hold_lock(busy):
        refused = subprocess.run(ddp + ["--out", str(busy)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                                 env=env)
    assert refused.returncode != 0 and f"pid {os.getpid()}" in refused.stderr, refused.stderr[-3000:]
    free = subprocess.run(ddp + ["--out", str(tmp_path / "free")], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env=env)
    assert free.returncode == 0, free.stderr[-3000:]  # rank 1 does not contend with rank 0
    assert (tmp_path / "free" / "checkpoints" / "last.pt").exists()
