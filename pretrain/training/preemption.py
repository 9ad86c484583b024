"""Stopping cleanly when the scheduler says so, and requeueing under SLURM.

SLURM warns a job before its time limit or preemption with a signal (`--signal=USR2@90`, as
submitit submits); `scontrol requeue` and `scancel` send SIGTERM. Either way the trainer finishes
the update in progress, all ranks agree to stop at the same step, rank 0 saves a checkpoint, and
after the time-limit warning the job requeues itself, at most `max_requeues` times
(SLURM_RESTART_COUNT counts them). A job that fails for any other reason is never requeued.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

#: environment variable with the requeue budget (set by `python -m slurm`)
MAX_REQUEUES_ENV = "SPEECH_PRETRAIN_MAX_REQUEUES"
#: exit status of a run that stopped on a signal after saving its checkpoint
INTERRUPTED = 3


class StopSignals:
    """Records SIGUSR2 / SIGTERM instead of dying; the trainer polls `received` between updates."""

    _process: StopSignals | None = None  # the one installed for this process, see `for_process`

    @classmethod
    def for_process(cls) -> StopSignals:
        """This process's handler, installed at first use. A SLURM training job installs it before
        its slow imports, so a warning that comes during start-up stops the run at its first update
        (with a checkpoint and our requeue) instead of reaching submitit's handler."""
        if cls._process is None:
            cls._process = cls().install()
        return cls._process

    @classmethod
    def release(cls) -> None:
        """Restore the handlers from before `for_process` and forget what was received."""
        if cls._process is not None:
            cls._process.uninstall()
            cls._process = None

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGUSR2, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is None or signum == signal.SIGUSR2:
            self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""


def _job_id() -> str | None:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return job


def will_requeue(signals: StopSignals) -> bool:
    """The same answer on every rank: a SLURM job warned by USR2 with requeues left."""
    done = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    budget = int(os.environ.get(MAX_REQUEUES_ENV, "10"))
    return signals.received == signal.SIGUSR2 and _job_id() is not None and done < budget


def requeue_after(signals: StopSignals) -> tuple[str, bool]:
    """Requeue this SLURM job if it stopped on the time-limit / preemption warning (rank 0 only).

    Returns a message and whether the job was requeued."""
    job = _job_id()
    if signals.received != signal.SIGUSR2 or not job:
        return f"stopped by {signals.name}; the checkpoint is saved and the run resumes where it stopped", False
    done = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    budget = int(os.environ.get(MAX_REQUEUES_ENV, "10"))
    if not will_requeue(signals):
        return (f"stopped by {signals.name} and not requeued: the job was already requeued {done} times "
                f"(limit {budget}); submit it again to continue from the checkpoint"), False
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return f"stopped by {signals.name}; requeueing job {job} failed ({err}); submit it again to continue", False
    return f"stopped by {signals.name}; requeued job {job} (requeue {done + 1} of at most {budget})", True


def _end_after_revoke(signum, frame) -> None:
    """End by the requeue's SIGTERM, 2 s late. SLURM revokes the job's credential when it kills
    it and refuses a relaunch credential issued within the same second ("Job credential revoked",
    and the job ends instead of running again); staying 2 s keeps the relaunch after that second."""
    time.sleep(2.0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def wait_for_requeue(timeout_s: float = 120.0) -> None:
    """Let SLURM end the job it is requeueing: a task that exits first, with its own status, can
    race the requeue and leave the job FAILED instead of pending again."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _end_after_revoke)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(1.0)
