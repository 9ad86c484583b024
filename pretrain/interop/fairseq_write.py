"""Writing fairseq checkpoints that `checkpoint_utils.load_model_ensemble_and_task` loads strictly.

The file holds only plain Python values and tensors (no fairseq classes), so fairseq 0.12 under
torch >= 2.6 (which unpickles with `weights_only=True`) reads it as well as fairseq's main branch.
Task sections list only the fields both know; a CTC model's vocabulary is `dict.ltr.txt` beside
the file, found through `task.data` (the export directory, or `arg_overrides={"data": DIR}`).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from data_prep.fsutil import atomic_write_text, atomic_write_with
from pretrain.config import ModelConfig
from pretrain.interop import fairseq_data2vec2 as d2v2
from pretrain.interop.fairseq import FAIRSEQ_DEFAULTS, to_fairseq_weights

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


def task_section(name: str, data: str, normalize: bool, labels: str | None = None, max_sample_size=None,
                 min_sample_size=None) -> dict:
    """An `AudioPretrainingConfig` / `AudioFinetuningConfig` with the fields fairseq 0.12 and main share."""
    return {
        "_name": name, "data": data, "labels": labels, "binarized_dataset": False, "sample_rate": 16_000,
        "normalize": normalize, "enable_padding": False, "max_sample_size": max_sample_size,
        "min_sample_size": min_sample_size, "num_batch_buckets": 0, "tpu": False, "text_compression_level": "none",
    }


def model_section(m: ModelConfig) -> dict:
    """fairseq's `Wav2Vec2Config` (`_name` wav2vec2), `Data2VecAudioConfig` (`_name` data2vec_audio)
    or `Data2VecMultiConfig` (`_name` data2vec_multi)."""
    if m.arch == "data2vec2":
        return d2v2.model_section(m)
    section = {name: getattr(m, name) for name in FAIRSEQ_DEFAULTS}
    section["latent_temp"] = [float(x) for x in m.latent_temp]
    # fairseq evaluates this string; a list of tuples reads back as the same layers
    section["conv_feature_layers"] = repr([tuple(int(v) for v in x) for x in m.conv_feature_layers])
    section.update(activation_fn="gelu", layer_type="transformer", quantize_input=False, same_quantizer=False,
                   target_glu=False, quantizer_depth=1, quantizer_factor=3, pos_enc_type="abs",
                   mask_selection="static", mask_other=0, no_mask_overlap=False, mask_min_space=1,
                   require_same_masks=True, mask_dropout=0.0, mask_channel_prob=0.0, mask_channel_length=10,
                   negatives_from_everywhere=False, cross_sample_negatives=0, codebook_negatives=0,
                   max_positions=100_000, checkpoint_activations=False, required_seq_len_multiple=2,
                   crop_seq_to_multiple=1)
    if m.arch == "data2vec":
        section.update(_name="data2vec_audio", quantize_targets=False, final_dim=0,
                       loss_scale=m.loss_scale or None, layer_norm_target_layer=False, instance_norm_targets=False,
                       layer_norm_targets=False, batch_norm_target_layer=False, group_norm_target_layer=False,
                       ema_anneal_end_step=int(m.ema_anneal_end_step), ema_transformer_only=True,
                       ema_layers_only=True, max_update=int(m.ema_anneal_end_step))
    else:
        section.update(_name="wav2vec2", quantize_targets=True)
    return section


def _history(criterion: str, num_updates: int) -> list[dict]:
    return [{"criterion_name": criterion, "optimizer_name": "Adam", "lr_scheduler_state": {"best": None},
             "num_updates": int(num_updates)}]


def _save(path: Path, state: dict) -> None:
    atomic_write_with(path, lambda tmp: torch.save(state, tmp))


def _fp32(weights: dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((k, v.detach().to(torch.float32).contiguous().clone()) for k, v in weights.items())


def write_pretrained(path: Path, m: ModelConfig, weights: dict[str, torch.Tensor], normalize: bool,
                     num_updates: int = 0, teacher: dict[str, torch.Tensor] | None = None,
                     max_sample_size: int | None = None, min_sample_size: int | None = None) -> Path:
    """A fairseq `Wav2Vec2Model` / `Data2VecAudioModel` / `Data2VecMultiModel` checkpoint from our
    pretraining weights.

    `teacher`: our data2vec teacher's encoder state, saved as fairseq's `_ema` (encoder-relative
    names, positional convolution included: fairseq restores its teacher from `_ema` over a copy of
    a freshly initialised encoder, so whatever `_ema` leaves out stays random). Without a teacher,
    `_ema` is the student's encoder, where fairseq's teacher starts. A pretrained data2vec file
    must have `_ema` for fairseq to load it. data2vec 2.0 (audio) is written the same way.
    """
    if m.arch == "data2vec2":
        fs = d2v2.to_fairseq_weights(weights, m.prenet_depth, m.extractor_mode)
        source = teacher or {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
        fs = dict(_fp32(fs), _ema=dict(_fp32(d2v2.teacher_to_fairseq(source, m.prenet_depth))))
    elif m.arch == "data2vec":
        fs = to_fairseq_weights(weights, m.extractor_mode)
        source = teacher or {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
        full = to_fairseq_weights({f"encoder.{k}": v for k, v in source.items()}, m.extractor_mode)
        ema = {k[len("encoder."):]: v for k, v in full.items()}
        fs = dict(_fp32(fs), _ema=dict(_fp32(ema)))
    else:
        fs = _fp32(to_fairseq_weights(weights, m.extractor_mode))
    task = task_section("audio_pretraining", str(path.parent.resolve()), normalize, None, max_sample_size,
                        min_sample_size)
    if m.arch == "data2vec2":  # fairseq's main branch only: the loader draws the masks, as in its recipes
        task["precompute_mask_config"] = d2v2.precompute_mask_config(m)
    cfg = {
        "_name": None,
        "task": task,
        "model": model_section(m),
        "criterion": {"_name": "wav2vec", "infonce": True, "loss_weights": [m.diversity_weight, m.feature_pen_weight],
                      "log_keys": ["prob_perplexity", "code_perplexity", "temp"]} if m.arch == "wav2vec2" else
                     {"_name": "model", "log_keys": ["ema_decay", "target_var", "pred_var"]},
        "lr_scheduler": None,
    }
    criterion = "Wav2vecCriterion" if m.arch == "wav2vec2" else "ModelCriterion"
    _save(path, {"args": None, "cfg": cfg, "model": fs, "optimizer_history": _history(criterion, num_updates),
                 "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0}}, "task_state": {}})
    return path


def write_dictionary(path: Path, symbols: list[str], counts: dict[str, int] | None = None) -> None:
    """fairseq's `dict.ltr.txt`: the symbols after the four specials, `SYMBOL COUNT` per line."""
    if tuple(symbols[:4]) != SPECIALS:
        raise ValueError(f"a fairseq CTC vocabulary starts with {SPECIALS}, got {symbols[:4]}")
    counts = counts or {}
    atomic_write_text(path, "".join(f"{s} {int(counts.get(s, 0))}\n" for s in symbols[4:]))


def write_ctc(path: Path, m: ModelConfig, encoder: dict[str, torch.Tensor], proj: tuple[torch.Tensor, torch.Tensor],
              symbols: list[str], normalize: bool, num_updates: int = 0, final_dropout: float = 0.0,
              counts: dict[str, int] | None = None, source: str = "") -> Path:
    """A fairseq `Wav2VecCtc` checkpoint and the `dict.ltr.txt` beside it.

    The pretraining config is embedded as `w2v_args` (fairseq never reads `w2v_path` then), and
    the task's `data` is the output directory, where fairseq finds the dictionary.
    """
    if proj[0].shape[0] != len(symbols):
        raise ValueError(f"{len(symbols)} symbols for an output layer of {proj[0].shape[0]}")
    data = str(path.parent.resolve())
    if m.arch == "data2vec2":
        if not normalize:  # fairseq asserts it for data2vec 2.0 encoders
            raise ValueError("fairseq fine-tunes data2vec 2.0 on normalised audio only (data.normalize=true)")
        fs = d2v2.to_fairseq_weights(encoder, m.prenet_depth, m.extractor_mode)
    else:
        fs = to_fairseq_weights(encoder, m.extractor_mode)
    inner = {f"w2v_encoder.w2v_model.{k}": v for k, v in fs.items()}
    weights = _fp32(dict(inner, **{"w2v_encoder.proj.weight": proj[0], "w2v_encoder.proj.bias": proj[1]}))
    pretraining = {"_name": None, "task": task_section("audio_pretraining", data, normalize),
                   "model": model_section(m), "criterion": None, "lr_scheduler": None}
    model = {
        "_name": "wav2vec_ctc", "w2v_path": source or "embedded in w2v_args", "no_pretrained_weights": False,
        "normalize": normalize, "data": data, "w2v_args": pretraining,
        "dropout_input": 0.0, "final_dropout": float(final_dropout), "dropout": 0.0, "attention_dropout": 0.0,
        "activation_dropout": 0.0, "apply_mask": False, "mask_length": 10, "mask_prob": 0.5, "mask_selection": "static",
        "mask_other": 0, "no_mask_overlap": False, "mask_min_space": 1, "require_same_masks": True,
        "mask_dropout": 0.0, "mask_channel_length": 10, "mask_channel_prob": 0.0, "mask_channel_selection": "static",
        "mask_channel_other": 0, "no_mask_channel_overlap": False, "mask_channel_min_space": 1,
        "mask_channel_before": False, "freeze_finetune_updates": 0, "feature_grad_mult": 0.0, "layerdrop": 0.0,
        "offload_activations": False, "min_params_to_wrap": 100_000_000, "checkpoint_activations": False,
        "ddp_backend": "legacy_ddp", "blank_weight": 0.0, "blank_mode": "add", "layer_type": "transformer",
    }
    cfg = {"_name": None, "task": task_section("audio_finetuning", data, normalize, "ltr"), "model": model,
           "criterion": {"_name": "ctc", "zero_infinity": True, "post_process": "letter"}, "lr_scheduler": None}
    write_dictionary(path.parent / "dict.ltr.txt", symbols, counts)
    _save(path, {"args": None, "cfg": cfg, "model": weights, "optimizer_history": _history("CtcCriterion", num_updates),
                 "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0}}, "task_state": {}})
    return path
