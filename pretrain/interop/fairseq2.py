"""Export to fairseq2 0.8 (`wav2vec2` and `wav2vec2_asr` families): native key names and an asset card.

fairseq2 loads strictly, so exactly the keys it expects are written: the positional conv as legacy
weight norm (`weight_g`, `weight_v`), `quantizer.num_updates`, and (as in fairseq) no feature
projection when conv and model widths agree. fairseq2 has no data2vec model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from data_prep.fsutil import atomic_write_text
from pretrain.config import ModelConfig
from pretrain.interop.keymap import QKV_KEY

_RENAMES = [
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)", "encoder_frontend.feature_extractor.layers.{0}.conv.{1}"),
    (r"layer_norm\.(weight|bias)", "encoder_frontend.post_extract_layer_norm.{0}"),
    (r"post_extract_proj\.(weight|bias)", "encoder_frontend.model_dim_proj.{0}"),
    (r"encoder\.pos_conv\.conv\.bias", "encoder_frontend.pos_encoder.conv.bias"),
    (r"encoder\.pos_conv\.conv\.parametrizations\.weight\.original0", "encoder_frontend.pos_encoder.conv.weight_g"),
    (r"encoder\.pos_conv\.conv\.parametrizations\.weight\.original1", "encoder_frontend.pos_encoder.conv.weight_v"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", "encoder.layers.{0}.self_attn.output_proj.{1}"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", "encoder.layers.{0}.self_attn_layer_norm.{1}"),
    (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)", "encoder.layers.{0}.ffn.inner_proj.{1}"),
    (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)", "encoder.layers.{0}.ffn.output_proj.{1}"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", "encoder.layers.{0}.ffn_layer_norm.{1}"),
    (r"mask_emb", "masker.temporal_mask_embed"),
    (r"quantizer\.vars", "quantizer.entries"),
    (r"quantizer\.weight_proj\.(weight|bias)", "quantizer.entry_proj.{0}"),
    (r"project_q\.(weight|bias)", "final_target_proj.{0}"),
    (r"final_proj\.(weight|bias)", "final_proj.{0}"),
]
_NORM = re.compile(r"feature_extractor\.conv_layers\.(\d+)\.norm\.(weight|bias)")


def to_fairseq2(state: dict[str, torch.Tensor], cfg: ModelConfig, num_updates: int | None = None) -> dict[str, torch.Tensor]:
    """Our `Wav2Vec2Model` state dict -> fairseq2 names. `num_updates` adds the quantizer's counter."""
    if cfg.arch != "wav2vec2":
        raise ValueError("fairseq2 0.8 has no data2vec model; export data2vec runs with --format hf")
    norm_kind = "layer_norm" if cfg.extractor_mode == "layer_norm" else "group_norm"
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if m := QKV_KEY.fullmatch(key):
            layer, kind = m.groups()
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"encoder.layers.{layer}.self_attn.{name}_proj.{kind}"] = part.clone()
            continue
        if m := _NORM.fullmatch(key):
            out[f"encoder_frontend.feature_extractor.layers.{m.group(1)}.{norm_kind}.{m.group(2)}"] = value
            continue
        if key.startswith("encoder.layer_norm."):
            # post-LN normalises the encoder input (frontend); pre-LN the encoder output
            where = "encoder" if cfg.layer_norm_first else "encoder_frontend"
            out[f"{where}.layer_norm.{key.rsplit('.', 1)[1]}"] = value
            continue
        for pattern, template in _RENAMES:
            if m := re.fullmatch(pattern, key):
                out[template.format(*m.groups())] = value
                break
        else:
            raise KeyError(f"no fairseq2 name for parameter {key!r}")
    if num_updates is not None and "quantizer.entries" in out:
        out["quantizer.num_updates"] = torch.tensor(num_updates, dtype=torch.int64)
    return out


def encoder_config(cfg: ModelConfig) -> dict:
    """fairseq2 `Wav2Vec2EncoderConfig` overrides describing our architecture."""
    config = {
        "model_dim": cfg.encoder_embed_dim,
        "feature_dim": cfg.conv_feature_layers[-1][0],
        "first_pass_dropout_p": cfg.dropout_input,
        "layer_norm_features": not cfg.layer_norm_first,
        "feature_extractor_layer_descs": [list(x) for x in cfg.conv_feature_layers],
        "feature_extractor_bias": cfg.conv_bias,
        "feature_extractor_layer_norm_convs": cfg.extractor_mode == "layer_norm",
        "feature_grad_scale": cfg.feature_grad_mult,
        "pos_encoder_type": "conv",
        "pos_encoder_depth": 1,
        "pos_conv_kernel_size": cfg.conv_pos,
        "num_pos_conv_groups": cfg.conv_pos_groups,
        "num_encoder_layers": cfg.encoder_layers,
        "num_encoder_attn_heads": cfg.encoder_attention_heads,
        "ffn_inner_dim": cfg.encoder_ffn_embed_dim,
        "dropout_p": cfg.dropout,
        "attn_dropout_p": cfg.attention_dropout,
        "ffn_inner_dropout_p": cfg.activation_dropout,
        "layer_drop_p": cfg.encoder_layerdrop,
        "norm_order": "PRE" if cfg.layer_norm_first else "POST",
    }
    if not 0.0 < cfg.feature_grad_mult <= 1.0:
        # fairseq2 accepts (0, 1]; a frozen extractor (0 when fine-tuning) keeps the arch's default
        del config["feature_grad_scale"]
    return config


def model_config(cfg: ModelConfig, vocab_size: int | None = None, final_dropout: float = 0.0) -> dict:
    """`Wav2Vec2Config` (pretraining) or `Wav2Vec2AsrConfig` (with `vocab_size`) overrides."""
    common = {"encoder_config": encoder_config(cfg), "temporal_mask_span_len": cfg.mask_length,
              "max_temporal_mask_prob": cfg.mask_prob, "min_num_temporal_mask_spans": cfg.mask_min_masks}
    if vocab_size is not None:
        return {**common, "target_vocab_size": vocab_size, "final_dropout_p": final_dropout}
    return {
        **common,
        "final_dim": cfg.final_dim,
        "quantized_dim": cfg.latent_dim or cfg.final_dim,
        "num_codebooks": cfg.latent_groups,
        "num_codebook_entries": cfg.latent_vars,
        "codebook_sampling_temperature": list(cfg.latent_temp),
        "num_distractors": cfg.num_negatives,
        "logit_temp": cfg.logit_temp,
    }


def export_fairseq2(state: dict[str, torch.Tensor], cfg: ModelConfig, out: Path, name: str,
                    vocab_size: int | None = None, step: int = 0, final_dropout: float = 0.0) -> Path:
    """Write `out/model.pt` ({"model": state dict}) and the asset card `out/<name>.yaml`.

    `state` is a pretraining model's, or a CTC model's (`w2v.*` + `proj.*`) when `vocab_size` is given.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if vocab_size is None:
        weights = to_fairseq2(state, cfg, num_updates=step)
        family, arch = "wav2vec2", "base"
    else:
        encoder = {k[len("w2v."):]: v for k, v in state.items() if k.startswith("w2v.")}
        weights = to_fairseq2(encoder, cfg)
        weights["final_proj.weight"], weights["final_proj.bias"] = state["proj.weight"], state["proj.bias"]
        family, arch = "wav2vec2_asr", "base_10h"
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    tmp = out / ".model.pt.tmp"
    torch.save({"model": tensors}, tmp)
    tmp.replace(out / "model.pt")
    overrides = model_config(cfg, vocab_size, final_dropout)
    # JSON is valid YAML: the card needs no YAML writer
    card = "\n".join([
        f"name: {name}",
        f"model_family: {family}",
        f"model_arch: {arch}",
        f"model_config: {json.dumps(overrides)}",
        f"checkpoint: {json.dumps((out / 'model.pt').resolve().as_uri())}",
    ]) + "\n"
    card_path = out / f"{name}.yaml"
    atomic_write_text(card_path, card)
    return card_path
