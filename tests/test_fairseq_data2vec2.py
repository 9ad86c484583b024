"""data2vec 2.0 and fairseq's `Data2VecMultiModel`: names both ways, our writer read back by our
reader, and (opt-in, with fairseq's own Python in FAIRSEQ_PYTHON) the same loss, targets,
predictions, gradients and features from fairseq's code as from ours."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.loader import Batch
from pretrain.build import build_task, load_fairseq_weights
from pretrain.interop import fairseq_data2vec2 as d2v2
from pretrain.interop.fairseq import is_fairseq_file, read_fairseq
from pretrain.interop.fairseq_write import write_ctc, write_pretrained
from pretrain.objectives.data2vec2_task import Data2Vec2Task, masker_for
from pretrain.presets import get_preset

CHECK = Path(__file__).parent / "fixtures" / "fairseq_data2vec2_check.py"
SYMBOLS = ["<s>", "<pad>", "</s>", "<unk>", "|", "E", "T", "A", "O", "N"]
#: the tiny preset; with a prenet block and 12 heads (ALiBi slopes of a non-power of two); and with a
#: batch cropped from longer utterances, whose mask rows then differ in their counts of masked frames
VARIANTS = {"tiny": ({}, None), "prenet": ({"prenet_depth": 1, "encoder_attention_heads": 12, "encoder_embed_dim": 96,
                                           "encoder_ffn_embed_dim": 384, "clone_batch": 3}, None),
            "cropped": ({}, [16_000, 19_200])}


def tiny(**changes):
    """data2vec2_tiny without any randomness in a training forward: no dropout, no mask-token noise."""
    m = get_preset("data2vec2_tiny").model
    m.dropout = m.attention_dropout = m.activation_dropout = m.encoder_layerdrop = m.decoder_dropout = 0.0
    m.dropout_input, m.mask_noise_std = 0.0, 0.0
    for name, value in changes.items():
        setattr(m, name, value)
    return m


def perturbed_task(cfg, seed: int = 0) -> Data2Vec2Task:
    """Fresh init leaves LayerNorms at 1/0, biases at 0 and ALiBi scales at 1; randomise every tensor,
    the teacher's apart from the student's, so that a mix-up shows."""
    torch.manual_seed(seed)
    task = Data2Vec2Task(cfg)
    with torch.no_grad():
        for p in list(task.model.parameters()) + list(task.teacher.model.parameters()):
            p.add_(torch.randn_like(p) * 0.1)
    return task


def test_names_go_to_fairseq_and_back():
    for changes in ({}, {"prenet_depth": 2}, {"extractor_mode": "default"}):
        cfg = tiny(**changes)
        state = perturbed_task(cfg).model.state_dict()
        theirs = d2v2.to_fairseq_weights(state, cfg.prenet_depth, cfg.extractor_mode)
        assert len(theirs) == len(state)
        back = d2v2.from_fairseq_weights(theirs, cfg.prenet_depth, cfg.encoder_attention_heads)
        assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    # names as fairseq's own model has them (printed from an instance of `Data2VecMultiModel`)
    a = "modality_encoders.AUDIO."
    assert theirs[a + "alibi_scale"].shape == (1, 1, 4, 1, 1)
    cfg = tiny(prenet_depth=1)
    theirs = d2v2.to_fairseq_weights(perturbed_task(cfg).model.state_dict(), 1)
    for name in (a + "local_encoder.conv_layers.0.0.weight", a + "local_encoder.conv_layers.6.2.1.bias",
                 a + "project_features.1.weight", a + "project_features.2.weight",
                 a + "relative_positional_encoder.1.0.weight", a + "relative_positional_encoder.2.0.bias",
                 a + "context_encoder.norm.weight", a + "context_encoder.blocks.0.attn.qkv.weight",
                 a + "context_encoder.blocks.0.mlp.fc2.bias", "blocks.0.norm1.weight", "blocks.1.attn.proj.bias",
                 "blocks.1.norm2.weight", a + "decoder.blocks.1.0.weight", a + "decoder.proj.bias"):
        assert name in theirs, name
    assert not any(k.startswith(("blocks.2.", a + "context_encoder.blocks.1.")) for k in theirs)


def test_teacher_names_are_fairseqs_ema():
    cfg = tiny(prenet_depth=1)
    task = perturbed_task(cfg)
    ema = d2v2.teacher_to_fairseq(task.teacher.state_dict(), 1)
    assert all(k.startswith(("blocks.", "modality_encoders.AUDIO.")) for k in ema)
    assert not any(".local_encoder." in k or ".project_features." in k or ".decoder." in k for k in ema)
    back = d2v2.teacher_from_fairseq(ema, 1, cfg.encoder_attention_heads)
    assert all(torch.equal(back[k], v) for k, v in task.teacher.state_dict().items())


def test_our_export_reads_back_whole(tmp_path):
    cfg = tiny(prenet_depth=1, clone_batch=3, mask_prob=0.55, mask_prob_adjust=0.1, average_top_k_layers=1,
               ema_decay=0.9997, ema_end_decay=1.0, ema_anneal_end_step=300, decoder_dim=32, dropout=0.1)
    task = perturbed_task(cfg)
    path = write_pretrained(tmp_path / "checkpoint.pt", cfg, task.model.state_dict(), True, 7,
                            task.teacher.state_dict())
    state = torch.load(path, map_location="cpu", weights_only=True)  # plain values only
    assert state["cfg"]["model"]["_name"] == "data2vec_multi" and "_ema" in state["model"]
    assert state["cfg"]["task"]["precompute_mask_config"]["clone_batch"] == 3
    assert is_fairseq_file(path)
    theirs = read_fairseq(path)
    assert theirs.kind == "pretrain" and theirs.normalize and theirs.num_updates == 7
    for name in ("arch", "conv_feature_layers", "extractor_mode", "encoder_layers", "encoder_embed_dim",
                 "encoder_ffn_embed_dim", "encoder_attention_heads", "prenet_depth", "clone_batch", "mask_prob",
                 "mask_prob_adjust", "mask_length", "average_top_k_layers", "instance_norm_target_layer",
                 "ema_decay", "ema_end_decay", "ema_anneal_end_step", "decoder_dim", "decoder_kernel",
                 "decoder_layers", "decoder_groups", "dropout", "conv_pos", "conv_pos_groups", "pos_conv_depth"):
        mine, read = getattr(cfg, name), getattr(theirs.model, name)
        assert (read == [list(x) for x in mine]) if name == "conv_feature_layers" else read == mine, name
    ours = task.model.state_dict()
    assert theirs.weights.keys() == ours.keys() and all(torch.equal(theirs.weights[k], ours[k]) for k in ours)
    # loaded into a new task, as `--init-from` and `pretrain.export` do: student and teacher as they were
    again = build_task(theirs.model)
    load_fairseq_weights(again, theirs, path)
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in ours.items())
    assert all(torch.equal(again.teacher.state_dict()[k], v) for k, v in task.teacher.state_dict().items())


def test_ctc_fine_tuning_on_data2vec2_reads_back(tmp_path):
    cfg = tiny()
    encoder = {k: v for k, v in perturbed_task(cfg).model.state_dict().items() if not k.startswith("decoder.")}
    proj = (torch.randn(len(SYMBOLS), cfg.encoder_embed_dim), torch.randn(len(SYMBOLS)))
    path = write_ctc(tmp_path / "checkpoint.pt", cfg, encoder, proj, SYMBOLS, normalize=True)
    assert torch.load(path, weights_only=True)["cfg"]["model"]["w2v_args"]["model"]["_name"] == "data2vec_multi"
    theirs = read_fairseq(path)
    assert theirs.kind == "ctc" and theirs.model.arch == "data2vec2" and theirs.symbols == SYMBOLS
    assert theirs.weights.keys() == encoder.keys() and all(torch.equal(theirs.weights[k], encoder[k]) for k in encoder)
    with pytest.raises(ValueError, match="normalised"):
        write_ctc(tmp_path / "raw.pt", cfg, encoder, proj, SYMBOLS, normalize=False)


@pytest.mark.slow
def test_a_run_exports_for_fairseq_with_its_teacher(prepared, tmp_path):
    from conftest import pretrain_cmd, run_ok

    from pretrain.training import checkpoint as ckpt

    run = tmp_path / "run"
    run_ok(pretrain_cmd("data2vec2_tiny", prepared, run, "--max-steps", "2", "--set", "train.valid_interval=1000"))
    out = tmp_path / "fs"
    proc = subprocess.run([sys.executable, "-m", "pretrain.export", str(run), "--format", "fairseq", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (out / "README.md").exists()
    state, theirs = ckpt.load(run), read_fairseq(out / "checkpoint.pt")
    assert theirs.num_updates == 2 and theirs.model.arch == "data2vec2"
    assert all(torch.equal(theirs.weights[k], v) for k, v in state["model"].items())
    teacher = state["task"]["teacher"]
    assert theirs.teacher.keys() == teacher.keys()
    assert all(torch.equal(theirs.teacher[k], v) for k, v in teacher.items())


def _fairseq_file(tmp_path: Path, model: dict, weights: dict) -> Path:
    path = tmp_path / "x.pt"
    torch.save({"cfg": {"model": model, "task": {"_name": "audio_pretraining"}}, "model": weights}, path)
    return path


def test_other_modalities_and_variants_are_refused(tmp_path):
    cfg = tiny()
    section = d2v2.model_section(cfg)
    weights = d2v2.to_fairseq_weights(perturbed_task(cfg).model.state_dict(), 0)
    text = dict(section, supported_modality="TEXT")
    path = _fairseq_file(tmp_path, text, {"modality_encoders.TEXT.local_encoder.embed_tokens.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="data2vec 2.0 model for text"):
        read_fairseq(path)
    for where, name, value in (("audio", "learned_alibi_scale_per_layer", True), ("audio", "num_extra_tokens", 1),
                               ("top", "layer_norm_first", True), ("top", "end_of_block_targets", True)):
        changed = json.loads(json.dumps(section))
        (changed["modalities"]["audio"] if where == "audio" else changed)[name] = value
        with pytest.raises(ValueError, match=re.escape(name)):
            read_fairseq(_fairseq_file(tmp_path, changed, weights))


def _our_side(cfg, task: Data2Vec2Task, wave: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor) -> dict:
    """Loss (through the task's own step), predictions, targets, gradients in fairseq's names, features."""
    batch = Batch(source=wave, padding_mask=None, indices=torch.arange(len(wave)), extras={"mask": mask, "keep": keep})
    task.model.train()
    record = task.train_step(task.model, batch, np.random.default_rng(0))
    record.loss.backward()
    grads = {k: p.grad for k, p in task.model.named_parameters()}
    draws = torch.zeros(cfg.prenet_depth + cfg.encoder_layers)
    with torch.no_grad():
        out = task.model(wave, None, mask, keep, draws)
        y = task.teacher.targets(out.teacher_input, None, cfg.average_top_k_layers, cfg.instance_norm_target_layer)
        target = y.repeat_interleave(mask.shape[0] // len(wave), 0)[mask]
        task.model.eval()
        front = task.model.frontend(wave)
        features, _ = task.model.encoder(front.features, None)
    return {"loss": float(record.loss.detach()), "sample_size": record.sample_size, "pred": out.predictions,
            "target": target,
            "grads": d2v2.to_fairseq_weights(grads, cfg.prenet_depth), "features": features,
            "masked_pct": record.logs["masked_pct"], "target_var": record.logs["target_var"],
            "pred_var": record.logs["pred_var"]}


def compare_with_fairseq(tmp_path: Path, cfg, python: str, full_lengths: list[int] | None = None, seed: int = 0,
                         samples: int = 16_000, made: dict | None = None) -> dict:
    """Export a perturbed model of `cfg` (and a CTC head on it), run fairseq on the same audio and
    masks (drawn for utterances of `full_lengths`, cropped), and return the largest differences.
    With `made` (model overrides of fairseq's base audio recipe, matching `cfg`), fairseq writes the
    checkpoint instead and we read it."""
    rng = np.random.default_rng(seed)
    full_lengths = full_lengths or [samples, samples]
    wave = torch.from_numpy(rng.standard_normal((len(full_lengths), samples)).astype(np.float32))
    masks = masker_for(cfg)(wave, full_lengths, rng)
    pre, ctc = tmp_path / "pre" / "checkpoint.pt", tmp_path / "ctc" / "checkpoint.pt"
    if made is None:
        task = perturbed_task(cfg, seed)
        write_pretrained(pre, cfg, task.model.state_dict(), True, 0, task.teacher.state_dict())
        encoder = {k: v for k, v in task.model.state_dict().items() if not k.startswith("decoder.")}
        proj = (torch.randn(len(SYMBOLS), cfg.encoder_embed_dim) * 0.1, torch.randn(len(SYMBOLS)) * 0.1)
        write_ctc(ctc, cfg, encoder, proj, SYMBOLS, normalize=True)
    else:
        pre.parent.mkdir()
    np.save(tmp_path / "wave.npy", wave.numpy())
    np.save(tmp_path / "mask.npy", masks["mask"].numpy())
    spec = {"pretrained": str(pre), "ctc": None if made else str(ctc), "make": made, "wave": str(tmp_path / "wave.npy"),
            "mask": str(tmp_path / "mask.npy"), "out": str(tmp_path / "fs")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([python, str(CHECK), str(tmp_path / "spec.json")], capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "fs" / "report.json").read_text())
    if made is not None:  # fairseq's own file, read as `--init-from` reads it
        theirs = read_fairseq(pre)
        assert theirs.model.conv_feature_layers == [list(x) for x in cfg.conv_feature_layers]
        for name in ("clone_batch", "encoder_embed_dim", "prenet_depth", "mask_noise_std", "decoder_dropout"):
            assert getattr(theirs.model, name) == getattr(cfg, name), name
        task = build_task(theirs.model)
        load_fairseq_weights(task, theirs, pre)
        cfg = theirs.model
    theirs = np.load(tmp_path / "fs" / "pretrained.npz")
    # fairseq keeps row 0's count of frames in every row, chosen by an unstable sort: where a cropped
    # row has more (or fewer) masked frames, which of them the row encodes is the sort's whim
    keep = masks["keep"]
    differ = int((np.sort(keep.numpy(), 1) != np.sort(theirs["keep"], 1)).any(1).sum())
    if differ:
        keep = torch.from_numpy(theirs["keep"]).long()
    ours = _our_side(cfg, task, wave, masks["mask"], keep)

    def diff(a, b) -> float:
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        assert a.shape == b.shape, (a.shape, b.shape)
        return float(np.abs(a - b).max())

    grads = {k[len("grad:"):]: theirs[k] for k in theirs.files if k.startswith("grad:")}
    assert grads.keys() == ours["grads"].keys()
    return {
        "report": report, "loss": (ours["loss"], report["loss"]), "rows_kept_differently": differ,
        "sample_size": (ours["sample_size"], report["sample_size"]),
        "masked_pct": (ours["masked_pct"], report["masked_pct"]),
        "variances": max(abs(ours[k] - report[k]) for k in ("target_var", "pred_var")),
        "loss_rel": abs(ours["loss"] - report["loss"]) / abs(report["loss"]),
        "loss_per_frame": abs(ours["loss"] / ours["sample_size"] - report["loss_per_frame"]),
        "target": diff(ours["target"], theirs["target"]), "pred": diff(ours["pred"], theirs["pred"]),
        "target_scale": float(np.abs(theirs["target"]).max()), "pred_scale": float(np.abs(theirs["pred"]).max()),
        "grad": max(diff(ours["grads"][k], g) / max(float(np.abs(g).max()), 1e-12) for k, g in grads.items()),
        "features": diff(ours["features"], np.load(tmp_path / "fs" / "features.npy")),
        "fine_tuning_features": diff(ours["features"], np.load(tmp_path / "fs" / "fine_tuning_features.npy")),
    } | ({} if made else {"ctc": diff(torch.nn.functional.linear(ours["features"], *proj),
                                       np.load(tmp_path / "fs" / "ctc.npy"))})


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FAIRSEQ_PYTHON"),
                    reason="opt-in: set FAIRSEQ_PYTHON to a Python with fairseq's main branch (data2vec 2.0 is not in "
                           "0.12.2), importable or in the source tree FAIRSEQ_ROOT")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fairseq_computes_what_we_compute(variant, tmp_path):
    changes, full_lengths = VARIANTS[variant]
    d = compare_with_fairseq(tmp_path, tiny(**changes), os.environ["FAIRSEQ_PYTHON"], full_lengths)
    r = d["report"]
    assert r["model_class"] == "Data2VecMultiModel" and r["ctc_vocabulary"] == len(SYMBOLS)
    assert not r["teacher_missing"] and not r["teacher_unexpected"] and r["teacher_max_diff"] == 0
    assert d["sample_size"][0] == d["sample_size"][1] and d["masked_pct"][0] == pytest.approx(d["masked_pct"][1])
    assert d["loss_rel"] < 1e-5 and d["loss_per_frame"] < 1e-5 and d["variances"] < 1e-5
    assert d["target"] < 1e-4 and d["pred"] < 1e-4 and d["features"] < 1e-4 and d["ctc"] < 1e-4
    assert d["fine_tuning_features"] < 1e-4 and r["fine_tuning_class"] == "Data2VecMultiModel"
    assert d["grad"] < 1e-3  # relative to each tensor's largest gradient
    assert (d["rows_kept_differently"] > 0) == (variant == "cropped")


#: fairseq's base audio recipe at the tiny preset's sizes (with a prenet block), deterministic
TINY_RECIPE = {
    "depth": 2, "embed_dim": 64, "num_heads": 4, "clone_batch": 4, "average_top_k_layers": 2, "layerdrop": 0.0,
    "encoder_dropout": 0.0, "post_mlp_drop": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
    "modalities": {"audio": {
        "feature_encoder_spec": "[(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2", "conv_pos_width": 10,
        "conv_pos_depth": 2, "conv_pos_groups": 4, "prenet_depth": 1, "prenet_layerdrop": 0.0, "prenet_dropout": 0.0,
        "mask_noise_std": 0.0, "decoder": {"input_dropout": 0.0, "decoder_dim": 64, "decoder_groups": 4,
                                           "decoder_layers": 2}}},
}


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FAIRSEQ_PYTHON"), reason="opt-in: see test_fairseq_computes_what_we_compute")
def test_a_file_fairseq_wrote_computes_the_same_here(tmp_path):
    d = compare_with_fairseq(tmp_path, tiny(prenet_depth=1), os.environ["FAIRSEQ_PYTHON"], made=TINY_RECIPE)
    assert d["sample_size"][0] == d["sample_size"][1] and d["rows_kept_differently"] == 0
    assert d["loss_rel"] < 1e-5 and d["target"] < 1e-4 and d["pred"] < 1e-4 and d["features"] < 1e-4
    assert d["fine_tuning_features"] < 1e-4 and d["grad"] < 1e-3
