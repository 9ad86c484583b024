"""Fine-tuning from every kind of source: a transformers directory, a data2vec run (exported to
`Data2VecAudioForCTC`), a fine-tuned run; and a resume that refuses another vocabulary."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from conftest import pretrain_cmd
from test_finetune_run import finetune_cmd, run_ok

from pretrain.training import checkpoint as ckpt

pytestmark = pytest.mark.slow


def test_init_from_transformers_directory(pretrained_run, prepared, tmp_path):
    hf_dir = tmp_path / "hf"
    run_ok([sys.executable, "-m", "pretrain.export", str(pretrained_run), "--format", "hf", "--out", str(hf_dir)])
    out = tmp_path / "run"
    run_ok(finetune_cmd(hf_dir, prepared, out, "--max-steps", "0"))
    ours = ckpt.load(out)["model"]
    pre = ckpt.load(pretrained_run)["model"]
    encoder = [k for k in ours if k.startswith("w2v.")]
    assert len(encoder) == len([k for k in pre if not k.startswith(("quantizer.", "project_q.", "final_proj."))])
    assert all(torch.equal(ours[k], pre[k[4:]]) for k in encoder)
    # a fine-tuned run is a source too: its encoder, a fresh head
    again = tmp_path / "again"
    run_ok(finetune_cmd(out, prepared, again, "--max-steps", "0", "--seed", "5"))
    second = ckpt.load(again)["model"]
    assert all(torch.equal(second[k], ours[k]) for k in encoder)
    assert not torch.equal(second["proj.weight"], ours["proj.weight"])


def test_data2vec_ctc_exports_to_data2vec_audio_for_ctc(prepared, tmp_path):
    transformers = pytest.importorskip("transformers")
    from data_prep.sources import ManifestSource
    from finetune.decoder import GreedyDecoder
    from finetune.inference import emissions, load_ctc

    pre, ctc, hf_dir = tmp_path / "d2v", tmp_path / "ctc", tmp_path / "hf"
    run_ok(pretrain_cmd("data2vec_tiny", prepared, pre, "--max-steps", "4", "--set", "train.valid_interval=1000"))
    run_ok(finetune_cmd(pre, prepared, ctc, "--max-steps", "6", "--set", "ctc.freeze_finetune_updates=2",
                        "--set", "train.valid_interval=1000"))
    cfg, model, dictionary, _ = load_ctc(ctc)
    assert cfg.model.arch == "data2vec" and cfg.data.normalize and cfg.model.pos_conv_depth == 2
    run_ok([sys.executable, "-m", "finetune.export", str(ctc), "--format", "hf", "--out", str(hf_dir)])
    hf = transformers.Data2VecAudioForCTC.from_pretrained(hf_dir).eval()
    processor = transformers.Wav2Vec2Processor.from_pretrained(hf_dir)
    source = ManifestSource(prepared / "test-other.tsv")
    greedy = GreedyDecoder(dictionary)
    for i in range(4):
        wave = source.read(i)
        ours = emissions(model, wave, cfg.data.normalize)
        inputs = processor(wave, sampling_rate=16_000, return_tensors="pt")  # normalises, as we do
        with torch.no_grad():
            theirs = hf(inputs.input_values).logits[0]
        assert float((theirs - ours).abs().max()) < 1e-3
        assert processor.batch_decode(theirs.argmax(-1)[None])[0] == greedy(ours)
    # fairseq2 has no data2vec model: a clear refusal, nothing written
    proc = subprocess.run([sys.executable, "-m", "finetune.export", str(ctc), "--format", "fairseq2",
                           "--out", str(tmp_path / "fs2")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no data2vec" in proc.stderr


def test_resume_refuses_another_vocabulary(pretrained_run, prepared, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared, data, symlinks=True)
    out = tmp_path / "run"
    run_ok(finetune_cmd(pretrained_run, data, out, "--max-steps", "1", "--set", "train.valid_interval=1000"))
    lines = (data / "dict.ltr.txt").read_text().splitlines()
    (data / "dict.ltr.txt").write_text("\n".join(lines[:-1]) + "\n")  # one symbol fewer
    proc = subprocess.run(finetune_cmd(None, data, out, "--max-steps", "2"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "vocabulary" in proc.stderr
    assert (out / "checkpoints" / "step_00000001.pt").exists()  # the saved checkpoint is untouched
