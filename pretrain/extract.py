"""`python -m pretrain.extract RUN_OR_CKPT --manifest TSV --out DIR [--layer L]`: features per utterance.

Each utterance is encoded whole, without masking or dropout, and saved as `DIR/<utterance id>.npy`
(frames x dim, float32). By default that is the final encoder output (transformers'
`last_hidden_state`); `--layer L` takes the output of transformer layer L (1-based) instead
(data2vec 2.0 numbers its prenet blocks first).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from data_prep.loader import normalize_wave
from data_prep.sources import BadUtteranceError, ManifestSource
from pretrain.build import build_task
from pretrain.config import RunConfig
from pretrain.training import checkpoint as ckpt


def load_encoder(checkpoint_path: str | Path, device: torch.device):
    """Our run or checkpoint, our safetensors export (pretrained, or CTC: its encoder), or a fairseq
    checkpoint file (pretrained or CTC: its encoder)."""
    from pretrain.interop.fairseq import is_fairseq_file
    from pretrain.interop.native import is_native_dir, load_native_weights, read_native

    if is_native_dir(checkpoint_path):
        native = read_native(checkpoint_path)
        cfg = native.run_config()
        task = build_task(cfg.model)
        load_native_weights(task, native)
        return cfg, task.model.to(device).eval()
    if is_fairseq_file(checkpoint_path):
        from pretrain.build import load_fairseq_weights
        from pretrain.interop.fairseq import read_fairseq

        theirs = read_fairseq(checkpoint_path)
        cfg = RunConfig(preset="fairseq", model=theirs.model)
        cfg.data.normalize = theirs.normalize
        task = build_task(cfg.model)
        load_fairseq_weights(task, theirs, Path(checkpoint_path))
        return cfg, task.model.to(device).eval()
    state = ckpt.load(checkpoint_path)
    cfg = RunConfig.from_dict(state["config"])
    task = build_task(cfg.model)
    task.model.load_state_dict(state["model"])
    return cfg, task.model.to(device).eval()


@torch.no_grad()
def encode(model, wave: np.ndarray, device: torch.device, layer: int | None = None) -> np.ndarray:
    source = torch.from_numpy(wave).to(device)[None]
    front = model.frontend(source)
    n = len(model.encoder.layers)  # data2vec 2.0 counts its prenet blocks too
    if layer is not None and not 1 <= layer <= n:
        raise ValueError(f"--layer must be between 1 and {n}")
    x, _ = model.encoder(front.features, None, num_layers=layer if layer not in (None, n) else None)
    return x[0].float().cpu().numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.extract", description=__doc__)
    p.add_argument("checkpoint", help="a checkpoint file, a run directory (its last checkpoint), a "
                                      "`--format safetensors` export or a fairseq checkpoint file")
    p.add_argument("--manifest", type=Path, required=True, help="a fairseq manifest (.tsv)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        cfg, model = load_encoder(args.checkpoint, device)
        source = ManifestSource(args.manifest)
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    failed = 0
    for i in tqdm(range(len(source)), unit="utt", disable=None):
        try:
            wave = source.read(i)
        except BadUtteranceError as err:  # one bad file must not cost the features of the others
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        if cfg.data.normalize:
            wave = normalize_wave(wave)
        try:
            feats = encode(model, wave, device, args.layer)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        tmp = args.out / f".{source.ids[i]}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, feats)
        tmp.replace(args.out / f"{source.ids[i]}.npy")
    print(f"wrote {len(source) - failed} feature files to {args.out}"
          + (f"; {failed} utterance(s) could not be read (listed above)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
