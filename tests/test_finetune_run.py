"""Fine-tuning end to end through the command lines: train, freeze schedule, resume, evaluate,
transcribe, export to transformers, and the errors a user meets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import finetune_cmd, metric_rows, run_ok

from pretrain.training import checkpoint as ckpt

pytestmark = pytest.mark.slow


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(path)["model"]


def test_freeze_schedule(pretrained_run, prepared, tmp_path):
    """No pretrained weight moves during the frozen updates; afterwards the encoder trains, the conv
    feature extractor never does (feature_grad_mult 0), and the head trains throughout."""
    out = tmp_path / "run"
    common = ["--set", "ctc.freeze_finetune_updates=3", "--set", "train.save_interval=3", "--set", "train.valid_interval=100"]
    run_ok(finetune_cmd(pretrained_run, prepared, out, "--max-steps", "3", *common))
    pre = _weights(ckpt.resolve(pretrained_run))
    frozen = _weights(out / "checkpoints" / "step_00000003.pt")
    run_ok(finetune_cmd(None, prepared, out, "--max-steps", "6", *common))  # resumes at 3
    later = _weights(out / "checkpoints" / "step_00000006.pt")
    encoder = [k for k in frozen if k.startswith("w2v.")]
    assert encoder and all(torch.equal(frozen[k], pre[k[4:]]) for k in encoder), "pretrained weights moved while frozen"
    assert not torch.equal(frozen["proj.weight"], later["proj.weight"])
    conv = [k for k in encoder if k.startswith("w2v.feature_extractor.")]
    assert all(torch.equal(later[k], pre[k[4:]]) for k in conv), "the conv feature extractor moved"
    moved = [k for k in encoder if k not in conv and not torch.equal(later[k], pre[k[4:]])]
    assert "w2v.encoder.layers.0.fc1.weight" in moved and "w2v.layer_norm.weight" in moved


def test_run_logs_validation_wer_and_keeps_best(ctc_run):
    valid = metric_rows(ctc_run, "valid")
    assert [r["step"] for r in valid] == [4, 8]
    assert all(0 <= r["wer"] and 0 <= r["cer"] for r in valid)
    config = json.loads((ctc_run / "config.json").read_text())
    metric = config["ctc"]["best_metric"]
    best = min(valid, key=lambda r: r[metric])  # the first of equals, as the trainer keeps it
    assert (ctc_run / "checkpoints" / "best.pt").resolve().name == f"step_{best['step']:08d}.pt"
    assert config["ctc"]["symbols"][:5] == ["<s>", "<pad>", "</s>", "<unk>", "|"]
    # fine-tuning settings are the preset's, not the pretrained run's (0.65, 0.1, 0.1)
    assert config["model"]["mask_prob"] == 0.25 and config["model"]["feature_grad_mult"] == 0.0
    assert config["model"]["dropout"] == 0.0
    assert config["model"]["encoder_embed_dim"] == 64  # taken from the pretrained run


def test_evaluate_writes_table_and_hypotheses(ctc_run, prepared):
    proc = run_ok([sys.executable, "-m", "finetune.evaluate", str(ctc_run), "--data", str(prepared),
                   "--splits", "test-clean,test-other"])
    assert "test-clean" in proc.stdout and "WER" in proc.stdout
    report = json.loads(next((ctc_run / "eval").glob("*-greedy.json")).read_text())
    assert report["checkpoint"] == str((ctc_run / "checkpoints" / "best.pt").resolve())
    split = report["splits"]["test-other"]
    n = len((prepared / "test-other.tsv").read_text().splitlines()) - 1
    assert split["utterances"] == len(split["hypotheses"]) == n
    refs = (prepared / "test-other.wrd").read_text().splitlines()
    assert [h["ref"] for h in split["hypotheses"]] == refs
    from finetune.wer import error_counts

    recount = error_counts([h["ref"] for h in split["hypotheses"]], [h["hyp"] for h in split["hypotheses"]])
    assert split["wer"] == pytest.approx(recount.wer, abs=1e-3)


def test_transcribe_any_rate_and_channels(ctc_run, prepared, tmp_path):
    lines = (prepared / "test-clean.tsv").read_text().splitlines()
    original = Path(lines[0]) / lines[1].split("\t")[0]
    wave, rate = sf.read(original, dtype="float32")
    assert rate == 16_000
    resampled = tmp_path / "stereo_44k.wav"
    import soxr

    up = soxr.resample(wave, 16_000, 44_100)
    sf.write(resampled, np.stack([up, up], axis=1), 44_100)
    broken = tmp_path / "broken.flac"
    broken.write_bytes(b"fLaC" + b"\0" * 10)
    proc = subprocess.run([sys.executable, "-m", "finetune.transcribe", str(ctc_run), str(original),
                           str(resampled), str(broken)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1  # one file failed, the others were transcribed
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [r[0] for r in rows] == [str(original), str(resampled)]
    assert "broken.flac" in proc.stderr
    # the converted copy gives (nearly always exactly) the same words as the original
    from finetune.wer import error_counts

    assert error_counts([rows[0][1]], [rows[1][1]]).cer <= 20.0


def test_hf_export_transcripts_equal_ours(ctc_run, prepared, tmp_path):
    transformers = pytest.importorskip("transformers")
    from data_prep.sources import ManifestSource
    from finetune.decoder import GreedyDecoder
    from finetune.inference import emissions, load_ctc

    out = tmp_path / "hf"
    run_ok([sys.executable, "-m", "finetune.export", str(ctc_run), "--format", "hf", "--out", str(out)])
    hf = transformers.Wav2Vec2ForCTC.from_pretrained(out).eval()
    processor = transformers.Wav2Vec2Processor.from_pretrained(out)
    cfg, model, dictionary, _ = load_ctc(ctc_run)
    greedy = GreedyDecoder(dictionary)
    source = ManifestSource(prepared / "test-clean.tsv")
    ours, theirs, diffs = [], [], []
    for i in range(len(source)):
        wave = source.read(i)
        logits = emissions(model, wave, cfg.data.normalize)
        inputs = processor(wave, sampling_rate=16_000, return_tensors="pt")
        with torch.no_grad():
            hf_logits = hf(inputs.input_values).logits[0]
        diffs.append(float((hf_logits - logits).abs().max()))
        ours.append(greedy(logits))
        theirs.append(processor.batch_decode(hf_logits.argmax(-1)[None])[0])
    assert max(diffs) < 1e-3
    # a barely trained head can put </s> on top at a frame: transformers spells it out (its
    # skip_special_tokens would also drop the CTC blanks before merging repeats), ours leaves it out
    words = lambda text: " ".join(text.replace("</s>", " ").replace("<s>", " ").split())  # noqa: E731
    assert [words(t) for t in theirs] == [words(t) for t in ours]


def test_errors_are_clear(pretrained_run, ctc_run, prepared, tmp_path):
    # a pretraining run has no CTC head
    proc = subprocess.run([sys.executable, "-m", "finetune.evaluate", str(pretrained_run), "--data", str(prepared)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "without a CTC head" in proc.stderr
    # a CTC run is not a pretraining run
    proc = subprocess.run([sys.executable, "-m", "pretrain.export", str(ctc_run), "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "finetune.export" in proc.stderr
    # a split that was not prepared
    proc = subprocess.run(finetune_cmd(pretrained_run, prepared, tmp_path / "r", "--train-split", "train-100h"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "train-100h.tsv not found" in proc.stderr
    # no source at all, and a bad override key
    proc = subprocess.run(finetune_cmd(None, prepared, tmp_path / "r"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--init-from is required" in proc.stderr
    proc = subprocess.run(finetune_cmd(pretrained_run, prepared, tmp_path / "r", "--set", "ctc.freeze=1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "freeze_finetune_updates" in proc.stderr
    assert not (tmp_path / "r").exists()
