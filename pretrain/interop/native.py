"""Our own export format: a directory any of our models (and the only one data2vec 2.0 has) goes to.

`DIR/model.safetensors` holds the state dict under our own parameter names: a pretraining
model's (heads included) and, for data2vec / data2vec 2.0, the EMA teacher's encoder under the
`teacher.` prefix; a CTC model's (`w2v.*` encoder, `proj.*` head). `DIR/config.json` is the run's
full config (preset, model, data, optim, train, and for CTC `ctc`, whose `symbols` are the output
vocabulary) plus the fields that mark the format: `format`, `format_version`, `kind` (`pretrain`
or `ctc`), `step`, `teacher` (the prefix, or null) and `source`. The marker is what tells this
directory from a transformers one, which also has a config.json and a model.safetensors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_prep.fsutil import atomic_write_text, atomic_write_with
from pretrain.config import RunConfig

FORMAT = "speech-pretrain-safetensors"
FORMAT_VERSION = 1
TEACHER_PREFIX = "teacher."
KINDS = ("pretrain", "ctc")
_MARKER_FIELDS = ("format", "format_version", "kind", "step", "teacher", "source")

#: every model field that decides which tensors exist and their shapes (adopted by `--init-from`)
SHAPE_FIELDS = (
    "arch", "conv_feature_layers", "extractor_mode", "conv_bias", "encoder_layers", "encoder_embed_dim",
    "encoder_ffn_embed_dim", "encoder_attention_heads", "layer_norm_first", "conv_pos", "conv_pos_groups",
    "pos_conv_depth", "latent_vars", "latent_groups", "latent_dim", "final_dim", "prenet_depth",
    "decoder_dim", "decoder_kernel", "decoder_layers", "decoder_groups",
)
#: pretraining-only parameters; a CTC export has none, so starting pretraining from one draws them fresh
PRETRAINING_HEADS = ("quantizer.", "project_q.", "final_proj.", "regression_head.", "decoder.")


@dataclass
class NativeModel:
    kind: str
    """`pretrain` or `ctc`."""
    config: dict
    """The run's config (`RunConfig.to_dict()`, with a `ctc` section for CTC), marker fields removed."""
    weights: dict[str, torch.Tensor]
    teacher: dict[str, torch.Tensor] | None
    """The EMA teacher's encoder state (data2vec / data2vec 2.0 pretraining), else None."""
    step: int
    where: Path

    def run_config(self) -> RunConfig:
        return RunConfig.from_dict(self.config)


def is_native_dir(path: str | Path) -> bool:
    """Whether `path` is a directory written by `write_native` (told by the config's marker)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_native(out: Path, config: dict, weights: dict[str, torch.Tensor], *, kind: str, step: int,
                 source: str, teacher: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `out/model.safetensors`, then `out/config.json` (each atomically). The config goes
    last: a directory that carries the marker always has its complete weights."""
    from safetensors.torch import save_file

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}  # dtypes kept as trained
    clash = [k for k in tensors if k.startswith(TEACHER_PREFIX)]
    if clash:
        raise ValueError(f"model parameter names may not start with {TEACHER_PREFIX!r}: {clash[:3]}")
    if teacher:
        tensors.update({TEACHER_PREFIX + k: v.detach().cpu().contiguous().clone() for k, v in teacher.items()})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_with(out / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    marker = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "step": int(step),
              "teacher": TEACHER_PREFIX if teacher else None, "source": source}
    full = dict(marker, **{k: v for k, v in config.items() if k not in marker})
    atomic_write_text(out / "config.json", json.dumps(full, indent=2, default=list) + "\n")
    return out


def read_native(path: str | Path) -> NativeModel:
    from safetensors.torch import load_file

    path = Path(path)
    if not is_native_dir(path):
        raise ValueError(f"{path} is not a {FORMAT} directory (no config.json with \"format\": \"{FORMAT}\")")
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if int(config.get("format_version", 1)) > FORMAT_VERSION:
        raise ValueError(f"{path} is {FORMAT} version {config['format_version']}; this code reads up to "
                         f"{FORMAT_VERSION}: update it")
    if config.get("kind") not in KINDS:
        raise ValueError(f"{path}/config.json: kind must be one of {KINDS}, got {config.get('kind')!r}")
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} has a config.json but no model.safetensors")
    tensors = load_file(str(path / "model.safetensors"))
    prefix = config.get("teacher")
    teacher = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)} if prefix else None
    weights = {k: v for k, v in tensors.items() if not (prefix and k.startswith(prefix))}
    run = {k: v for k, v in config.items() if k not in _MARKER_FIELDS}
    return NativeModel(config["kind"], run, weights, teacher or None, int(config.get("step", 0)), path.resolve())


def encoder_weights(native: NativeModel) -> dict[str, torch.Tensor]:
    """The pretrained model's parameters without a CTC head (`w2v.` stripped from a CTC export)."""
    if native.kind == "ctc":
        return {k[len("w2v."):]: v for k, v in native.weights.items() if k.startswith("w2v.")}
    return dict(native.weights)


def init_from_native(cfg: RunConfig, path: Path) -> Callable[[Any], None]:
    """Pretraining from an export: adopt its architecture and normalisation into `cfg` (the preset
    keeps its training settings) and return what loads the weights. A pretraining export loads
    whole, teacher included; a CTC export gives its encoder, and heads and teacher start fresh."""
    native = read_native(path)
    theirs = native.run_config()
    if theirs.model.arch != cfg.model.arch:
        raise ValueError(f"--init-from {path} is a {theirs.model.arch} model but preset {cfg.preset} trains "
                         f"{cfg.model.arch}; pick a matching preset")
    for name in SHAPE_FIELDS:
        setattr(cfg.model, name, getattr(theirs.model, name))
    if theirs.data.normalize != cfg.data.normalize:
        print(f"note: {path} was trained with data.normalize={theirs.data.normalize}; continuing with the same")
        cfg.data.normalize = theirs.data.normalize
    return lambda task: load_native_weights(task, native)


def load_native_weights(task: Any, native: NativeModel) -> None:
    """Into a pretraining task (`pretrain.objectives.task.Task`, which this layer may not import)."""
    weights = encoder_weights(native)
    missing, unexpected = task.model.load_state_dict(weights, strict=False)
    # a CTC export never had the pretraining heads: those (only) start fresh
    really_missing = [k for k in missing if native.kind == "pretrain" or not k.startswith(PRETRAINING_HEADS)]
    if really_missing or unexpected:
        raise ValueError(f"{native.where} does not fit this architecture: missing {really_missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if hasattr(task, "reset_teacher"):
        task.reset_teacher()
        if native.teacher is not None:
            state = task.teacher.state_dict()
            if native.teacher.keys() != state.keys():
                raise ValueError(f"the teacher in {native.where} does not fit this architecture: missing "
                                 f"{sorted(state.keys() - native.teacher.keys())[:5]}, "
                                 f"unexpected {sorted(native.teacher.keys() - state.keys())[:5]}")
            task.teacher.load_state_dict({k: v.to(state[k].dtype) for k, v in native.teacher.items()})
