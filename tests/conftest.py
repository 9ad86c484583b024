from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory) -> Path:
    """A small synthetic corpus shared by the tests (read-only: copy before modifying)."""
    from data_prep.toy import make_toy_corpus

    out = tmp_path_factory.mktemp("toy")
    make_toy_corpus(out, num_utterances=80, seed=0, librilight_utterances=48)
    return out


@pytest.fixture(scope="session")
def prepared(toy_corpus, tmp_path_factory) -> Path:
    """Manifests of the toy corpus, with 2 packed shards of train."""
    from data_prep.librispeech import PrepOptions, prepare

    out = tmp_path_factory.mktemp("manifests")
    prepare(
        PrepOptions(
            root=toy_corpus,
            out=out,
            workers=2,
            num_shards=2,
            pack=True,
            finetuning_root=toy_corpus / "librispeech_finetuning",
        )
    )
    return out


def pretrain_cmd(preset: str, data: Path, out: Path, *extra: str) -> list[str]:
    """The `python -m pretrain` command line the tests run as a user would."""
    return [sys.executable, "-m", "pretrain", "--preset", preset, "--data", str(data), "--out", str(out), *extra]


def metric_rows(run: Path, split: str = "train") -> list[dict]:
    """The records of one split in a run's metrics.jsonl."""
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["split"] == split]


def finetune_cmd(init: Path | None, data: Path, out: Path, *extra: str) -> list[str]:
    """`python -m finetune` with the tiny preset (no --init-from when `init` is None)."""
    cmd = [sys.executable, "-m", "finetune", "--preset", "ctc_tiny", "--data", str(data), "--out", str(out)]
    return cmd + (["--init-from", str(init)] if init else []) + list(extra)


def run_ok(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command line, failing the test with its output if it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def pretrained_run(prepared, tmp_path_factory) -> Path:
    """A briefly pretrained tiny wav2vec 2.0 run, the source of the fine-tuning tests."""
    out = tmp_path_factory.mktemp("w2v") / "run"
    run_ok(pretrain_cmd("wav2vec2_tiny", prepared, out, "--max-steps", "20", "--set", "train.valid_interval=1000"))
    return out


@pytest.fixture(scope="session")
def ctc_run(pretrained_run, prepared, tmp_path_factory) -> Path:
    """A few updates past a short frozen period, validating on dev-other."""
    out = tmp_path_factory.mktemp("ctc") / "run"
    run_ok(finetune_cmd(pretrained_run, prepared, out, "--max-steps", "8",
                        "--set", "ctc.freeze_finetune_updates=4", "--set", "train.valid_interval=4",
                        "--set", "train.log_interval=2", "--set", "train.max_valid_batches=4"))
    return out


@pytest.fixture(scope="session")
def slurm_env():
    """A single-node SLURM started for the session (stopped by PID at the end); the environment
    that points clients at it. Skips where SLURM cannot start, unless REQUIRE_SLURM=1 (CI)."""
    import os
    import shutil
    import tempfile

    import slurm_cluster

    base = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))  # munge needs world-traversable parents
    try:
        env = slurm_cluster.start(base)
    except (slurm_cluster.SlurmUnavailable, subprocess.SubprocessError, OSError) as err:
        if os.environ.get("REQUIRE_SLURM") == "1":
            pytest.fail(f"SLURM is required here but did not start: {err}")
        pytest.skip(f"no local SLURM: {err}")
    yield env
    slurm_cluster.stop(base)
    shutil.rmtree(base, ignore_errors=True)
