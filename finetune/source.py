"""Where fine-tuning starts from: one of our pretraining (or CTC) runs, our safetensors export of
one, a transformers directory, or a fairseq checkpoint file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.build import read_hf_dir
from pretrain.config import ModelConfig, RunConfig
from pretrain.interop.hf import from_hf, model_config_from_hf
from pretrain.training import checkpoint as ckpt

from .model import PRETRAINING_HEADS


@dataclass
class Pretrained:
    model: ModelConfig
    """Its architecture (other fields are its pretraining settings)."""
    normalize: bool
    """Whether it was trained on standardised waveforms (fine-tuning must do the same)."""
    weights: dict[str, torch.Tensor]
    """The pretrained model's parameters (`CTCModel.w2v`) without pretraining heads."""
    where: str


def _encoder_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(PRETRAINING_HEADS)}


def _from_hf_dir(path: Path) -> Pretrained:
    hf, weights = read_hf_dir(path)
    model = model_config_from_hf(hf)
    ours = from_hf({k: v for k, v in weights.items() if not k.startswith(("lm_head.", "dropout"))})
    pre = path / "preprocessor_config.json"
    # transformers' default: wav2vec2 BASE/LARGE on raw audio, data2vec and LV-60k on normalised audio
    normalize = json.loads(pre.read_text()).get("do_normalize", False) if pre.exists() else model.arch == "data2vec"
    return Pretrained(model, bool(normalize), _encoder_only(ours), str(path))


def _from_checkpoint(path: Path) -> Pretrained:
    state = ckpt.load(path)
    config = state.get("config", {})
    if "model" not in config or "model" not in state:
        raise ValueError(f"{path} is not a checkpoint written by `python -m pretrain` or `python -m finetune`")
    cfg = RunConfig.from_dict({k: config[k] for k in ("preset", "model", "data", "optim", "train")})
    weights = state["model"]
    if "ctc" in config:  # a fine-tuned run: keep its encoder, start a new head
        weights = {k[len("w2v."):]: v for k, v in weights.items() if k.startswith("w2v.")}
    return Pretrained(cfg.model, cfg.data.normalize, _encoder_only(weights), str(ckpt.resolve(path)))


def _from_native(path: Path) -> Pretrained:
    """Our `--format safetensors` export, pretrained or fine-tuned (its encoder)."""
    from pretrain.interop.native import encoder_weights, read_native

    native = read_native(path)
    cfg = native.run_config()
    return Pretrained(cfg.model, cfg.data.normalize, _encoder_only(encoder_weights(native)), str(native.where))


def _from_fairseq(path: Path) -> Pretrained:
    """A fairseq wav2vec 2.0 / data2vec-audio checkpoint, pretrained or CTC fine-tuned (its encoder)."""
    from pretrain.interop.fairseq import read_fairseq

    theirs = read_fairseq(path)
    return Pretrained(theirs.model, theirs.normalize, _encoder_only(theirs.weights), str(path.resolve()))


def load_pretrained(source: str | Path) -> Pretrained:
    from pretrain.interop.fairseq import is_fairseq_file
    from pretrain.interop.native import is_native_dir

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"--init-from {path} does not exist")
    if is_native_dir(path):  # before the transformers check: both have a config.json
        return _from_native(path)
    if path.is_dir() and (path / "config.json").exists() and not (path / "checkpoints").exists():
        return _from_hf_dir(path)
    if is_fairseq_file(path):
        return _from_fairseq(path)
    return _from_checkpoint(path)
