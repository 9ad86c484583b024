"""`python -m pretrain.export RUN_OR_CKPT --format hf|fairseq2|fairseq|safetensors --out DIR`: ship a pretrained model.

`hf`: a transformers model directory. wav2vec 2.0 runs export as `Wav2Vec2ForPreTraining`
(encoder, quantizer and heads); data2vec runs as `Data2VecAudioModel` (the student encoder;
transformers has no data2vec pretraining head). `fairseq2`: a fairseq2 checkpoint with its asset
card (`pretrain.interop.fairseq2`). `fairseq`: `DIR/checkpoint.pt`, a fairseq `Wav2Vec2Model` /
`Data2VecAudioModel` checkpoint (`pretrain.interop.fairseq_write`). `safetensors`: our own names
and full config (`pretrain.interop.native`), for every architecture; the only one data2vec 2.0
has besides fairseq, as transformers and fairseq2 have no such model. The input may also be a
fairseq pretraining checkpoint file, or a safetensors export, to convert it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from data_prep.fsutil import atomic_write_text, atomic_write_with
from pretrain.config import RunConfig
from pretrain.interop.hf import hf_config, to_hf
from pretrain.model_card import write_model_card
from pretrain.training import checkpoint as ckpt

SAMPLE_RATE = 16_000


def preprocessor_config(normalize: bool, layer_norm_extractor: bool) -> dict:
    return {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "sampling_rate": SAMPLE_RATE,
        "padding_side": "right",
        "padding_value": 0.0,
        "do_normalize": normalize,
        # GroupNorm models must see unpadded audio one utterance at a time (as in fairseq)
        "return_attention_mask": layer_norm_extractor,
    }


class UnsupportedFormat(ValueError):
    """The target library has no model of this architecture (nothing is written)."""


#: formats whose library has no model of an architecture, and why
_NO_MODEL = {("data2vec2", "hf"): "transformers has no data2vec 2.0 model",
             ("data2vec2", "fairseq2"): "fairseq2 has no data2vec 2.0 model"}


def check_format(arch: str, fmt: str) -> None:
    """Raise UnsupportedFormat, in one line, when `fmt` cannot hold an `arch` model."""
    why = _NO_MODEL.get((arch, fmt))
    if why:
        raise UnsupportedFormat(f"{why}, so this {arch} run cannot be exported with --format {fmt}; "
                                "use --format safetensors (this project's own format) instead")


@dataclass
class Pretrained:
    """A pretraining model to export: its config, weights, data2vec teacher and update count."""

    cfg: RunConfig
    weights: dict[str, torch.Tensor]
    teacher: dict[str, torch.Tensor] | None
    step: int
    source: str


def load_pretrained(checkpoint_path: str | Path) -> Pretrained:
    """Our pretraining run or checkpoint or its safetensors export, or a fairseq pretraining checkpoint file."""
    from pretrain.interop.fairseq import is_fairseq_file
    from pretrain.interop.native import is_native_dir, read_native

    if is_native_dir(checkpoint_path):
        native = read_native(checkpoint_path)
        if native.kind != "pretrain":
            raise ValueError(f"{checkpoint_path} is a fine-tuned CTC export: use `python -m finetune.export`")
        return Pretrained(native.run_config(), native.weights, native.teacher, native.step, str(native.where))
    if is_fairseq_file(checkpoint_path):
        from pretrain.build import build_task, load_fairseq_weights
        from pretrain.interop.fairseq import read_fairseq

        theirs = read_fairseq(checkpoint_path)
        if theirs.kind != "pretrain":
            raise ValueError(f"{checkpoint_path} is a fairseq CTC checkpoint: export it with `python -m finetune.export`")
        cfg = RunConfig(preset="fairseq", model=theirs.model)
        cfg.data.normalize = theirs.normalize
        task = build_task(cfg.model)
        load_fairseq_weights(task, theirs, Path(checkpoint_path))  # checks that every tensor fits
        teacher = task.teacher.state_dict() if hasattr(task, "teacher") else None
        return Pretrained(cfg, task.model.state_dict(), teacher, theirs.num_updates, str(checkpoint_path))
    state = ckpt.load(checkpoint_path)
    if "ctc" in state.get("config", {}):
        raise ValueError(f"{checkpoint_path} is a fine-tuned CTC run: export it with `python -m finetune.export`")
    teacher = (state.get("task") or {}).get("teacher")
    return Pretrained(RunConfig.from_dict(state["config"]), dict(state["model"]), teacher, int(state.get("step", 0)),
                      str(ckpt.resolve(checkpoint_path)))


def export_fairseq(checkpoint_path: str | Path, out: Path) -> Path:
    from pretrain.interop.fairseq_write import write_pretrained

    p = load_pretrained(checkpoint_path)
    out.mkdir(parents=True, exist_ok=True)
    path = write_pretrained(out / "checkpoint.pt", p.cfg.model, p.weights, p.cfg.data.normalize, p.step, p.teacher,
                            p.cfg.data.max_sample_size, p.cfg.data.min_sample_size)
    write_model_card(out, p.cfg, kind="pretrained", fmt="fairseq", source=p.source, step=p.step)
    return path


def export_safetensors(checkpoint_path: str | Path, out: Path) -> Path:
    """`out/model.safetensors` (the teacher, if any, under `teacher.`), `out/config.json`, `out/README.md`."""
    from pretrain.interop.native import write_native

    p = load_pretrained(checkpoint_path)
    write_native(out, p.cfg.to_dict(), p.weights, kind="pretrain", step=p.step, source=p.source, teacher=p.teacher)
    write_model_card(out, p.cfg, kind="pretrained", fmt="safetensors", source=p.source, step=p.step)
    return out


def export_hf(checkpoint_path: str | Path, out: Path) -> Path:
    p = load_pretrained(checkpoint_path)
    cfg = p.cfg
    m = cfg.model
    check_format(m.arch, "hf")
    weights = dict(p.weights)
    if m.arch == "data2vec":
        weights = {k: v for k, v in weights.items() if not k.startswith(("final_proj.", "regression_head."))}
        hf_weights = to_hf(weights, "")
    else:
        hf_weights = to_hf(weights, "wav2vec2.")
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(m, cfg.data.normalize)
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    pre = preprocessor_config(cfg.data.normalize, m.extractor_mode == "layer_norm")
    atomic_write_text(out / "preprocessor_config.json", json.dumps(pre, indent=2) + "\n")
    save_safetensors(hf_weights, out / "model.safetensors")
    write_model_card(out, cfg, kind="pretrained", fmt="hf", source=p.source, step=p.step)
    return out


def save_safetensors(weights: dict[str, torch.Tensor], path: Path) -> None:
    """fp32, contiguous, unshared tensors, written atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in weights.items()}
    atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__)
    p.add_argument("checkpoint", help="a checkpoint file, or a run directory (its last checkpoint)")
    p.add_argument("--format", choices=["hf", "fairseq2", "fairseq", "safetensors"], default="hf")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", default=None, help="fairseq2 asset name (default: the output directory's name)")
    args = p.parse_args(argv)
    try:
        if args.format == "hf":
            path = export_hf(args.checkpoint, args.out)
            print(f"wrote a transformers model to {path}")
        elif args.format == "safetensors":
            path = export_safetensors(args.checkpoint, args.out)
            print(f"wrote {path / 'model.safetensors'} and its config.json; use it here with --init-from {path}")
        elif args.format == "fairseq":
            path = export_fairseq(args.checkpoint, args.out)
            print(f"wrote a fairseq checkpoint to {path}; load it with "
                  f"fairseq.checkpoint_utils.load_model_ensemble_and_task([{str(path)!r}])")
        else:
            card = export_fairseq2_run(args.checkpoint, args.out, args.name or args.out.name)
            print(f"wrote a fairseq2 wav2vec2 checkpoint to {args.out}; load it with "
                  f"FAIRSEQ2_USER_ASSET_DIR={args.out} and the asset name {card.stem}")
    except UnsupportedFormat as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, RuntimeError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def export_fairseq2_run(checkpoint_path: str | Path, out: Path, name: str) -> Path:
    from pretrain.interop.fairseq2 import export_fairseq2

    p = load_pretrained(checkpoint_path)
    check_format(p.cfg.model.arch, "fairseq2")
    card = export_fairseq2(p.weights, p.cfg.model, out, name, step=p.step)
    write_model_card(out, p.cfg, kind="pretrained", fmt="fairseq2", source=p.source, step=p.step, name=name)
    return card


if __name__ == "__main__":
    sys.exit(main())
