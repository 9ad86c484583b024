"""Conversion between our state dicts/configs and Hugging Face transformers' wav2vec2 / data2vec-audio."""

from __future__ import annotations

import re

import torch

from pretrain.config import ModelConfig
from pretrain.interop.keymap import rename_from, split_qkv

# (our key pattern, HF key template) for keys that map one to one; `{p}` is the HF model prefix.
_RENAMES = [
    (r"mask_emb", "{p}masked_spec_embed"),
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)", "{p}feature_extractor.conv_layers.{0}.conv.{1}"),
    (r"feature_extractor\.conv_layers\.(\d+)\.norm\.(weight|bias)", "{p}feature_extractor.conv_layers.{0}.layer_norm.{1}"),
    (r"layer_norm\.(weight|bias)", "{p}feature_projection.layer_norm.{0}"),
    (r"post_extract_proj\.(weight|bias)", "{p}feature_projection.projection.{0}"),
    (r"encoder\.pos_conv\.conv\.bias", "{p}encoder.pos_conv_embed.conv.bias"),
    (r"encoder\.pos_conv\.conv\.parametrizations\.weight\.original([01])", "{p}encoder.pos_conv_embed.conv.parametrizations.weight.original{0}"),
    (r"encoder\.pos_conv\.layers\.(\d+)\.conv\.(weight|bias)", "{p}encoder.pos_conv_embed.layers.{0}.conv.{1}"),
    (r"encoder\.layer_norm\.(weight|bias)", "{p}encoder.layer_norm.{0}"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", "{p}encoder.layers.{0}.attention.out_proj.{1}"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", "{p}encoder.layers.{0}.layer_norm.{1}"),
    (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)", "{p}encoder.layers.{0}.feed_forward.intermediate_dense.{1}"),
    (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)", "{p}encoder.layers.{0}.feed_forward.output_dense.{1}"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", "{p}encoder.layers.{0}.final_layer_norm.{1}"),
    (r"quantizer\.vars", "quantizer.codevectors"),
    (r"quantizer\.weight_proj\.(weight|bias)", "quantizer.weight_proj.{0}"),
    (r"final_proj\.(weight|bias)", "project_hid.{0}"),
    (r"project_q\.(weight|bias)", "project_q.{0}"),
]
_HF_QKV = re.compile(r"(?:.*\.)?encoder\.layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)")


def to_hf(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Our state dict -> HF keys; `prefix` is "wav2vec2." for `Wav2Vec2ForPreTraining`, "" for base models."""
    out: dict[str, torch.Tensor] = {}
    if "post_extract_proj.weight" not in state and "layer_norm.weight" in state:
        # fairseq skips the projection when conv and encoder widths agree; transformers always has one
        dim = state["layer_norm.weight"].shape[0]
        out[f"{prefix}feature_projection.projection.weight"] = torch.eye(dim)
        out[f"{prefix}feature_projection.projection.bias"] = torch.zeros(dim)
    for key, value in state.items():
        split = split_qkv(key, value, prefix + "encoder.layers.{layer}.attention.{name}_proj.{kind}")
        if split:
            out.update(split)
            continue
        for pattern, template in _RENAMES:
            m = re.fullmatch(pattern, key)
            if m:
                out[template.format(*m.groups(), p=prefix)] = value
                break
        else:
            raise KeyError(f"no transformers name for parameter {key!r}")
    return out


def from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF keys (any prefix; legacy weight_g/weight_v accepted) -> our state dict. Unknown keys raise.

    An identity feature projection (what `to_hf` writes for equal widths) is dropped.
    """
    inverse = []
    for pattern, template in _RENAMES:
        pieces = re.split(r"(\{p\}|\{\d\})", template)
        regex = "".join(
            r"(?:[a-z0-9_]+\.)?" if x == "{p}" else r"([^.]+)" if re.fullmatch(r"\{\d\}", x) else re.escape(x)
            for x in pieces
        )
        ours = re.sub(r"\([^)]*\)", "{}", pattern).replace("\\.", ".")
        inverse.append((re.compile(regex), ours))
    legacy = {"pos_conv_embed.conv.weight_g": "pos_conv_embed.conv.parametrizations.weight.original0",
              "pos_conv_embed.conv.weight_v": "pos_conv_embed.conv.parametrizations.weight.original1"}
    renamed = {}
    for key, value in state.items():
        for old, new in legacy.items():
            key = key.replace(old, new)
        renamed[key] = value
    out = rename_from(renamed, inverse, _HF_QKV, "transformers")
    w = out.get("post_extract_proj.weight")
    if w is not None and w.shape[0] == w.shape[1] and torch.equal(w, torch.eye(w.shape[0], dtype=w.dtype)):
        if not out["post_extract_proj.bias"].any():
            del out["post_extract_proj.weight"], out["post_extract_proj.bias"]
    return out


def hf_config(cfg: ModelConfig, normalize: bool) -> dict:
    """A transformers `Wav2Vec2Config` / `Data2VecAudioConfig` dict for this architecture."""
    dims, kernels, strides = zip(*[tuple(x) for x in cfg.conv_feature_layers])
    common = dict(
        hidden_size=cfg.encoder_embed_dim,
        num_hidden_layers=cfg.encoder_layers,
        num_attention_heads=cfg.encoder_attention_heads,
        intermediate_size=cfg.encoder_ffn_embed_dim,
        hidden_act="gelu",
        hidden_dropout=cfg.dropout,
        activation_dropout=cfg.activation_dropout,
        attention_dropout=cfg.attention_dropout,
        feat_proj_dropout=cfg.dropout_input,
        layerdrop=cfg.encoder_layerdrop,
        layer_norm_eps=1e-5,
        feat_extract_activation="gelu",
        conv_dim=list(dims),
        conv_kernel=list(kernels),
        conv_stride=list(strides),
        conv_bias=cfg.conv_bias,
        num_conv_pos_embedding_groups=cfg.conv_pos_groups,
        apply_spec_augment=True,
        mask_time_prob=cfg.mask_prob,
        mask_time_length=cfg.mask_length,
        mask_time_min_masks=cfg.mask_min_masks,
        vocab_size=32,
    )
    if cfg.arch == "data2vec":
        return dict(
            common,
            model_type="data2vec-audio",
            architectures=["Data2VecAudioModel"],
            num_conv_pos_embeddings=cfg.pos_conv_depth,
            conv_pos_kernel_size=max(3, cfg.conv_pos // cfg.pos_conv_depth),
        )
    return dict(
        common,
        model_type="wav2vec2",
        architectures=["Wav2Vec2ForPreTraining"],
        feat_extract_norm="layer" if cfg.extractor_mode == "layer_norm" else "group",
        num_conv_pos_embeddings=cfg.conv_pos,
        do_stable_layer_norm=cfg.layer_norm_first,
        feat_quantizer_dropout=cfg.dropout_features,
        num_codevectors_per_group=cfg.latent_vars,
        num_codevector_groups=cfg.latent_groups,
        codevector_dim=cfg.latent_dim or cfg.final_dim,
        proj_codevector_dim=cfg.final_dim,
        contrastive_logits_temperature=cfg.logit_temp,
        num_negatives=cfg.num_negatives,
        diversity_loss_weight=cfg.diversity_weight,
    )


def model_config_from_hf(hf: dict) -> ModelConfig:
    """Our ModelConfig from a transformers config.json dict (wav2vec2 or data2vec-audio)."""
    cfg = ModelConfig()
    cfg.conv_feature_layers = [list(x) for x in zip(hf["conv_dim"], hf["conv_kernel"], hf["conv_stride"])]
    cfg.conv_bias = bool(hf.get("conv_bias", False))
    cfg.encoder_layers = hf["num_hidden_layers"]
    cfg.encoder_embed_dim = hf["hidden_size"]
    cfg.encoder_ffn_embed_dim = hf["intermediate_size"]
    cfg.encoder_attention_heads = hf["num_attention_heads"]
    cfg.conv_pos_groups = hf.get("num_conv_pos_embedding_groups", 16)
    cfg.mask_prob = hf.get("mask_time_prob", cfg.mask_prob)
    cfg.mask_length = hf.get("mask_time_length", cfg.mask_length)
    if hf.get("model_type") == "data2vec-audio":
        cfg.arch, cfg.extractor_mode = "data2vec", "layer_norm"
        cfg.pos_conv_depth = hf["num_conv_pos_embeddings"]
        cfg.conv_pos = hf.get("conv_pos_kernel_size", 19) * cfg.pos_conv_depth
        return cfg
    if hf.get("model_type") not in (None, "wav2vec2"):
        raise ValueError(f"cannot start from a transformers {hf.get('model_type')!r} model; expected wav2vec2 or data2vec-audio")
    cfg.extractor_mode = "layer_norm" if hf.get("feat_extract_norm") == "layer" else "default"
    cfg.layer_norm_first = bool(hf.get("do_stable_layer_norm", False))
    cfg.conv_pos = hf["num_conv_pos_embeddings"]
    cfg.latent_vars = hf.get("num_codevectors_per_group", 320)
    cfg.latent_groups = hf.get("num_codevector_groups", 2)
    cfg.final_dim = hf.get("proj_codevector_dim", 256)
    cfg.latent_dim = 0 if hf.get("codevector_dim", cfg.final_dim) == cfg.final_dim else hf["codevector_dim"]
    cfg.logit_temp = hf.get("contrastive_logits_temperature", 0.1)
    cfg.num_negatives = hf.get("num_negatives", 100)
    return cfg
