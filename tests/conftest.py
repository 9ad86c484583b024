from __future__ import annotations

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
