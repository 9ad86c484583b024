"""Our runs exported as fairseq checkpoints (with model cards), and every command taking a fairseq file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import run_ok

from finetune.inference import load_ctc
from pretrain.build import build_task
from pretrain.interop.fairseq import read_fairseq
from pretrain.training import checkpoint as ckpt

pytestmark = pytest.mark.slow


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600)


def front_matter(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_pretrained_export_reads_back_and_continues(pretrained_run, prepared, tmp_path):
    out = tmp_path / "fs"
    proc = cli("pretrain.export", str(pretrained_run), "--format", "fairseq", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)  # plain values only
    assert state["cfg"]["model"]["_name"] == "wav2vec2" and state["cfg"]["task"]["_name"] == "audio_pretraining"
    assert state["optimizer_history"][-1]["num_updates"] == 20 and "extra_state" in state
    assert "encoder.layers.0.self_attn.q_proj.weight" in state["model"]
    assert "encoder.pos_conv.0.weight_g" in state["model"]
    theirs = read_fairseq(out / "checkpoint.pt")
    ours = ckpt.load(pretrained_run)["model"]
    assert theirs.weights.keys() == ours.keys() and all(torch.equal(theirs.weights[k], ours[k]) for k in ours)
    card = front_matter(out / "README.md")
    assert card["library_name"] == "fairseq" and "speech" in card["tags"] and card["license"] == "apache-2.0"
    text = (out / "README.md").read_text()
    assert "wav2vec2_tiny" in text and "20 updates" in text and "16 kHz" in text
    # continued pretraining from the fairseq file: with lr 0 the weights stay exactly the loaded ones
    run = tmp_path / "continued"
    run_ok([sys.executable, "-m", "pretrain", "--preset", "wav2vec2_tiny", "--data", str(prepared), "--out", str(run),
            "--init-from", str(out / "checkpoint.pt"), "--max-steps", "1", "--set", "optim.lr=0"])
    again = ckpt.load(run)["model"]
    assert all(torch.equal(again[k], ours[k]) for k in ours)
    # and its features, extracted from the fairseq file, are the run's
    feats = tmp_path / "feats"
    for source, where in ((out / "checkpoint.pt", feats / "a"), (pretrained_run, feats / "b")):
        proc = cli("pretrain.extract", str(source), "--manifest", str(prepared / "valid.tsv"), "--out", str(where))
        assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (feats / "a").iterdir())
    assert names and names == sorted(p.name for p in (feats / "b").iterdir())
    for name in names[:3]:
        assert np.array_equal(np.load(feats / "a" / name), np.load(feats / "b" / name))


def test_data2vec_export_keeps_the_teacher(prepared, tmp_path):
    run = tmp_path / "d2v"
    run_ok([sys.executable, "-m", "pretrain", "--preset", "data2vec_tiny", "--data", str(prepared), "--out", str(run),
            "--max-steps", "3", "--set", "train.valid_interval=1000"])
    out = tmp_path / "fs"
    proc = cli("pretrain.export", str(run), "--format", "fairseq", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["cfg"]["model"]["_name"] == "data2vec_audio" and state["cfg"]["task"]["normalize"] is True
    teacher = ckpt.load(run)["task"]["teacher"]
    ema = state["model"]["_ema"]
    # the whole teacher, positional conv included: fairseq's teacher keeps a fresh init wherever `_ema` is silent
    assert "layers.0.self_attn.k_proj.weight" in ema and any(k.startswith("pos_conv.") for k in ema)
    q, k, v = teacher["layers.0.self_attn.qkv_proj.weight"].chunk(3)
    assert torch.equal(ema["layers.0.self_attn.k_proj.weight"], k)
    # read back: student and teacher as they were
    theirs = read_fairseq(out / "checkpoint.pt")
    task = build_task(theirs.model)
    from pretrain.build import load_fairseq_weights

    load_fairseq_weights(task, theirs, out / "checkpoint.pt")
    mine = task.teacher.state_dict()
    assert all(torch.equal(mine[name], teacher[name]) for name in teacher)


def test_ctc_export_reads_back_with_its_dictionary_and_card(ctc_run, prepared, tmp_path):
    proc = cli("finetune.evaluate", str(ctc_run), "--data", str(prepared), "--splits", "test-clean", "--max-utterances", "6")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "fs"
    proc = cli("finetune.export", str(ctc_run), "--format", "fairseq", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    cfg = state["cfg"]
    assert cfg["model"]["_name"] == "wav2vec_ctc" and cfg["task"]["_name"] == "audio_finetuning"
    assert cfg["task"]["labels"] == "ltr" and cfg["task"]["data"] == str(out.resolve())
    assert cfg["model"]["w2v_args"]["model"]["_name"] == "wav2vec2"
    assert cfg["model"]["normalize"] == cfg["model"]["w2v_args"]["task"]["normalize"]  # fairseq asserts they agree
    lines = (out / "dict.ltr.txt").read_text().splitlines()
    _, _, dictionary, _ = load_ctc(ctc_run)
    assert [line.split()[0] for line in lines] == dictionary.symbols[4:]
    assert state["model"]["w2v_encoder.proj.weight"].shape[0] == len(dictionary)
    # the same transcripts from the export as from the run
    ours = cli("finetune.evaluate", str(ctc_run), "--data", str(prepared), "--splits", "test-clean",
               "--max-utterances", "6", "--out", str(tmp_path / "a.json"))
    moved = tmp_path / "elsewhere" / "model.pt"
    moved.parent.mkdir()
    shutil.copy(out / "checkpoint.pt", moved)
    missing = cli("finetune.evaluate", str(moved), "--data", str(prepared), "--splits", "test-clean")
    assert missing.returncode == 1 and "--dict" in missing.stderr  # no dictionary beside it: say what to pass
    theirs = cli("finetune.evaluate", str(moved), "--dict", str(out / "dict.ltr.txt"), "--data", str(prepared),
                 "--splits", "test-clean", "--max-utterances", "6", "--out", str(tmp_path / "b.json"))
    assert ours.returncode == theirs.returncode == 0, theirs.stderr
    a, b = (json.loads((tmp_path / f"{x}.json").read_text())["splits"]["test-clean"] for x in "ab")
    assert a["wer"] == b["wer"] and a["cer"] == b["cer"]
    # the model card holds the WER/CER the run measured on this checkpoint
    card = front_matter(out / "README.md")
    results = card["model-index"][0]["results"]
    measured = {(r["dataset"]["name"], m["type"]): m["value"] for r in results for m in r["metrics"]}
    assert measured[("test-clean", "wer")] == round(a["wer"], 2) and ("test-clean", "cer") in measured
    assert "automatic-speech-recognition" in card["tags"]
    # fine-tuning again from the fairseq CTC file starts from its encoder
    run = tmp_path / "again"
    run_ok([sys.executable, "-m", "finetune", "--preset", "ctc_tiny", "--init-from", str(out / "checkpoint.pt"),
            "--data", str(prepared), "--out", str(run), "--max-steps", "1", "--set", "optim.lr=0",
            "--set", "train.valid_interval=1000"])
    before, after = ckpt.load(ctc_run)["model"], ckpt.load(run)["model"]
    encoder = [k for k in before if k.startswith("w2v.") and "mask_emb" not in k]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)


def test_hf_and_fairseq2_exports_get_cards_too(pretrained_run, ctc_run, tmp_path):
    for module, run, fmt, kind in (("pretrain.export", pretrained_run, "hf", "pretrained"),
                                   ("finetune.export", ctc_run, "hf", "ctc"),
                                   ("finetune.export", ctc_run, "fairseq2", "ctc")):
        out = tmp_path / f"{kind}-{fmt}"
        proc = cli(module, str(run), "--format", fmt, "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        card = front_matter(out / "README.md")
        assert card["language"] == "en" and card["library_name"] == {"hf": "transformers"}.get(fmt, fmt)
        assert ("ctc" in card["tags"]) == (kind == "ctc")
        assert "16 kHz" in (out / "README.md").read_text()


FAIRSEQ_CHECK = r"""
import argparse, json, sys, numpy as np, torch
from fairseq import checkpoint_utils, utils
args = json.loads(sys.argv[1])
if args.get("user_dir"):
    utils.import_user_module(argparse.Namespace(user_dir=args["user_dir"]))
x = torch.from_numpy(np.load(args["wave"]))[None]
out = {}
for name, path in args["files"].items():
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], strict=True)
    model = models[0].eval()
    with torch.no_grad():
        if cfg.model._name == "wav2vec_ctc":
            y = model(source=x, padding_mask=None)["encoder_out"][:, 0]  # (T, V)
            assert len(task.target_dictionary) == y.shape[-1]
        else:
            y = model.extract_features(x, padding_mask=None, mask=False)["x"][0]
    np.save(args["out"] + "/" + name + ".npy", y.numpy())
"""


@pytest.mark.skipif(not __import__("os").environ.get("FAIRSEQ_PYTHON"),
                    reason="opt-in: set FAIRSEQ_PYTHON to a Python that imports fairseq (and FAIRSEQ_DATA2VEC_DIR to "
                           "its examples/data2vec for data2vec)")
def test_fairseq_itself_loads_our_exports(pretrained_run, ctc_run, prepared, tmp_path):
    """Checked by fairseq's own `load_model_ensemble_and_task` (strict), where one is installed."""
    import os

    from pretrain.extract import load_encoder

    files = {}
    for module, run, name in (("pretrain.export", pretrained_run, "pretrained"), ("finetune.export", ctc_run, "ctc")):
        proc = cli(module, str(run), "--format", "fairseq", "--out", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr
        files[name] = str(tmp_path / name / "checkpoint.pt")
    x = (np.random.default_rng(0).standard_normal(16_000) * 0.1).astype(np.float32)
    np.save(tmp_path / "wave.npy", x)
    spec = {"files": files, "wave": str(tmp_path / "wave.npy"), "out": str(tmp_path),
            "user_dir": os.environ.get("FAIRSEQ_DATA2VEC_DIR")}
    proc = subprocess.run([os.environ["FAIRSEQ_PYTHON"], "-c", FAIRSEQ_CHECK, json.dumps(spec)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, encoder = load_encoder(pretrained_run, torch.device("cpu"))
    from pretrain.extract import encode

    np.testing.assert_allclose(np.load(tmp_path / "pretrained.npy"), encode(encoder, x, torch.device("cpu")), atol=1e-4)
    _, model, _, _ = load_ctc(ctc_run)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)[None])[0][0].numpy()
    np.testing.assert_allclose(np.load(tmp_path / "ctc.npy"), logits, atol=1e-4)
