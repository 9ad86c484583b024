from __future__ import annotations

import json
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
    make_toy_corpus(out, num_utterances=80, seed=0)
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
