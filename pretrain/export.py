"""`python -m pretrain.export RUN_OR_CKPT --format hf|fairseq2 --out DIR`: a transformers model directory,
or a fairseq2 checkpoint with its asset card (`pretrain.interop.fairseq2`).

wav2vec 2.0 runs export as `Wav2Vec2ForPreTraining` (encoder, quantizer and heads); data2vec runs
as `Data2VecAudioModel` (the student encoder; transformers has no data2vec pretraining head).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from data_prep.fsutil import atomic_write_text, atomic_write_with
from pretrain.config import RunConfig
from pretrain.interop.hf import hf_config, to_hf
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


def export_hf(checkpoint_path: str | Path, out: Path) -> Path:
    state = ckpt.load(checkpoint_path)
    if "ctc" in state.get("config", {}):
        raise ValueError(f"{checkpoint_path} is a fine-tuned CTC run: export it with `python -m finetune.export`")
    cfg = RunConfig.from_dict(state["config"])
    m = cfg.model
    weights = dict(state["model"])
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
    return out


def save_safetensors(weights: dict[str, torch.Tensor], path: Path) -> None:
    """fp32, contiguous, unshared tensors, written atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in weights.items()}
    atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__)
    p.add_argument("checkpoint", help="a checkpoint file, or a run directory (its last checkpoint)")
    p.add_argument("--format", choices=["hf", "fairseq2"], default="hf")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", default=None, help="fairseq2 asset name (default: the output directory's name)")
    args = p.parse_args(argv)
    try:
        if args.format == "hf":
            path = export_hf(args.checkpoint, args.out)
            print(f"wrote a transformers model to {path}")
        else:
            card = export_fairseq2_run(args.checkpoint, args.out, args.name or args.out.name)
            print(f"wrote a fairseq2 wav2vec2 checkpoint to {args.out}; load it with "
                  f"FAIRSEQ2_USER_ASSET_DIR={args.out} and the asset name {card.stem}")
    except (FileNotFoundError, RuntimeError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def export_fairseq2_run(checkpoint_path: str | Path, out: Path, name: str) -> Path:
    from pretrain.interop.fairseq2 import export_fairseq2

    state = ckpt.load(checkpoint_path)
    if "ctc" in state.get("config", {}):
        raise ValueError(f"{checkpoint_path} is a fine-tuned CTC run: export it with `python -m finetune.export`")
    cfg = RunConfig.from_dict(state["config"])
    return export_fairseq2(state["model"], cfg.model, out, name, step=int(state.get("step", 0)))


if __name__ == "__main__":
    sys.exit(main())
