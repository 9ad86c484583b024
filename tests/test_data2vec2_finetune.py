"""data2vec 2.0: CTC fine-tuning (decoder dropped, ALiBi kept and learnable, fairseq's encoder sizes),
the `--format safetensors` export both ways, and the refusal of formats that have no such model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import finetune_cmd, metric_rows, pretrain_cmd, run_ok

from pretrain.training import checkpoint as ckpt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def d2v2_run(prepared, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("d2v2") / "run"
    run_ok(pretrain_cmd("data2vec2_tiny", prepared, out, "--max-steps", "4", "--set", "train.valid_interval=1000"))
    return out


@pytest.fixture(scope="module")
def d2v2_ctc(d2v2_run, prepared, tmp_path_factory) -> Path:
    """Two frozen updates, then two that train the encoder too."""
    out = tmp_path_factory.mktemp("d2v2_ctc") / "run"
    run_ok(finetune_cmd(d2v2_run, prepared, out, "--max-steps", "4", "--set", "ctc.freeze_finetune_updates=2",
                        "--set", "train.valid_interval=1000", "--set", "train.log_interval=1"))
    return out


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                          check=False)


def test_init_loads_the_student_encoder_exactly_without_the_decoder(d2v2_run, prepared, tmp_path):
    out = tmp_path / "run"
    run_ok(finetune_cmd(d2v2_run, prepared, out, "--max-steps", "0"))
    pre = ckpt.load(d2v2_run)["model"]
    ours = ckpt.load(out)["model"]
    encoder = {k[len("w2v."):] for k in ours if k.startswith("w2v.")}
    assert encoder == {k for k in pre if not k.startswith("decoder.")}
    assert any(k.startswith("decoder.") for k in pre) and not any("decoder." in k or "mask_emb" in k for k in ours)
    assert "encoder.alibi_scale" in encoder and any(k.startswith("encoder.layers.") for k in encoder)
    assert all(torch.equal(ours[f"w2v.{k}"], pre[k]) for k in encoder)
    assert set(ours) - {f"w2v.{k}" for k in encoder} == {"proj.weight", "proj.bias"}


def test_finetuning_trains_with_a_learnable_alibi_scale(d2v2_run, d2v2_ctc):
    rows = metric_rows(d2v2_ctc)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    cfg = json.loads((d2v2_ctc / "config.json").read_text())
    assert cfg["model"]["arch"] == "data2vec2"
    before = ckpt.load(d2v2_run)["model"]["encoder.alibi_scale"]
    after = ckpt.load(d2v2_ctc)["model"]["w2v.encoder.alibi_scale"]
    assert after.shape == before.shape and not torch.equal(after, before)  # trained after the frozen updates


@pytest.mark.parametrize("preset,expected", [("data2vec2_base", 93_163_532), ("data2vec2_large", 313_275_408)])
def test_encoder_sizes_equal_fairseqs(preset, expected, monkeypatch):
    """Through the fine-tuning config path, so every architecture field of the source is adopted
    (data2vec2_large's 8 prenet blocks above all)."""
    import finetune.source
    from finetune.__main__ import build_parser, resolve_config
    from finetune.model import CTCModel
    from pretrain.presets import get_preset

    source = get_preset(preset)
    fake = finetune.source.Pretrained(source.model, True, {}, "fake")
    monkeypatch.setattr(finetune.source, "load_pretrained", lambda path: fake)
    cfg, _ = resolve_config(build_parser().parse_args(["--preset", "ctc_10h", "--init-from", "fake"]))
    with torch.device("meta"):
        model = CTCModel(cfg.model, 32)
    assert sum(p.numel() for p in model.w2v.parameters()) == expected
    assert model.num_layers == source.model.prenet_depth + source.model.encoder_layers


def test_activation_checkpointing_gives_the_same_gradients(monkeypatch):
    import pretrain.models.encoder as encoder  # the block loop both encoders share
    from finetune.model import CTCModel
    from pretrain.models.encoder import set_activation_checkpointing
    from pretrain.presets import get_preset

    cfg = get_preset("data2vec2_tiny").model
    cfg.prenet_depth, cfg.dropout, cfg.attention_dropout = 1, 0.1, 0.1
    calls: list[int] = []
    real = encoder.checkpoint
    monkeypatch.setattr(encoder, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    wave = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 16_000)).astype(np.float32))
    padding = torch.zeros(2, 16_000, dtype=torch.bool)
    padding[1, 12_000:] = True
    torch.manual_seed(0)
    model = CTCModel(cfg, 10).train()
    grads = []
    for enabled in (False, True):
        set_activation_checkpointing(model, enabled)
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks and mask noise
        mask = torch.zeros(2, 49, dtype=torch.bool)
        mask[:, 5:15] = True
        logits, _ = model(wave, padding, mask)
        logits.logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert calls and len(calls) == len(model.w2v.encoder.layers)
    assert grads[0].keys() == grads[1].keys() and "w2v.encoder.alibi_scale" in grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_safetensors_export_of_a_pretraining_run_reads_back(d2v2_run, prepared, tmp_path):
    from safetensors.torch import load_file

    from pretrain.extract import load_encoder

    out = tmp_path / "export"
    run_ok([sys.executable, "-m", "pretrain.export", str(d2v2_run), "--format", "safetensors", "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "speech-pretrain-safetensors" and config["kind"] == "pretrain"
    assert config["step"] == 4 and config["teacher"] == "teacher." and config["model"]["arch"] == "data2vec2"
    state = ckpt.load(d2v2_run)
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors.keys() == set(state["model"]) | {f"teacher.{k}" for k in state["task"]["teacher"]}
    card = (out / "README.md").read_text()
    assert "arxiv.org/abs/2212.07525" in card and "no data2vec 2.0 model" in card and "library_name" not in card
    # continued pretraining starts from the same student and teacher
    again = tmp_path / "again"
    run_ok(pretrain_cmd("data2vec2_tiny", prepared, again, "--init-from", str(out), "--max-steps", "0"))
    resumed = ckpt.load(again)
    assert all(torch.equal(resumed["model"][k], v) for k, v in state["model"].items())
    assert all(torch.equal(resumed["task"]["teacher"][k], v) for k, v in state["task"]["teacher"].items())
    # fine-tuning and feature extraction read it as they read the run
    ctc = tmp_path / "ctc"
    run_ok(finetune_cmd(out, prepared, ctc, "--max-steps", "0"))
    weights = ckpt.load(ctc)["model"]
    assert all(torch.equal(weights[f"w2v.{k}"], v) for k, v in state["model"].items() if not k.startswith("decoder."))
    _, exported = load_encoder(out, torch.device("cpu"))
    _, original = load_encoder(d2v2_run, torch.device("cpu"))
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in original.state_dict().items())


def test_safetensors_export_of_a_ctc_run_gives_the_same_logits(d2v2_ctc, prepared, tmp_path):
    from data_prep.sources import ManifestSource
    from finetune.inference import emissions, load_ctc
    from finetune.source import load_pretrained
    from pretrain.config import dumps  # JSON has lists where the checkpoint has tuples

    out = tmp_path / "export"
    run_ok([sys.executable, "-m", "finetune.export", str(d2v2_ctc), "--format", "safetensors", "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "ctc" and config["teacher"] is None and config["step"] == 4
    cfg, model, dictionary, _ = load_ctc(out)
    ref_cfg, ref, ref_dict, _ = load_ctc(d2v2_ctc)
    assert dictionary.symbols == ref_dict.symbols == config["ctc"]["symbols"] and dumps(cfg) == dumps(ref_cfg)
    source = ManifestSource(prepared / "dev-clean.tsv")
    for i in range(2):
        wave = source.read(i)
        assert torch.equal(emissions(model, wave, cfg.data.normalize), emissions(ref, wave, ref_cfg.data.normalize))
    # the command-line tools take the export as they take the run
    audio = str(source.manifest.full_path(0))
    said = [_cli("finetune.transcribe", str(x), audio) for x in (out, d2v2_ctc)]
    assert said[0].returncode == 0 and said[0].stdout.startswith(audio + "\t") and said[0].stdout == said[1].stdout
    run_ok([sys.executable, "-m", "finetune.evaluate", str(out), "--data", str(prepared), "--splits", "dev-clean",
            "--max-utterances", "2"])
    assert (out / "eval" / "export-greedy.json").exists()
    # and so does fine-tuning again (its encoder, a fresh head)
    again = load_pretrained(out)
    assert again.model.arch == "data2vec2"
    assert again.weights.keys() == {k[len("w2v."):] for k in ref.state_dict() if k.startswith("w2v.")}


@pytest.mark.parametrize("module", ["pretrain.export", "finetune.export"])
@pytest.mark.parametrize("fmt", ["hf", "fairseq2"])
def test_formats_without_data2vec2_refuse_in_one_line(module, fmt, d2v2_run, d2v2_ctc, tmp_path, capsys):
    import importlib

    run = d2v2_run if module == "pretrain.export" else d2v2_ctc
    out = tmp_path / "out"
    code = importlib.import_module(module).main([str(run), "--format", fmt, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert "\n" not in err and "no data2vec 2.0 model" in err and "--format safetensors" in err
