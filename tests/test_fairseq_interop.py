"""fairseq checkpoints in and out: files built from transformers' weights with the key mapping of
transformers' own fairseq converter (restated here, independently of ours), in both config styles
(a `cfg` dict and an old argparse `Namespace`), give transformers' outputs once read by us."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from finetune.inference import load_ctc  # noqa: E402
from pretrain.build import build_task  # noqa: E402
from pretrain.extract import encode  # noqa: E402
from pretrain.interop.fairseq import read_fairseq  # noqa: E402
from pretrain.interop.hf import hf_config  # noqa: E402
from pretrain.presets import get_preset  # noqa: E402

SYMBOLS = ["<s>", "<pad>", "</s>", "<unk>", "|", "E", "T", "A", "O", "N", "I", "H", "S", "R", "D", "L", "U", "'"]

# fairseq name -> transformers name, from transformers' convert_wav2vec2_original_pytorch_checkpoint_to_pytorch.py
# (and the data2vec one); `*` is a layer index
_FS_TO_HF = [
    ("mask_emb", "masked_spec_embed"),
    ("feature_extractor.conv_layers.*.0.", "feature_extractor.conv_layers.*.conv."),
    ("feature_extractor.conv_layers.0.2.", "feature_extractor.conv_layers.0.layer_norm."),  # group norm
    ("feature_extractor.conv_layers.*.2.1.", "feature_extractor.conv_layers.*.layer_norm."),  # layer norm mode
    ("post_extract_proj.", "feature_projection.projection."),
    ("layer_norm.", "feature_projection.layer_norm."),
    ("encoder.pos_conv.0.weight_g", "encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    ("encoder.pos_conv.0.weight_v", "encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
    ("encoder.pos_conv.0.bias", "encoder.pos_conv_embed.conv.bias"),
    ("encoder.pos_conv.*.0.", "encoder.pos_conv_embed.layers.*.conv."),
    ("encoder.layer_norm.", "encoder.layer_norm."),
    ("encoder.layers.*.self_attn.", "encoder.layers.*.attention."),
    ("encoder.layers.*.self_attn_layer_norm.", "encoder.layers.*.layer_norm."),
    ("encoder.layers.*.fc1.", "encoder.layers.*.feed_forward.intermediate_dense."),
    ("encoder.layers.*.fc2.", "encoder.layers.*.feed_forward.output_dense."),
    ("encoder.layers.*.final_layer_norm.", "encoder.layers.*.final_layer_norm."),
    ("quantizer.vars", "quantizer.codevectors"),
    ("quantizer.weight_proj.", "quantizer.weight_proj."),
    ("project_q.", "project_q."),
    ("final_proj.", "project_hid."),
]


def equal_widths_without_projection(model, base) -> None:
    """fairseq's wav2vec2 has no `post_extract_proj` when the conv and encoder widths agree; make
    transformers' (always present) projection the identity so that both compute the same."""
    proj = base.feature_projection.projection
    if proj.weight.shape[0] == proj.weight.shape[1]:
        with torch.no_grad():
            proj.weight.copy_(torch.eye(proj.weight.shape[0]))
            proj.bias.zero_()


def to_fairseq(hf_state: dict, prefix: str, group_norm: bool, fs_prefix: str = "", wav2vec2: bool = True) -> dict:
    out = {}
    for key, value in hf_state.items():
        if key.startswith("lm_head."):
            out["w2v_encoder.proj." + key[len("lm_head."):]] = value
            continue
        inner = key[len(prefix):] if key.startswith(prefix) else key
        for fs, hf in _FS_TO_HF:
            if (fs == "feature_extractor.conv_layers.0.2.") != group_norm and "conv_layers" in fs and ".2." in fs:
                continue  # the norm's place depends on the extractor mode
            pattern = re.escape(hf).replace(r"\*", r"(\d+)")
            m = re.match(pattern, inner)
            if m:
                name = fs.replace("*", m.group(1)) if m.groups() else fs
                out[fs_prefix + name + inner[m.end():]] = value.clone()
                break
        else:
            raise KeyError(key)
    w = out.get(fs_prefix + "post_extract_proj.weight")
    if wav2vec2 and w is not None and w.shape[0] == w.shape[1]:
        del out[fs_prefix + "post_extract_proj.weight"], out[fs_prefix + "post_extract_proj.bias"]
    return out


def fairseq_model_fields(hf: dict, name: str) -> dict:
    """The fairseq config section of a transformers config (the fields that decide the architecture)."""
    conv = " + ".join(f"[({d}, {k}, {s})]" for d, k, s in zip(hf["conv_dim"], hf["conv_kernel"], hf["conv_stride"]))
    fields = dict(_name=name, extractor_mode="layer_norm" if hf.get("feat_extract_norm") == "layer" or name == "data2vec_audio"
                  else "default", conv_feature_layers=conv, conv_bias=hf["conv_bias"], encoder_layers=hf["num_hidden_layers"],
                  encoder_embed_dim=hf["hidden_size"], encoder_ffn_embed_dim=hf["intermediate_size"],
                  encoder_attention_heads=hf["num_attention_heads"], layer_norm_first=hf.get("do_stable_layer_norm", False),
                  conv_pos_groups=hf["num_conv_pos_embedding_groups"])
    if name == "data2vec_audio":
        fields.update(pos_conv_depth=hf["num_conv_pos_embeddings"], conv_pos=hf["conv_pos_kernel_size"] * hf["num_conv_pos_embeddings"])
    else:
        fields.update(conv_pos=hf["num_conv_pos_embeddings"], quantize_targets=True, latent_vars=hf["num_codevectors_per_group"],
                      latent_groups=hf["num_codevector_groups"], final_dim=hf["proj_codevector_dim"])
    return fields


def save_fairseq(path: Path, model_section: dict, weights: dict, style: str, task: dict) -> Path:
    history = [{"criterion_name": "x", "optimizer_name": "Adam", "lr_scheduler_state": {}, "num_updates": 5}]
    if style == "cfg":
        state = {"args": None, "cfg": {"model": model_section, "task": task}}
    else:  # fairseq <= 0.10: one flat Namespace, numbers and tuples as strings where argparse kept them
        flat = {k: (str(v) if isinstance(v, (list, tuple)) else v) for k, v in model_section.items() if k != "_name"}
        if isinstance(flat.get("w2v_args"), dict):
            inner = flat["w2v_args"]
            flat["w2v_args"] = argparse.Namespace(arch=inner["model"]["_name"], task=inner["task"]["_name"],
                                                  **{k: v for k, v in inner["model"].items() if k != "_name"},
                                                  normalize=inner["task"]["normalize"])
        flat.update({k: v for k, v in task.items() if k != "_name"})
        state = {"args": argparse.Namespace(arch=model_section["_name"], task=task["_name"], **flat), "cfg": None}
    state.update(model=weights, optimizer_history=history, extra_state={})
    torch.save(state, path)
    return path


def wave(seconds: float = 1.3, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(16_000 * seconds)) * 0.1).astype(np.float32)


@pytest.mark.parametrize("style", ["cfg", "args"])
@pytest.mark.parametrize("preset", ["wav2vec2_tiny", "data2vec_tiny"])
def test_pretrained_fairseq_file_gives_transformers_features(preset, style, tmp_path):
    torch.manual_seed(0)
    hf = hf_config(get_preset(preset).model, False)
    if preset == "wav2vec2_tiny":
        model = transformers.Wav2Vec2ForPreTraining(transformers.Wav2Vec2Config(**hf)).eval()
        base, prefix, name = model.wav2vec2, "wav2vec2.", "wav2vec2"
    else:
        model = transformers.Data2VecAudioModel(transformers.Data2VecAudioConfig(**hf)).eval()
        base, prefix, name = model, "", "data2vec_audio"
    if name == "wav2vec2":
        equal_widths_without_projection(model, base)
    weights = to_fairseq(model.state_dict(), prefix, group_norm=hf.get("feat_extract_norm") == "group",
                         wav2vec2=name == "wav2vec2")
    if name == "data2vec_audio":  # the released files' head name, and the EMA teacher fairseq requires
        dim = hf["hidden_size"]
        weights.update({"final_proj.0.weight": torch.randn(dim, dim), "final_proj.0.bias": torch.zeros(dim), "_ema": {}})
    task = {"_name": "audio_pretraining", "normalize": name == "data2vec_audio", "data": "/nowhere"}
    path = save_fairseq(tmp_path / "model.pt", fairseq_model_fields(hf, name), weights, style, task)

    theirs = read_fairseq(path)
    assert theirs.kind == "pretrain" and theirs.num_updates == 5 and theirs.normalize == (name == "data2vec_audio")
    task = build_task(theirs.model)
    task.model.load_state_dict(theirs.weights)  # strict: every tensor used, none missing
    x = wave()
    with torch.no_grad():
        expected = base(torch.from_numpy(x)[None]).last_hidden_state[0].numpy()
    got = encode(task.model.eval(), x, torch.device("cpu"))
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("style", ["cfg", "args"])
@pytest.mark.parametrize("preset", ["wav2vec2_tiny", "data2vec_tiny"])
def test_ctc_fairseq_file_gives_transformers_logits(preset, style, tmp_path):
    torch.manual_seed(1)
    hf = dict(hf_config(get_preset(preset).model, False), vocab_size=len(SYMBOLS))
    if preset == "wav2vec2_tiny":
        model = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**hf)).eval()
        prefix, name = "wav2vec2.", "wav2vec2"
    else:
        model = transformers.Data2VecAudioForCTC(transformers.Data2VecAudioConfig(**hf)).eval()
        prefix, name = "data2vec_audio.", "data2vec_audio"
    if name == "wav2vec2":
        equal_widths_without_projection(model, model.wav2vec2)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith((prefix + "masked_spec_embed",))}
    weights = to_fairseq(state, prefix, group_norm=hf.get("feat_extract_norm") == "group",
                         fs_prefix="w2v_encoder.w2v_model.", wav2vec2=name == "wav2vec2")
    weights = {k.replace("w2v_encoder.w2v_model.w2v_encoder.proj", "w2v_encoder.proj"): v for k, v in weights.items()}
    weights["w2v_encoder.w2v_model.mask_emb"] = model.state_dict()[prefix + "masked_spec_embed"]
    inner = {"model": fairseq_model_fields(hf, name), "task": {"_name": "audio_pretraining", "normalize": False}}
    section = {"_name": "wav2vec_ctc", "normalize": False, "w2v_args": inner, "final_dropout": 0.0}
    task = {"_name": "audio_finetuning", "labels": "ltr", "normalize": False, "data": "/nowhere"}
    path = save_fairseq(tmp_path / "ctc.pt", section, weights, style, task)
    (tmp_path / "dict.ltr.txt").write_text("".join(f"{s} {10 - i}\n" for i, s in enumerate(SYMBOLS[4:])))

    cfg, ours, dictionary, _ = load_ctc(path)
    assert dictionary.symbols == SYMBOLS and cfg.model.arch == ("data2vec" if name == "data2vec_audio" else "wav2vec2")
    x = wave(seed=2)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)[None]).logits[0].numpy()
        got = ours(torch.from_numpy(x)[None])[0][0].numpy()
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)


def test_vocabulary_from_a_pickled_fairseq_dictionary_or_dict_option(tmp_path, monkeypatch):
    """Files saved by fairseq's trainer pickle a `fairseq.data.dictionary.Dictionary` in `task_state`."""
    hf = dict(hf_config(get_preset("wav2vec2_tiny").model, False), vocab_size=len(SYMBOLS))
    model = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**hf)).eval()
    equal_widths_without_projection(model, model.wav2vec2)
    weights = to_fairseq(model.state_dict(), "wav2vec2.", True, fs_prefix="w2v_encoder.w2v_model.")
    weights = {k.replace("w2v_encoder.w2v_model.w2v_encoder.proj", "w2v_encoder.proj"): v for k, v in weights.items()}
    weights["w2v_encoder.w2v_model.mask_emb"] = weights.pop("w2v_encoder.w2v_model.mask_emb")
    module = types.ModuleType("fairseq.data.dictionary")

    class Dictionary:  # what fairseq pickles: plain attributes
        def __init__(self, symbols):
            self.symbols, self.count, self.indices = list(symbols), [1] * len(symbols), {s: i for i, s in enumerate(symbols)}

    Dictionary.__module__, Dictionary.__qualname__ = module.__name__, "Dictionary"
    module.Dictionary = Dictionary
    for name in ("fairseq", "fairseq.data", "fairseq.data.dictionary"):
        monkeypatch.setitem(sys.modules, name, module if name.endswith("dictionary") else types.ModuleType(name))
    inner = {"model": fairseq_model_fields(hf, "wav2vec2"), "task": {"_name": "audio_pretraining", "normalize": False}}
    state = {"args": None, "cfg": {"model": {"_name": "wav2vec_ctc", "normalize": False, "w2v_args": inner},
                                   "task": {"_name": "audio_finetuning", "labels": "ltr"}},
             "model": weights, "optimizer_history": [{"num_updates": 3}], "extra_state": {},
             "task_state": {"target_dictionary": Dictionary(SYMBOLS)}}
    path = tmp_path / "trained" / "checkpoint_best.pt"
    path.parent.mkdir()
    torch.save(state, path)
    for name in ("fairseq", "fairseq.data", "fairseq.data.dictionary"):
        monkeypatch.delitem(sys.modules, name)  # read it as a user without fairseq would
    assert read_fairseq(path).symbols == SYMBOLS
    other = SYMBOLS[:4] + SYMBOLS[5:] + ["|"]
    (tmp_path / "mine.txt").write_text("".join(f"{s} 1\n" for s in other[4:]))
    assert read_fairseq(path, tmp_path / "mine.txt").symbols == other  # --dict wins over what the file holds
    (tmp_path / "short.txt").write_text("A 1\n")
    with pytest.raises(ValueError, match="--dict"):
        read_fairseq(path, tmp_path / "short.txt")


@pytest.mark.parametrize("name, what", [("hubert", "HuBERT"), ("wav2vec_seq2seq", "seq2seq"), ("wav2vec", "wav2vec 1.0"),
                                        ("data2vec_multi", "data2vec 2.0"), ("transformer", "'transformer'")])
def test_other_fairseq_models_are_refused_by_name(name, what, tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"cfg": {"model": {"_name": name}, "task": {"_name": "x"}}, "model": {"a": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match=re.escape(what)):
        read_fairseq(path)
    proc = subprocess.run([sys.executable, "-m", "finetune.transcribe", str(path), str(path)], capture_output=True, text=True)
    assert proc.returncode != 0 and what in proc.stderr and "Traceback" not in proc.stderr


def test_unsupported_variants_of_wav2vec2_are_refused(tmp_path):
    path = tmp_path / "x.pt"
    for extra, said in (({"layer_type": "conformer"}, "conformer"), ({"quantize_targets": False}, "quantize_targets")):
        section = dict({"_name": "wav2vec2", "quantize_targets": True}, **extra)
        torch.save({"cfg": {"model": section, "task": {"_name": "audio_pretraining"}}, "model": {}}, path)
        with pytest.raises(ValueError, match=said):
            read_fairseq(path)
