"""`python -m slurm` without a cluster: `--local` runs the same job here; `--dry-run` still shows the script."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import metric_rows

pytestmark = pytest.mark.slow


def test_local_runs_the_same_job(prepared, tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    proc = subprocess.run([sys.executable, "-m", "slurm", "pretrain", "--local", "--gpus-per-node", "0",
                           "--cpus-per-task", "1", "--", "--preset", "wav2vec2_tiny", "--data", str(prepared),
                           "--out", str(out), "--max-steps", "3", "--set", "train.log_interval=1"],
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert [r["step"] for r in metric_rows(out)] == [1, 2, 3]
    assert (out / "checkpoints" / "last.pt").exists()
    assert f"tensorboard --logdir {out / 'tensorboard'}" in proc.stdout
    assert list((out / "slurm").glob("*_log.out"))


def test_dry_run_and_argument_errors_need_no_cluster(tmp_path):
    env = dict(os.environ)  # no SLURM_CONF: sinfo (if installed at all) reaches no cluster
    env.pop("SLURM_CONF", None)
    base = [sys.executable, "-m", "slurm"]
    dry = subprocess.run(base + ["finetune", "--gpus-per-node", "2", "--dry-run", "--", "--preset", "ctc_10h",
                                 "--init-from", "x", "--data", "d", "--out", str(tmp_path / "ft")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert dry.returncode == 0, dry.stderr
    assert "note: not checked against a cluster" in dry.stdout
    assert "#SBATCH --ntasks-per-node=2" in dry.stdout and "#SBATCH --gpus-per-node=2" in dry.stdout
    assert "effective batch: 2 rank(s) x update_freq 4" in dry.stdout  # 2 GPUs x 4 = the recipe's 8
    assert "WARNING" not in dry.stdout
    submit = subprocess.run(base + ["pretrain", "--", "--preset", "wav2vec2_base", "--out", "x"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert submit.returncode == 2 and "pass --local" in submit.stderr
    arr = subprocess.run(base + ["pretrain", "--array", "4", "--", "--out", "x"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert arr.returncode == 2 and "--array applies to the prep stage only" in arr.stderr
    merge = subprocess.run(base + ["prep", "--array", "2", "--dry-run", "--", "merge", "a", "--out", "b"],
                           capture_output=True, text=True, timeout=120, env=env)
    assert merge.returncode == 2 and "not to merge" in merge.stderr
    for command in ("audio", "librilight"):
        out = tmp_path / command
        dry = subprocess.run(base + ["prep", "--array", "4", "--dry-run", "--", command, "/data/in", str(out)],
                             capture_output=True, text=True, timeout=120, env=env)
        assert dry.returncode == 0, dry.stderr
        assert f"python -m data_prep {command} /data/in {out} --workers 10 (as a job array of 4 + merge)" in dry.stdout
        assert str(out / "slurm") in dry.stdout  # logs beside the output, found from the command's OUT


def test_signal_during_job_startup_stops_at_the_first_update(prepared, tmp_path):
    """A stop signal that comes while a training job is still importing (before the trainer exists)
    is kept: the run saves after its first update and exits with the interrupted status."""
    out = tmp_path / "run"
    args = ["--preset", "wav2vec2_tiny", "--data", str(prepared), "--out", str(out), "--max-steps", "20",
            "--set", "train.log_interval=1"]
    code = ("import os, signal, sys\n"
            "from slurm.stages import StageJob\n"
            "job = StageJob('pretrain', sys.argv[1:])\n"
            "signal.signal(signal.SIGUSR2, lambda *a: sys.exit('reached the previous handler'))\n"
            "import pretrain.training.preemption as p\n"
            "real = p.StopSignals.for_process\n"
            "def early():\n"  # the signal lands right after the job's handler is installed
            "    s = real(); os.kill(os.getpid(), signal.SIGUSR2); return s\n"
            "p.StopSignals.for_process = early\n"
            "job()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "step 1: stopped by SIGUSR2; the checkpoint is saved" in proc.stdout
    assert [r["step"] for r in metric_rows(out)] == [1]
    assert (out / "checkpoints" / "last.pt").exists()
