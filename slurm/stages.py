"""The stages a job runs, as picklable callables, and the pipeline's stage command lines.

A job runs the stage's own `main(argv)` in the job's process (one per task), so a job does
exactly what the command line does; torch.distributed picks up SLURM's variables
(`pretrain.distributed`).
"""

from __future__ import annotations

import argparse
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.training.preemption import INTERRUPTED, MAX_REQUEUES_ENV, StopSignals

#: stage -> (module with main(argv), argv prefix)
ENTRY_POINTS = {
    "prep": ("data_prep.__main__", ["librispeech"]),
    "pretrain": ("pretrain.__main__", []),
    "finetune": ("finetune.__main__", []),
    "evaluate": ("finetune.evaluate", []),
}

#: `python -m data_prep` commands a prep job can run; without one, `librispeech` (the pipeline's)
PREP_COMMANDS = ("librispeech", "audio", "librilight", "merge")

#: stages whose trainer polls for stop signals (prep and evaluate keep submitit's handlers)
TRAINING_STAGES = ("pretrain", "finetune")


class StageFailed(RuntimeError):
    pass


@dataclass
class StageJob:
    stage: str
    argv: list[str]
    max_requeues: int = 10
    env: dict = field(default_factory=dict)

    def entry(self) -> tuple[str, list[str]]:
        module, prefix = ENTRY_POINTS[self.stage]
        if self.stage == "prep" and self.argv and self.argv[0] in PREP_COMMANDS:
            prefix = []  # the prep command is named in argv
        return module, prefix

    def command(self) -> str:
        module, prefix = self.entry()
        return " ".join(["python -m", module.removesuffix(".__main__"), *prefix, *self.argv])

    def __call__(self, *extra_argv: str) -> int:
        os.environ[MAX_REQUEUES_ENV] = str(self.max_requeues)
        os.environ.update(self.env)
        if self.stage in TRAINING_STAGES:
            StopSignals.for_process()  # before the imports: the trainer sees a signal that comes now
        module, prefix = self.entry()
        code = importlib.import_module(module).main([*prefix, *self.argv, *extra_argv])
        if code == INTERRUPTED:
            # Stopped on a signal with its checkpoint saved, and requeued (or cancelled): leave no
            # result behind, so the job counts as finished only when the requeued run completes.
            os._exit(INTERRUPTED)
        if code:
            raise StageFailed(f"{self.command()} exited with status {code}; see the job's log")
        return code


@dataclass
class PrepPart:
    """Task of a prep job array: `--part index/count`, given by the array index."""

    job: StageJob
    count: int

    def __call__(self, index: int) -> int:
        return self.job("--part", f"{index}/{self.count}")


def argv_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def output_dir(stage: str, argv: list[str]) -> Path | None:
    """Where a stage writes (its run directory; prep: its manifest directory)."""
    if stage in ("pretrain", "finetune"):
        out = argv_value(argv, "--out")
    elif stage == "prep":
        if argv and argv[0] == "merge":
            out = argv_value(argv, "--out")
        else:
            positional = [a for a in (argv[1:] if argv and argv[0] in PREP_COMMANDS else argv) if not a.startswith("-")]
            out = positional[1] if len(positional) > 1 else None
    else:
        out = argv[0] if argv else None
    return Path(out) if out else None


def pipeline_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m slurm pipeline ... --", description="prep -> pretrain -> finetune -> evaluate")
    p.add_argument("--corpus", required=True, help="the LibriSpeech directory")
    p.add_argument("--work", required=True, help="where every stage writes (manifests/, pretrain/, finetune/)")
    p.add_argument("--finetuning-root", default=None, help="Libri-Light librispeech_finetuning (for train-10m/1h/10h)")
    p.add_argument("--num-shards", type=int, default=0, help="packed training shards")
    p.add_argument("--pretrain-preset", default="wav2vec2_base")
    p.add_argument("--finetune-preset", default="ctc_10h")
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--finetune-steps", type=int, default=None)
    p.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--splits", default="dev-clean,dev-other,test-clean,test-other")
    return p


def pipeline_stages(argv: list[str]) -> list[tuple[str, list[str]]]:
    """The four stages' command lines, in order, from the pipeline's own arguments."""
    a = pipeline_parser().parse_args(argv)
    work = Path(a.work)
    manifests, pre, ft = str(work / "manifests"), str(work / "pretrain"), str(work / "finetune")
    prep = [a.corpus, manifests]
    if a.finetuning_root:
        prep += ["--finetuning-root", a.finetuning_root]
    if a.num_shards:
        prep += ["--num-shards", str(a.num_shards), "--pack"]
    pretrain = ["--preset", a.pretrain_preset, "--data", manifests, "--out", pre]
    if a.pretrain_steps is not None:
        pretrain += ["--max-steps", str(a.pretrain_steps)]
    for kv in a.pretrain_set:
        pretrain += ["--set", kv]
    finetune = ["--preset", a.finetune_preset, "--init-from", pre, "--data", manifests, "--out", ft]
    if a.finetune_steps is not None:
        finetune += ["--max-steps", str(a.finetune_steps)]
    for kv in a.finetune_set:
        finetune += ["--set", kv]
    evaluate = [ft, "--data", manifests, "--splits", a.splits]
    return [("prep", prep), ("pretrain", pretrain), ("finetune", finetune), ("evaluate", evaluate)]
