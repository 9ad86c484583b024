"""Submitting stage jobs with submitit: single jobs, prep job arrays, dependent pipelines."""

from __future__ import annotations

import dataclasses
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .resources import Resources
from .stages import PrepPart, StageJob


@dataclass
class Submitted:
    stage: str
    job_id: str
    stdout: Path
    stderr: Path
    job: object = None


def make_executor(folder: Path, r: Resources, local: bool, name: str, dependency: str | None = None):
    import submitit

    if local:
        if r.nodes > 1:
            raise ValueError("--local runs on this machine: --nodes must be 1")
        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=r.time_min, tasks_per_node=r.ntasks_per_node,
                             gpus_per_node=r.gpus_per_node, cpus_per_task=r.cpus_per_task)
        return ex
    ex = submitit.SlurmExecutor(folder=str(folder))
    params = dict(
        job_name=name, time=r.time_min, nodes=r.nodes, ntasks_per_node=r.ntasks_per_node,
        cpus_per_task=r.cpus_per_task, signal_delay_s=r.signal_delay_s,
        # our own handler checkpoints and requeues (pretrain.training.preemption); the job must be requeueable
        additional_parameters={"requeue": True},
    )
    if r.gpus_per_node:
        params["gpus_per_node"] = r.gpus_per_node
    for key, value in (("partition", r.partition), ("account", r.account), ("qos", r.qos),
                       ("constraint", r.constraint), ("dependency", dependency)):
        if value:
            params[key] = value
    if dependency:
        # a stage whose predecessor failed is cancelled, not left pending forever
        params["additional_parameters"]["kill-on-invalid-dep"] = "yes"
    if r.mem_gb:
        params["mem"] = f"{int(r.mem_gb * 1024)}M"
    ex.update_parameters(**params)
    return ex


def sbatch_preview(ex) -> str:
    """The batch script submitit would write (its own rendering), for --dry-run."""
    try:
        return ex._make_submission_file_text("python -u -m submitit.core._submit <folder>", "<uid>")
    except Exception:  # noqa: BLE001 - a preview must not stop a dry run
        return "\n".join(f"#SBATCH --{k.replace('_', '-')}={v}" for k, v in ex.parameters.items())


def stage_resources(stage: str, r: Resources) -> Resources:
    """prep: CPUs only, one task; evaluate: one task on at most one GPU; training: as asked."""
    if stage == "prep":
        return dataclasses.replace(r, nodes=1, gpus_per_node=0, tasks_per_node=1)
    if stage == "evaluate":
        return dataclasses.replace(r, nodes=1, gpus_per_node=min(1, r.gpus_per_node), tasks_per_node=1)
    return r


def _record(stage: str, job) -> Submitted:
    return Submitted(stage, str(job.job_id), Path(job.paths.stdout), Path(job.paths.stderr), job)


def submit_stage(folder: Path, stage: str, job: StageJob, r: Resources, local: bool,
                 dependency: str | None = None, array: int = 0) -> list[Submitted]:
    """One job; for prep with `array` > 0, a job array of that many parts and a dependent merge."""
    r = stage_resources(stage, r)
    if stage == "prep" and array:
        ex = make_executor(folder, r, local, "prep-part", dependency)
        parts = ex.map_array(PrepPart(job, array), list(range(array)))
        array_id = str(parts[0].job_id).split("_")[0]
        merged = [_record("prep-part", j) for j in parts]
        if local:
            for j in parts:
                j.result()
            after = None
        else:
            after = f"afterok:{array_id}"
        ex = make_executor(folder, r, local, "prep-merge", after)
        return merged + [_record("prep", ex.submit(job))]
    ex = make_executor(folder, r, local, stage, dependency)
    return [_record(stage, ex.submit(job))]


def job_state(submitted: Submitted) -> str:
    """COMPLETED / FAILED once the job left its result; else SLURM's view (PENDING, RUNNING, ...).

    Works without accounting (sacct): a finished job is known by its result file, a live one by squeue.
    """
    job = submitted.job
    tasks = getattr(job, "_sub_jobs", None) or [job]  # one per task of a multi-task (DDP) job
    if all(t.paths.result_pickle.exists() for t in tasks):
        try:
            job.results()
            return "COMPLETED"
        except Exception:  # noqa: BLE001 - whatever the stage raised
            return "FAILED"
    if type(job).__name__.startswith("Local"):
        return "RUNNING" if not job.done() else "ENDED"
    out = subprocess.run(["squeue", "-h", "-j", submitted.job_id, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "ENDED"


def follow(submitted: Submitted, poll_s: float = 2.0, grace_s: float = 15.0) -> str:
    """Print the job's log as it grows until the job ends; its final state (ENDED: gone without a result)."""
    import logging

    logging.getLogger("submitit").setLevel(logging.ERROR)  # no sacct here is not news
    seen, gone_since = 0, None
    while True:
        state = job_state(submitted)
        if submitted.stdout.exists():
            text = submitted.stdout.read_text(errors="replace")
            if len(text) > seen:
                print(text[seen:], end="", flush=True)
                seen = len(text)
        if state in ("COMPLETED", "FAILED"):
            return state
        if state == "ENDED":  # give a requeued job time to reappear in the queue
            gone_since = gone_since or time.time()
            if time.time() - gone_since > grace_s:
                return state
        else:
            gone_since = None
        time.sleep(poll_s)
