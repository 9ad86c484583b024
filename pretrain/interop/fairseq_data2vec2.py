"""fairseq data2vec 2.0 (`Data2VecMultiModel`, `_name` data2vec_multi) for audio, in both directions.

fairseq keeps the audio front end, positional convolution, ALiBi scales and prenet under
`modality_encoders.AUDIO.` and the main blocks at the top level; our `encoder.layers` are its
`context_encoder.blocks` (the first `prenet_depth`) followed by its `blocks`. Its teacher, `_ema`,
is a whole model without CNN, projection and decoder, so its names are the student's; ours is
`model.encoder`. Only the audio models of the released recipes are read: what would change the
forward pass (per-layer ALiBi scales, extra tokens, other target normalisations, ...) is refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pretrain.config import ModelConfig
from pretrain.interop.keymap import eval_conv

AUDIO = "modality_encoders.AUDIO."
_BLOCK_PARTS = {"self_attn.qkv_proj": "attn.qkv", "self_attn.out_proj": "attn.proj", "self_attn_layer_norm": "norm1",
                "fc1": "mlp.fc1", "fc2": "mlp.fc2", "final_layer_norm": "norm2"}
# (our name, fairseq name, offset added to {i} going to fairseq); {i} an index, {k} weight|bias
_RULES = [
    ("feature_extractor.conv_layers.{i}.conv.{k}", AUDIO + "local_encoder.conv_layers.{i}.0.{k}", 0),
    ("feature_extractor.conv_layers.{i}.norm.{k}", AUDIO + "local_encoder.conv_layers.{i}.2.1.{k}", 0),
    ("layer_norm.{k}", AUDIO + "project_features.1.{k}", 0),
    ("post_extract_proj.{k}", AUDIO + "project_features.2.{k}", 0),
    ("encoder.pos_conv.layers.{i}.conv.{k}", AUDIO + "relative_positional_encoder.{i}.0.{k}", 1),  # 0 is a transpose
    ("encoder.alibi_scale", AUDIO + "alibi_scale", 0),
    ("encoder.layer_norm.{k}", AUDIO + "context_encoder.norm.{k}", 0),
    ("decoder.blocks.{i}.conv.{k}", AUDIO + "decoder.blocks.{i}.0.{k}", 0),
    ("decoder.proj.{k}", AUDIO + "decoder.proj.{k}", 0),
]
# GroupNorm mode normalises the first conv only, and its Sequential has no transposes around it
_GROUP_NORM = ("feature_extractor.conv_layers.0.norm.{k}", AUDIO + "local_encoder.conv_layers.0.2.{k}", 0)
_OUR_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_THEIR_BLOCK = re.compile(re.escape(AUDIO) + r"context_encoder\.blocks\.(\d+)\.(.+)\.(weight|bias)"
                          r"|blocks\.(\d+)\.(.+)\.(weight|bias)")


def _regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{[ik]\})", template)
    fields = {"{i}": r"(?P<i>\d+)", "{k}": r"(?P<k>weight|bias)"}
    return re.compile("".join(fields.get(p, re.escape(p)) for p in parts))


_COMPILED = [(_regex(o), _regex(t), o, t, off) for o, t, off in [_GROUP_NORM] + _RULES]


def _rename(key: str, forward: bool, group_norm: bool = False) -> str | None:
    # going to fairseq, the first conv's norm takes the GroupNorm rule only in that mode; coming
    # back, the two fairseq layouts cannot be confused
    rules = _COMPILED if group_norm or not forward else _COMPILED[1:]
    for ours, theirs, o, t, offset in rules:
        m = (ours if forward else theirs).fullmatch(key)
        if m:
            g = m.groupdict()
            if g.get("i") is not None:
                g["i"] = int(g["i"]) + (offset if forward else -offset)
            return (t if forward else o).format(**g)
    return None


def to_fairseq_weights(state: dict[str, torch.Tensor], prenet_depth: int,
                       extractor_mode: str = "layer_norm") -> dict[str, torch.Tensor]:
    """Our `Data2Vec2Model` state (or any part of it, in model names) -> fairseq `Data2VecMultiModel` keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _OUR_BLOCK.fullmatch(key)
        if m and m[2] in _BLOCK_PARTS:
            i = int(m[1])
            where = f"{AUDIO}context_encoder.blocks.{i}" if i < prenet_depth else f"blocks.{i - prenet_depth}"
            out[f"{where}.{_BLOCK_PARTS[m[2]]}.{m[3]}"] = value
            continue
        name = _rename(key, True, extractor_mode == "default")
        if name is None:
            raise KeyError(f"no fairseq data2vec 2.0 name for parameter {key!r}")
        out[name] = value.reshape(1, 1, -1, 1, 1) if key == "encoder.alibi_scale" else value
    return out


def from_fairseq_weights(state: dict[str, torch.Tensor], prenet_depth: int, num_heads: int) -> dict[str, torch.Tensor]:
    """fairseq `Data2VecMultiModel` (audio) keys -> ours; a key we have no place for raises."""
    parts = {v: k for k, v in _BLOCK_PARTS.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        value = value.float() if value.is_floating_point() else value
        m = _THEIR_BLOCK.fullmatch(key)
        if m:
            prenet = m[1] is not None
            i, part, kind = (int(m[1]), m[2], m[3]) if prenet else (int(m[4]) + prenet_depth, m[5], m[6])
            if part in parts:
                out[f"encoder.layers.{i}.{parts[part]}.{kind}"] = value
                continue
        name = _rename(key, False)
        if name is None:
            raise KeyError(f"fairseq data2vec 2.0 parameter {key!r} has no counterpart in our model")
        if name == "encoder.alibi_scale":
            if value.numel() not in (1, num_heads):
                raise ValueError(f"alibi_scale of shape {tuple(value.shape)}: one scale per layer is not implemented")
            value = value.reshape(-1).expand(num_heads).clone()  # one shared scale becomes one per head
        out[name] = value
    return out


def teacher_to_fairseq(teacher: dict[str, torch.Tensor], prenet_depth: int) -> dict[str, torch.Tensor]:
    """Our teacher (a `Data2Vec2Encoder` state) -> fairseq's `_ema`."""
    return to_fairseq_weights({f"encoder.{k}": v for k, v in teacher.items()}, prenet_depth)


def teacher_from_fairseq(ema: dict[str, torch.Tensor], prenet_depth: int, num_heads: int) -> dict[str, torch.Tensor]:
    ours = from_fairseq_weights(ema, prenet_depth, num_heads)
    outside = [k for k in ours if not k.startswith("encoder.")]
    if outside:
        raise ValueError(f"the fairseq teacher (`_ema`) holds {outside[:3]}: a teacher with its own CNN "
                         "(ema_local_encoder) is not implemented")
    return {k[len("encoder."):]: v for k, v in ours.items()}


# ------------------------------------------------------------------------------------------ config

#: (our field, section of `Data2VecMultiConfig`: top / audio / decoder, its field, its default)
FIELDS = [
    ("encoder_layers", "top", "depth", 8), ("encoder_embed_dim", "top", "embed_dim", 768),
    ("encoder_attention_heads", "top", "num_heads", 12),
    # one dropout for fairseq's encoder_dropout, post_mlp_drop and prenet_dropout (equal in its recipes)
    ("dropout", "top", "encoder_dropout", 0.1), ("attention_dropout", "top", "attention_dropout", 0.1),
    ("activation_dropout", "top", "activation_dropout", 0.0), ("dropout_input", "top", "dropout_input", 0.0),
    ("encoder_layerdrop", "top", "layerdrop", 0.0), ("clone_batch", "top", "clone_batch", 1),
    ("average_top_k_layers", "top", "average_top_k_layers", 8),
    ("instance_norm_target_layer", "top", "instance_norm_target_layer", False), ("loss_beta", "top", "loss_beta", 0.0),
    ("ema_decay", "top", "ema_decay", 0.999), ("ema_end_decay", "top", "ema_end_decay", 0.9999),
    ("min_target_var", "top", "min_target_var", 0.1), ("min_pred_var", "top", "min_pred_var", 0.01),
    ("extractor_mode", "audio", "extractor_mode", "layer_norm"), ("feature_grad_mult", "audio", "local_grad_mult", 1.0),
    ("conv_pos", "audio", "conv_pos_width", 95), ("conv_pos_groups", "audio", "conv_pos_groups", 16),
    ("pos_conv_depth", "audio", "conv_pos_depth", 5), ("prenet_depth", "audio", "prenet_depth", 4),
    ("mask_prob", "audio", "mask_prob", 0.7), ("mask_prob_adjust", "audio", "mask_prob_adjust", 0.0),
    ("mask_length", "audio", "mask_length", 5), ("mask_noise_std", "audio", "mask_noise_std", 0.01),
    ("decoder_dim", "decoder", "decoder_dim", 384), ("decoder_kernel", "decoder", "decoder_kernel", 5),
    ("decoder_layers", "decoder", "decoder_layers", 5), ("decoder_groups", "decoder", "decoder_groups", 16),
    ("decoder_dropout", "decoder", "input_dropout", 0.1),
]
DEFAULT_SPEC = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]"

# (section, field, predicate saying the value is one we cannot reproduce, checked for pretraining only)
_UNSUPPORTED = [
    ("top", "layer_norm_first", bool, False), ("top", "end_of_block_targets", bool, True),
    ("top", "layer_norm_target_layer", bool, True), ("top", "batch_norm_target_layer", bool, True),
    ("top", "instance_norm_targets", bool, True), ("top", "layer_norm_targets", bool, True),
    ("top", "ema_encoder_only", bool, True), ("top", "shared_decoder", lambda v: v is not None, True),
    ("top", "cls_loss", bool, True), ("top", "recon_loss", bool, True), ("top", "d2v_loss", lambda v: v != 1, True),
    ("top", "start_drop_path_rate", bool, True), ("top", "end_drop_path_rate", bool, True),
    ("top", "norm_affine", lambda v: not v, False),
    ("audio", "use_alibi_encoder", lambda v: not v, False), ("audio", "learned_alibi", bool, False),
    ("audio", "learned_alibi_scale_per_layer", bool, False), ("audio", "num_extra_tokens", bool, False),
    ("audio", "conv_pos_pre_ln", bool, False), ("audio", "keep_masked_pct", bool, True),
    ("audio", "inverse_mask", bool, True), ("audio", "ema_local_encoder", bool, True),
    ("audio", "encoder_zero_mask", lambda v: not v, True), ("audio", "mask_channel_prob", bool, True),
    ("audio", "start_drop_path_rate", bool, True), ("audio", "end_drop_path_rate", bool, True),
    ("decoder", "decoder_residual", lambda v: not v, True), ("decoder", "projection_layers", lambda v: v != 1, True),
    ("decoder", "add_positions_masked", bool, True), ("decoder", "add_positions_all", bool, True),
]


def _sections(model: dict) -> dict[str, dict]:
    audio = dict((model.get("modalities") or {}).get("audio") or {})
    return {"top": model, "audio": audio, "decoder": audio.get("decoder") or {}}


def model_config_from_data2vec2(model: dict, pretraining: bool = True) -> ModelConfig:
    """Our ModelConfig from a fairseq `Data2VecMultiConfig` section (audio modality); a field the
    file leaves out has fairseq's default. fairseq's norm_eps (1e-5 in its recipes) is not read:
    our LayerNorms use 1e-5."""
    sections = _sections(model)
    bad = [f"{name}={sections[where][name]!r}" for where, name, wrong, pretraining_only in _UNSUPPORTED
           if sections[where].get(name) is not None and wrong(sections[where][name])
           and (pretraining or not pretraining_only)]
    if pretraining and not sections["decoder"]:
        bad.append("decoder=None")
    if bad:
        raise ValueError(f"this fairseq data2vec 2.0 model uses {', '.join(bad)}, which we do not implement")
    c = ModelConfig(arch="data2vec2")
    for ours, where, theirs, default in FIELDS:
        value = sections[where].get(theirs)
        setattr(c, ours, type(default)(default if value is None else value))
    spec = sections["audio"].get("feature_encoder_spec") or DEFAULT_SPEC
    c.conv_feature_layers = [list(x) for x in (eval_conv(spec) if isinstance(spec, str) else spec)]
    c.encoder_ffn_embed_dim = int(c.encoder_embed_dim * float(model.get("mlp_ratio") or 4.0))
    c.conv_bias, c.layer_norm_first, c.dropout_features = False, False, 0.0
    c.loss_scale = float(model.get("loss_scale") or 0.0)
    if isinstance(model.get("ema_anneal_end_step"), int):  # otherwise an unresolved interpolation
        c.ema_anneal_end_step = model["ema_anneal_end_step"]
    return c


def model_section(m: ModelConfig) -> dict:
    """A fairseq `Data2VecMultiConfig` (audio only) for our config, every value explicit (no
    interpolations), with the settings of fairseq's v2 audio recipes wherever we have no field."""
    problems = [what for what, bad in (
        ("conv_bias=True (fairseq's audio CNN has no biases)", m.conv_bias),
        ("layer_norm_first=True", m.layer_norm_first),
        (f"encoder_ffn_embed_dim={m.encoder_ffn_embed_dim}",
         int(m.encoder_embed_dim * (m.encoder_ffn_embed_dim / m.encoder_embed_dim)) != m.encoder_ffn_embed_dim),
    ) if bad]
    if problems:
        raise ValueError(f"fairseq's data2vec 2.0 cannot hold {', '.join(problems)}")
    anneal = int(m.ema_anneal_end_step)
    top = dict(
        _name="data2vec_multi", loss_scale=m.loss_scale or None, start_drop_path_rate=0.0, end_drop_path_rate=0.0,
        norm_eps=1e-5, norm_affine=True, post_mlp_drop=m.dropout,
        mlp_ratio=m.encoder_ffn_embed_dim / m.encoder_embed_dim,
        layer_norm_first=False, end_of_block_targets=False, layer_norm_target_layer=False,
        batch_norm_target_layer=False, instance_norm_targets=False, layer_norm_targets=False, ema_same_dtype=True,
        log_norms=True, ema_anneal_end_step=anneal, ema_encoder_only=False, max_update=anneal, shared_decoder=None,
        supported_modality="AUDIO", mae_init=False, seed=1, skip_ema=False, cls_loss=0.0, recon_loss=0.0,
        d2v_loss=1.0, decoder_group=False,
    )
    audio = dict(
        type="AUDIO", prenet_layerdrop=m.encoder_layerdrop, prenet_dropout=m.dropout, start_drop_path_rate=0.0,
        end_drop_path_rate=0.0, num_extra_tokens=0, init_extra_token_zero=True, mask_prob_min=None,
        inverse_mask=False, keep_masked_pct=0.0, add_masks=False, remove_masks=False, mask_dropout=0.0,
        encoder_zero_mask=True, mask_channel_prob=0.0, mask_channel_length=64, ema_local_encoder=False,
        use_alibi_encoder=True, alibi_scale=1.0, learned_alibi=False, alibi_max_pos=None, learned_alibi_scale=True,
        learned_alibi_scale_per_head=True, learned_alibi_scale_per_layer=False,
        num_alibi_heads=m.encoder_attention_heads, model_depth=m.encoder_layers, conv_pos_pre_ln=False,
        feature_encoder_spec=repr([tuple(int(v) for v in x) for x in m.conv_feature_layers]),
    )
    decoder = dict(add_positions_masked=False, add_positions_all=False, decoder_residual=True, projection_layers=1,
                   projection_ratio=2.0)
    sections = {"top": top, "audio": audio, "decoder": decoder}
    for ours, where, theirs, default in FIELDS:
        sections[where][theirs] = type(default)(getattr(m, ours))
    audio["decoder"], top["modalities"] = decoder, {"audio": audio}
    return top


def precompute_mask_config(m: ModelConfig) -> dict:
    """The task's `precompute_mask_config`: masks drawn by the data loader, as the recipes do."""
    return dict(mask_prob=m.mask_prob, mask_prob_adjust=m.mask_prob_adjust, mask_length=m.mask_length,
                inverse_mask=False, mask_dropout=0.0, clone_batch=m.clone_batch, expand_adjacent=False,
                non_overlapping=False)


def check_audio_only(weights: dict, model: dict, path: Path) -> None:
    """Refuse image / text data2vec 2.0 models (and files without an audio encoder) by name."""
    found = sorted({k.split(".")[1] for k in weights if k.startswith("modality_encoders.")})
    said = model.get("supported_modality")  # "AUDIO" in files fairseq saved (enums written as names)
    other = [x for x in found if x != "AUDIO"] or ([said] if isinstance(said, str) and said != "AUDIO" else [])
    if other:
        raise ValueError(f"{path} is a data2vec 2.0 model for {', '.join(other).lower()} (fairseq data2vec_multi); "
                         "only its audio models can be read")
    if "AUDIO" not in found:
        raise ValueError(f"{path} is a fairseq data2vec 2.0 checkpoint without an audio encoder; it cannot be read")


# ----------------------------------------------------------------------------------------- reading


def read_pretrained(weights: dict, model: dict, task: dict, path: Path):
    """A `data2vec_multi` pretraining checkpoint: (config, normalize, weights, teacher) in our terms."""
    check_audio_only(weights, model, path)
    ema = {k: v for k, v in (weights.pop("_ema", None) or {}).items() if isinstance(v, torch.Tensor)}
    c = model_config_from_data2vec2(model)
    ours = from_fairseq_weights(weights, c.prenet_depth, c.encoder_attention_heads)
    teacher = teacher_from_fairseq(ema, c.prenet_depth, c.encoder_attention_heads) if ema else {}
    return c, bool(task.get("normalize", False)), ours, teacher


def read_encoder(weights: dict, model: dict, path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The encoder of a CTC fine-tuning (`w2v_encoder.w2v_model.` stripped): fairseq removed its decoder."""
    check_audio_only(weights, model, path)
    c = model_config_from_data2vec2(model, pretraining=False)
    weights = {k: v for k, v in weights.items() if not k.startswith(AUDIO + "decoder.")}
    return c, from_fairseq_weights(weights, c.prenet_depth, c.encoder_attention_heads)
