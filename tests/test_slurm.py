"""Submission through `python -m slurm` to a real single-node SLURM (slurm-wlm + munge on localhost)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import metric_rows

pytestmark = pytest.mark.slow
TINY = ["--preset", "wav2vec2_tiny", "--set", "train.log_interval=10", "--set", "train.valid_interval=1000"]


def slurm_cli(env, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slurm", *args], capture_output=True, text=True, env=env, timeout=timeout)


def sh(env, *cmd: str) -> str:
    return subprocess.run(list(cmd), capture_output=True, text=True, env=env, timeout=60).stdout


def job_id(stdout: str, stage: str) -> str:
    return next(line.split()[-1] for line in stdout.splitlines() if line.startswith(f"{stage}: job "))


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def train_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metric_rows(run)]


def reached(run: Path, step: int) -> bool:
    return (run / "metrics.jsonl").exists() and any(s >= step for s, _ in train_losses(run))


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def job_state(env, job: str) -> str:
    """SLURM's state of the job ("" if the controller did not answer this time)."""
    out = sh(env, "scontrol", "show", "job", job)
    return out.split("JobState=")[1].split()[0] if "JobState=" in out else ""


def finished(env, job: str) -> bool:
    # scontrol, not squeue: a job between its requeue and its next start must not look finished
    return job_state(env, job) in TERMINAL


def test_bad_options_fail_at_submission(slurm_env, prepared, tmp_path):
    common = ["--", *TINY, "--data", str(prepared), "--out", str(tmp_path / "x")]
    for opts, message in ((["--partition", "gpu"], "unknown partition 'gpu'; this cluster has: debug (default)"),
                          (["--gpus-per-node", "4"], "--gpus-per-node 4: nodes of partition debug have 0 GPU(s)"),
                          (["--gpus-per-node", "0", "--nodes", "3"], "--nodes 3: partition debug has 1 node(s)"),
                          (["--gpus-per-node", "0", "--cpus-per-task", "64"], "CPUs per node")):
        proc = slurm_cli(slurm_env, "pretrain", *opts, *common)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    proc = slurm_cli(slurm_env, "pretrain", "--gpus-per-node", "0", "--", "--set", "optim.lrr=1", "--out", "x")
    assert proc.returncode == 2 and "unknown config key 'optim.lrr'" in proc.stderr
    assert sh(slurm_env, "squeue", "-h").strip() == ""  # nothing was submitted
    dry = slurm_cli(slurm_env, "pretrain", "--gpus-per-node", "0", "--cpus-per-task", "1", "--dry-run", *common)
    assert dry.returncode == 0
    assert "#SBATCH --requeue" in dry.stdout and "#SBATCH --signal=USR2@120" in dry.stdout
    assert "python -m pretrain --preset wav2vec2_tiny" in dry.stdout
    assert sh(slurm_env, "squeue", "-h").strip() == ""


def run_until_completed(env, job: str, run: Path) -> str:
    """Wait for the job to complete, starting each requeued run at once; returns its log."""
    deadline = time.time() + 600
    while not finished(env, job):  # each requeue waits for its BeginTime: start it now
        assert time.time() < deadline, f"job {job} did not finish"
        if job_state(env, job) == "PENDING" and reached(run, 1):
            sh(env, "scontrol", "update", f"JobId={job}", "StartTime=now")
        time.sleep(0.5)
    assert job_state(env, job) == "COMPLETED"
    return (run / "slurm" / f"{job}_0_log.out").read_text()


def restarts(env, job: str) -> int:
    return int(sh(env, "scontrol", "show", "job", job).split("Restarts=")[1].split()[0])


def test_requeued_jobs_resume_exactly(slurm_env, prepared, tmp_path):
    """An uninterrupted run; a run requeued with `scontrol requeue`; a run sent the warning signal
    (USR2, as before a time limit) that requeued itself: the same 300 updates and the same losses."""
    # logged every update: a log line averages the updates since the previous one, which a resume cuts short
    args = [*TINY, "--data", str(prepared), "--max-steps", "300", "--set", "train.save_interval=1000",
            "--set", "train.log_interval=1"]
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "pretrain", *args, "--out", str(reference)], check=True,
                   capture_output=True, timeout=600)
    expected = train_losses(reference)
    assert expected[-1][0] == 300
    for how in ("scontrol", "usr2"):
        run = tmp_path / how
        proc = slurm_cli(slurm_env, "pretrain", "--gpus-per-node", "0", "--cpus-per-task", "2", "--",
                         *args, "--out", str(run))
        assert proc.returncode == 0, proc.stderr
        job = job_id(proc.stdout, "pretrain")
        wait_for(lambda: reached(run, 30), 300, "step 30")
        sh(slurm_env, "scontrol", "requeue", job) if how == "scontrol" else sh(slurm_env, "scancel", "--signal=USR2", job)
        log = run_until_completed(slurm_env, job, run)
        assert "resumed from" in log
        if how == "usr2":
            assert "stopped by SIGUSR2; requeued job" in log
        assert restarts(slurm_env, job) == 1
        got = train_losses(run)
        assert [s for s, _ in got] == [s for s, _ in expected] == list(range(1, 301))
        for (s, a), (_, b) in zip(got, expected):
            assert abs(a - b) <= 1e-5 * abs(b), (how, s, a, b)


def test_time_limit_warning_requeues_until_done(slurm_env, prepared, tmp_path):
    """A 1-minute time limit that SLURM warns of 55 s ahead, for a run that needs longer than that
    (SLURM sends the warning on its own clock, up to a minute early): every run is warned, saves and
    requeues itself, the next one resumes, and the 900 updates have the uninterrupted run's losses."""
    args = [*TINY, "--data", str(prepared), "--max-steps", "900", "--set", "train.save_interval=1000",
            "--set", "train.log_interval=1"]
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "pretrain", *args, "--out", str(reference)], check=True,
                   capture_output=True, timeout=600)
    run = tmp_path / "timelimit"
    proc = slurm_cli(slurm_env, "pretrain", "--gpus-per-node", "0", "--cpus-per-task", "2", "--time", "1",
                     "--signal-delay", "55", "--max-requeues", "50", "--", *args, "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    job = job_id(proc.stdout, "pretrain")
    log = run_until_completed(slurm_env, job, run)
    assert "resumed from" in log and "stopped by SIGUSR2; requeued job" in log
    assert restarts(slurm_env, job) >= 1
    got, expected = train_losses(run), train_losses(reference)
    assert [s for s, _ in got] == [s for s, _ in expected] == list(range(1, 901))
    for (s, a), (_, b) in zip(got, expected):
        assert abs(a - b) <= 1e-5 * abs(b), (s, a, b)


def test_requeues_are_bounded_and_failures_not_requeued(slurm_env, prepared, tmp_path):
    run = tmp_path / "bounded"
    args = [*TINY, "--data", str(prepared), "--max-steps", "2000", "--out", str(run)]
    proc = slurm_cli(slurm_env, "pretrain", "--gpus-per-node", "0", "--cpus-per-task", "2", "--max-requeues", "0", "--", *args)
    job = job_id(proc.stdout, "pretrain")
    wait_for(lambda: reached(run, 10), 300, "step 10")
    sh(slurm_env, "scancel", "--signal=USR2", job)
    wait_for(lambda: finished(slurm_env, job), 120, "the job to end")
    assert "not requeued: the job was already requeued 0 times (limit 0)" in (run / "slurm" / f"{job}_0_log.out").read_text()
    assert list((run / "checkpoints").glob("step_*.pt"))  # its work is saved
    # a job that fails for another reason fails once
    bad = tmp_path / "bad"
    proc = slurm_cli(slurm_env, "pretrain", "--gpus-per-node", "0", "--cpus-per-task", "1", "--",
                     *TINY, "--data", str(tmp_path / "missing"), "--out", str(bad))
    job = job_id(proc.stdout, "pretrain")
    wait_for(lambda: finished(slurm_env, job), 120, "the failing job to end")
    info = sh(slurm_env, "scontrol", "show", "job", job)
    assert "JobState=FAILED" in info and "Restarts=0" in info


def test_two_tasks_ddp_under_slurm_match_update_freq_two(slurm_env, prepared, tmp_path):
    args = [*TINY, "--data", str(prepared), "--max-steps", "6", "--set", "train.log_interval=1", "--device", "cpu"]
    single = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "pretrain", *args, "--out", str(single), "--set", "train.update_freq=2"],
                   check=True, capture_output=True, timeout=600)
    run = tmp_path / "two"
    proc = slurm_cli(slurm_env, "pretrain", "--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1",
                     "--wait", "--", *args, "--out", str(run))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "effective batch: 2 rank(s) x update_freq 1" in proc.stdout
    a, b = train_losses(single), train_losses(run)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    for (_, x), (_, y) in zip(a, b):
        assert abs(x - y) <= 1e-4 * abs(x)


def test_pipeline_runs_four_dependent_jobs_in_order(slurm_env, toy_corpus, tmp_path):
    work = tmp_path / "work"
    proc = slurm_cli(slurm_env, "pipeline", "--gpus-per-node", "0", "--cpus-per-task", "2", "--wait", "--",
                     "--corpus", str(toy_corpus), "--work", str(work),
                     "--finetuning-root", str(toy_corpus / "librispeech_finetuning"),
                     "--pretrain-preset", "wav2vec2_tiny", "--finetune-preset", "ctc_tiny",
                     "--pretrain-steps", "10", "--finetune-steps", "4", "--splits", "test-clean",
                     "--finetune-set", "train.valid_interval=1000")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = [job_id(proc.stdout, s) for s in ("prep", "pretrain", "finetune", "evaluate")]
    for stage, jid in zip(("prep", "pretrain", "finetune", "evaluate"), ids):
        assert f"{stage}: job {jid} COMPLETED" in proc.stdout
    for prev, jid in zip(ids, ids[1:]):
        assert f"#SBATCH --dependency=afterok:{prev}" in (work / "slurm" / f"{jid}_submission.sh").read_text()
    outputs = [work / "manifests" / "summary.json", work / "pretrain" / "checkpoints" / "last.pt",
               work / "finetune" / "checkpoints" / "last.pt", next((work / "finetune" / "eval").glob("*.json"))]
    times = [p.stat().st_mtime for p in outputs]
    assert times == sorted(times)  # each stage ran after the one before
    report = json.loads(outputs[-1].read_text())
    assert report["splits"]["test-clean"]["utterances"] > 0


def test_prep_job_array_equals_single_prep(slurm_env, toy_corpus, prepared, tmp_path):
    out = tmp_path / "manifests"
    proc = slurm_cli(slurm_env, "prep", "--array", "3", "--cpus-per-task", "1", "--wait", "--",
                     str(toy_corpus), str(out), "--finetuning-root", str(toy_corpus / "librispeech_finetuning"),
                     "--num-shards", "2", "--pack")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import re

    assert len(re.findall(r"^prep-part: job \d+_\d COMPLETED$", proc.stdout, re.M)) == 3 and "part 2/3" in proc.stdout
    names = sorted(p.name for p in prepared.glob("*") if p.suffix in (".tsv", ".wrd", ".ltr", ".txt"))
    assert "train-1h.tsv" in names
    for name in names:
        assert (out / name).read_bytes() == (prepared / name).read_bytes(), name
    for p in (prepared / "shards").iterdir():
        assert (out / "shards" / p.name).read_bytes() == p.read_bytes(), p.name


def test_librilight_job_array_equals_single_run(slurm_env, toy_corpus, tmp_path):
    from data_prep.librilight import LibriLightOptions, prepare_librilight

    out = tmp_path / "segments"
    prepare_librilight(LibriLightOptions(toy_corpus / "librilight", out, workers=1, num_shards=2, pack=True))
    single = tmp_path / "single"
    out.rename(single)
    proc = slurm_cli(slurm_env, "prep", "--array", "2", "--cpus-per-task", "1", "--wait", "--", "librilight",
                     str(toy_corpus / "librilight"), str(out), "--num-shards", "2", "--pack")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import re

    assert len(re.findall(r"^prep-part: job \d+_\d COMPLETED$", proc.stdout, re.M)) == 2
    files = sorted(p.relative_to(single) for p in single.rglob("*") if p.is_file() and ".cache" not in p.parts)
    assert any(p.suffix == ".flac" for p in files) and any(p.suffix == ".pcm" for p in files)
    for rel in files:
        assert (out / rel).read_bytes() == (single / rel).read_bytes(), rel


def test_failed_stage_cancels_the_rest_of_the_pipeline(slurm_env, tmp_path):
    work = tmp_path / "work"
    proc = slurm_cli(slurm_env, "pipeline", "--gpus-per-node", "0", "--cpus-per-task", "1", "--wait", "--",
                     "--corpus", str(tmp_path / "no-such-corpus"), "--work", str(work),
                     "--pretrain-preset", "wav2vec2_tiny", "--finetune-preset", "ctc_tiny", timeout=300)
    assert proc.returncode == 1
    assert "prep: job" in proc.stdout and "FAILED" in proc.stdout
    ids = [job_id(proc.stdout, s) for s in ("pretrain", "finetune", "evaluate")]
    for jid in ids:  # never left pending on a dependency that cannot be met
        wait_for(lambda: job_state(slurm_env, jid) == "CANCELLED", 120, f"job {jid} cancelled")
