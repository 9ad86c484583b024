"""The README's first command end to end: `make pipeline` (what `make demo` runs after installing)
on the synthetic corpus, with the test CER it reaches pinned with a margin."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

#: greedy CER (%) measured for this pipeline (2 CPU cores, torch 2.13; pretraining on the toy
#: LibriSpeech train split merged with the toy Libri-Light segments; masks and negatives drawn by
#: the loader): test-clean 59.78, test-other 70.67. From random initialisation the same fine-tuning
#: gives about 76 on dev-other.
PINNED_CER = {"test-clean": 59.78, "test-other": 70.67}
MARGIN = 8.0


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_main_job_end_to_end(tmp_path):
    work = tmp_path / "demo"
    proc = subprocess.run(["make", "-s", "-C", str(ROOT), "pipeline", f"WORK={work}", f"PYTHON={sys.executable}"],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout[proc.stdout.index("greedy decoding of"):]
    for split in ("dev-clean", "dev-other", "test-clean", "test-other"):
        assert split in summary
    assert "kenlm decoding of" in summary and "artefacts:" in summary
    for rel in ("corpus", "manifests", "librilight", "unlabelled", "wav2vec2", "ctc/checkpoints/best.pt", "ctc/tensorboard", "lm.arpa", "ctc-hf"):
        assert str((work / rel).resolve()) in summary, rel
    greedy = json.loads(next((work / "ctc" / "eval").glob("*-greedy.json")).read_text())
    for split, pinned in PINNED_CER.items():
        cer = greedy["splits"][split]["cer"]
        assert cer <= pinned + MARGIN, f"{split} CER {cer:.2f} regressed from {pinned} (margin {MARGIN})"
    assert (work / "ctc-hf" / "vocab.json").exists() and (work / "ctc-hf" / "model.safetensors").exists()
    assert "test-clean CER (greedy decoding)" in (work / "ctc-hf" / "README.md").read_text()  # the model card
    for run, plot in (("wav2vec2", "codebook.png"), ("ctc", "wer.png")):  # the run reports
        assert (work / run / "report" / "report.md").exists() and (work / run / "report" / plot).exists()
