"""Loading a fine-tuned CTC checkpoint and running it on waveforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data_prep.loader import normalize_wave
from pretrain.config import ModelConfig
from pretrain.training import checkpoint as ckpt

from .config import FinetuneConfig
from .dictionary import Dictionary
from .model import CTCModel


def samples_for_frames(model: ModelConfig, frames: int) -> int:
    """The fewest samples from which the conv feature extractor makes `frames` frames
    (400 for one frame with the wav2vec 2.0 stack, then 320 more per frame)."""
    n = frames
    for _, kernel, stride in reversed(model.conv_feature_layers):
        n = (n - 1) * stride + kernel
    return n


def resolve_for_inference(path: str | Path) -> Path:
    """A checkpoint file, or a run directory: its best checkpoint (by validation WER), else its last."""
    p = Path(path)
    best = p / "checkpoints" / "best.pt"
    return best.resolve() if p.is_dir() and best.exists() else ckpt.resolve(p)


def load_fairseq_ctc(path: Path, dict_path: str | Path | None = None) -> tuple[FinetuneConfig, CTCModel, Dictionary]:
    """A fairseq `Wav2VecCtc` checkpoint (wav2vec 2.0 or data2vec-audio inside) as our CTC model."""
    from pretrain.interop.fairseq import read_fairseq

    theirs = read_fairseq(path, dict_path)
    if theirs.kind != "ctc":
        raise ValueError(f"{path} is a fairseq pretraining checkpoint without a CTC head; fine-tune it first: "
                         f"python -m finetune --init-from {path} --data DIR --out RUN")
    if theirs.symbols is None:
        raise ValueError(f"{path} does not carry its vocabulary and there is no dict.ltr.txt beside it; "
                         "pass the dictionary it was fine-tuned with: --dict PATH/dict.ltr.txt")
    cfg = FinetuneConfig(preset="fairseq", model=theirs.model)
    cfg.data.normalize = theirs.normalize
    cfg.ctc.symbols, cfg.ctc.init_from = list(theirs.symbols), str(path)
    dictionary = Dictionary(cfg.ctc.symbols)
    model = CTCModel(cfg.model, len(dictionary), cfg.ctc.final_dropout)
    state = {f"w2v.{k}": v for k, v in theirs.weights.items()}
    state["proj.weight"], state["proj.bias"] = theirs.proj
    model.load_state_dict(state)
    return cfg, model, dictionary


def load_native_ctc(path: Path) -> tuple[FinetuneConfig, CTCModel, Dictionary]:
    """Our `--format safetensors` export of a fine-tuned run (its vocabulary is in its config)."""
    from pretrain.interop.native import read_native

    native = read_native(path)
    if native.kind != "ctc":
        raise ValueError(f"{path} is a pretrained export without a CTC head; fine-tune it first: "
                         f"python -m finetune --init-from {path} --data DIR --out RUN")
    cfg = FinetuneConfig.from_dict(native.config)
    dictionary = Dictionary(cfg.ctc.symbols)
    model = CTCModel(cfg.model, len(dictionary), cfg.ctc.final_dropout)
    model.load_state_dict(native.weights)
    return cfg, model, dictionary


def load_ctc(path: str | Path, device: torch.device | str = "cpu",
             dict_path: str | Path | None = None) -> tuple[FinetuneConfig, CTCModel, Dictionary, Path]:
    """A fine-tuned run or checkpoint of ours or its safetensors export, or a fairseq CTC checkpoint
    file (its vocabulary from the file, `dict_path`, or the dict.ltr.txt beside it)."""
    from pretrain.interop.fairseq import is_fairseq_file
    from pretrain.interop.native import is_native_dir

    if is_native_dir(path):
        cfg, model, dictionary = load_native_ctc(Path(path))
        return cfg, model.to(device).eval(), dictionary, Path(path).resolve()
    if is_fairseq_file(path):
        cfg, model, dictionary = load_fairseq_ctc(Path(path), dict_path)
        return cfg, model.to(device).eval(), dictionary, Path(path).resolve()
    where = resolve_for_inference(path)
    state = ckpt.load(where)
    config = state.get("config", {})
    if "ctc" not in config:
        raise ValueError(
            f"{where} is a pretraining checkpoint without a CTC head; fine-tune it first: "
            f"python -m finetune --init-from {path} --data DIR --out RUN"
        )
    cfg = FinetuneConfig.from_dict(config)
    dictionary = Dictionary(cfg.ctc.symbols)
    model = CTCModel(cfg.model, len(dictionary), cfg.ctc.final_dropout)
    model.load_state_dict(state["model"])
    return cfg, model.to(device).eval(), dictionary, where


@torch.no_grad()
def emissions(model: CTCModel, wave: np.ndarray, normalize: bool) -> torch.Tensor:
    """(T, V) float32 logits of one 16 kHz mono utterance, whole (no padding)."""
    if normalize:
        wave = normalize_wave(wave)
    device = model.proj.weight.device
    source = torch.as_tensor(np.asarray(wave, dtype=np.float32), device=device)[None]
    logits, _ = model(source)
    return logits[0].float().cpu()
