"""Building a task (model + step function) from a config, and initialising it from elsewhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from pretrain.config import ModelConfig, RunConfig
from pretrain.interop.hf import from_hf, model_config_from_hf
from pretrain.objectives.task import Task

#: fields a transformers config decides when a run starts from it (the rest stay the preset's)
_FROM_HF_FIELDS = (
    "arch", "conv_feature_layers", "extractor_mode", "conv_bias", "encoder_layers", "encoder_embed_dim",
    "encoder_ffn_embed_dim", "encoder_attention_heads", "layer_norm_first", "conv_pos", "conv_pos_groups",
    "pos_conv_depth", "latent_vars", "latent_groups", "latent_dim", "final_dim",
)
#: and what a data2vec 2.0 file decides besides (transformers has no such model)
_DATA2VEC2_FIELDS = ("prenet_depth", "decoder_dim", "decoder_kernel", "decoder_layers", "decoder_groups")


def build_task(cfg: ModelConfig) -> Task:
    if cfg.arch == "wav2vec2":
        from pretrain.objectives.wav2vec2_task import Wav2Vec2Task

        return Wav2Vec2Task(cfg)
    if cfg.arch == "data2vec":
        from pretrain.objectives.data2vec_task import Data2VecTask

        return Data2VecTask(cfg)
    if cfg.arch == "data2vec2":
        from pretrain.objectives.data2vec2_task import Data2Vec2Task

        return Data2Vec2Task(cfg)
    raise ValueError(f"unknown model.arch {cfg.arch!r}; use wav2vec2, data2vec or data2vec2")


def read_hf_dir(hf_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{hf_dir} is not a transformers model directory (no config.json)")
    hf = json.loads(config_path.read_text())
    if (hf_dir / "model.safetensors").exists():
        from safetensors.torch import load_file

        weights = load_file(str(hf_dir / "model.safetensors"))
    elif (hf_dir / "pytorch_model.bin").exists():
        weights = torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{hf_dir} has neither model.safetensors nor pytorch_model.bin")
    return hf, weights


def apply_hf_architecture(cfg: RunConfig, hf: dict) -> None:
    """Adopt the architecture of a transformers checkpoint, keeping the preset's training settings."""
    theirs = model_config_from_hf(hf)
    if theirs.arch != cfg.model.arch:
        raise ValueError(
            f"--init-from is a {hf.get('model_type')} model but preset {cfg.preset} trains {cfg.model.arch}; "
            "pick a matching preset"
        )
    for name in _FROM_HF_FIELDS:
        setattr(cfg.model, name, getattr(theirs, name))


def load_hf_weights(task: Task, weights: dict[str, torch.Tensor], hf_dir: Path) -> None:
    ours = from_hf({k: v for k, v in weights.items() if not k.startswith(("lm_head.", "dropout"))})
    missing, unexpected = task.model.load_state_dict(ours, strict=False)
    # A transformers base model has no quantizer / projection heads: those start fresh.
    heads = ("quantizer.", "project_q.", "final_proj.", "regression_head.")
    really_missing = [k for k in missing if not k.startswith(heads)]
    if really_missing or unexpected:
        raise ValueError(
            f"{hf_dir} does not fit this architecture: missing {really_missing[:5]}, unexpected {unexpected[:5]}"
        )
    if hasattr(task, "reset_teacher"):
        task.reset_teacher()


def init_source(cfg: RunConfig, path: Path) -> Callable[[Task], None]:
    """Adopt the architecture of `--init-from` (a transformers directory, a fairseq checkpoint
    file, or our own safetensors export) into `cfg`, keeping the preset's training settings;
    return what loads its weights."""
    from pretrain.interop.fairseq import is_fairseq_file
    from pretrain.interop.native import init_from_native, is_native_dir

    path = Path(path)
    if is_native_dir(path):
        return init_from_native(cfg, path)
    if not is_fairseq_file(path):
        hf, weights = read_hf_dir(path)
        apply_hf_architecture(cfg, hf)
        return lambda task: load_hf_weights(task, weights, path)
    from pretrain.interop.fairseq import read_fairseq

    theirs = read_fairseq(path)
    if theirs.model.arch != cfg.model.arch:
        raise ValueError(f"--init-from {path} is a fairseq {theirs.model.arch} model but preset {cfg.preset} trains "
                         f"{cfg.model.arch}; pick a matching preset")
    for name in _FROM_HF_FIELDS + (_DATA2VEC2_FIELDS if theirs.model.arch == "data2vec2" else ()):
        setattr(cfg.model, name, getattr(theirs.model, name))
    if theirs.normalize != cfg.data.normalize:
        print(f"note: {path} was trained with data.normalize={theirs.normalize}; continuing with the same")
        cfg.data.normalize = theirs.normalize
    return lambda task: load_fairseq_weights(task, theirs, path)


def load_fairseq_weights(task: Task, theirs, path: Path) -> None:
    """A fairseq pretraining checkpoint loads whole (heads included, and the data2vec teacher from
    its `_ema`); a CTC one gives the encoder, and the pretraining heads start fresh."""
    from pretrain.interop.fairseq import from_fairseq_weights

    strict = theirs.kind == "pretrain"
    missing, unexpected = task.model.load_state_dict(theirs.weights, strict=False)
    heads = ("quantizer.", "project_q.", "final_proj.", "regression_head.", "decoder.")
    really_missing = [k for k in missing if strict or not k.startswith(heads)]
    if really_missing or unexpected:
        raise ValueError(f"{path} does not fit this architecture: missing {really_missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if hasattr(task, "reset_teacher"):
        task.reset_teacher()
        if not theirs.teacher:
            return
        state = task.teacher.state_dict()
        if theirs.model.arch == "data2vec2":  # already our encoder's names, and the whole teacher
            ours = theirs.teacher
            if ours.keys() != state.keys():
                missing, unexpected = sorted(state.keys() - ours.keys()), sorted(ours.keys() - state.keys())
                raise ValueError(f"the teacher (`_ema`) in {path} does not fit this architecture: missing "
                                 f"{missing[:5]}, unexpected {unexpected[:5]}")
        else:  # fairseq's `_ema`: encoder-relative names, no positional conv (copied from the student)
            full = from_fairseq_weights({f"encoder.{k}": v for k, v in theirs.teacher.items()})
            ours = {k[len("encoder."):]: v for k, v in full.items()}
        state.update({k: v.to(state[k].dtype) for k, v in ours.items()})
        task.teacher.load_state_dict(state)
