"""`python -m slurm STAGE [options] -- STAGE-ARGS`: submit a stage (or the whole pipeline) to SLURM.

STAGE is prep, pretrain, finetune, evaluate, or pipeline (prep -> pretrain -> finetune ->
evaluate as dependent jobs, each starting only if the previous one succeeded). STAGE-ARGS are
the stage's own command-line arguments (`python -m slurm pipeline -- --help` for the pipeline's).
Returns once submitted, printing job ids, log paths and the TensorBoard directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .resources import ClusterError, Resources, check_request, partitions
from .stages import StageJob, output_dir, pipeline_stages
from .submit import follow, make_executor, sbatch_preview, stage_resources, submit_stage

STAGES = ("prep", "pretrain", "finetune", "evaluate", "pipeline")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m slurm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1, help="one task per GPU; 0 runs on CPUs (gloo)")
    p.add_argument("--tasks-per-node", type=int, default=None, help="default: one per GPU (1 on CPUs)")
    p.add_argument("--cpus-per-task", type=int, default=10)
    p.add_argument("--partition", default=None)
    p.add_argument("--time", type=int, default=4320, help="time limit in minutes")
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--mem", type=float, default=None, help="GB per node")
    p.add_argument("--signal-delay", type=int, default=120,
                   help="seconds between the time-limit warning (checkpoint + requeue) and the kill")
    p.add_argument("--max-requeues", type=int, default=10, help="time-limit / preemption requeues per job")
    p.add_argument("--array", type=int, default=0, help="prep only: this many array tasks, then a merge job")
    p.add_argument("--log-dir", type=Path, default=None, help="default: OUT/slurm of the stage")
    p.add_argument("--dry-run", action="store_true", help="show what would be submitted")
    p.add_argument("--local", action="store_true", help="run the same jobs here, without SLURM (waits)")
    p.add_argument("--wait", action="store_true", help="wait for the job(s), following the log")
    return p


DEFAULT_PRESETS = {"pretrain": "wav2vec2_base", "finetune": "ctc_10h"}  # as the stages' own CLIs


def precheck(stage: str, argv: list[str]):
    """The resolved training config (a bad preset or --set key fails now, not in the job); None
    for stages without one."""
    if stage not in DEFAULT_PRESETS:
        return None
    from importlib import import_module

    from pretrain.config import apply_overrides

    from .stages import argv_value

    presets = import_module(f"{stage}.presets")
    sets = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--set"]
    return apply_overrides(presets.get_preset(argv_value(argv, "--preset") or DEFAULT_PRESETS[stage]), sets)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, stage_args = argv[:i], argv[i + 1 :]
    args = build_parser().parse_args(argv)
    r = Resources(args.nodes, args.gpus_per_node, args.tasks_per_node, args.cpus_per_task, args.partition,
                  args.time, args.account, args.qos, args.constraint, args.mem, args.signal_delay)
    if args.array and args.stage not in ("prep",):
        return _fail("--array applies to the prep stage only")
    if args.array and stage_args[:1] == ["merge"]:
        return _fail("--array applies to librispeech, audio and librilight preparation, not to merge (it only reads manifests)")
    try:
        plan = pipeline_stages(stage_args) if args.stage == "pipeline" else [(args.stage, stage_args)]
    except SystemExit as exit_:  # argparse of the pipeline's arguments printed its message
        return int(exit_.code or 2)
    from pretrain.config import batch_summary

    try:
        for stage, sargs in plan:
            cfg = precheck(stage, sargs)
            if cfg is not None:
                world = stage_resources(stage, r).world_size
                text, warning = batch_summary(world, cfg.train.update_freq, cfg.data.max_tokens, cfg.train.reference_batch)
                print(f"{stage}: {text}")
                if warning:
                    print(f"{stage}: WARNING: {warning}")
        if not args.local:
            available = partitions()
            for stage, _ in plan:
                check_request(stage_resources(stage, r), available)
    except ClusterError as err:
        if not args.dry_run:
            return _fail(str(err))
        print(f"note: not checked against a cluster ({err})")
    except ValueError as err:
        return _fail(str(err))
    base = Path(_pipeline_work(stage_args)) if args.stage == "pipeline" else output_dir(*plan[0])
    log_dir = args.log_dir or ((base / "slurm") if base else Path("slurm_logs"))
    plan = [(stage, sargs + ["--workers", str(args.cpus_per_task)] if stage == "prep" and "--workers" not in sargs else sargs)
            for stage, sargs in plan]  # prep decodes with the CPUs the job has, not the node's count
    jobs = [StageJob(stage, sargs, args.max_requeues) for stage, sargs in plan]
    if args.dry_run:
        for job in jobs:
            ex = make_executor(log_dir, stage_resources(job.stage, r), False, job.stage,
                               "afterok:<previous job>" if job is not jobs[0] else None)
            print(f"== {job.stage}: {job.command()}" + (f" (as a job array of {args.array} + merge)" if args.array else ""))
            print(sbatch_preview(ex))
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)
    submitted = []
    dependency = None
    try:
        for job in jobs:
            records = submit_stage(log_dir, job.stage, job, r, args.local, dependency, args.array if job.stage == "prep" else 0)
            submitted += records
            last = records[-1]
            dependency = f"afterok:{last.job_id}"
            if args.local:  # no scheduler to hold the next stage back: run them one after another
                state = follow(last)
                if state != "COMPLETED":
                    print(f"{job.stage}: job {last.job_id} ended {state}; stopping here", file=sys.stderr)
                    return 1
    except Exception as err:  # noqa: BLE001 - sbatch refusals come back as several exception types
        return _fail(f"submission failed: {err}")
    for s in submitted:
        print(f"{s.stage}: job {s.job_id}\n  log: {s.stdout}\n  err: {s.stderr}")
    for (stage, sargs) in plan:
        out = output_dir(stage, sargs)
        if stage in ("pretrain", "finetune") and out:
            print(f"{stage}: tensorboard --logdir {out / 'tensorboard'}")
    if args.wait and not args.local:
        for s in submitted:
            state = follow(s)
            print(f"{s.stage}: job {s.job_id} {state}")
            if state != "COMPLETED":
                return 1
    return 0


def _pipeline_work(stage_args: list[str]) -> str:
    from .stages import argv_value

    return argv_value(stage_args, "--work") or "."


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
