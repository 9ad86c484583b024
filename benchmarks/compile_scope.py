"""What to compile for `train.compile`: eager vs every transformer block vs the whole model.

    python benchmarks/compile_scope.py [--presets wav2vec2_tiny wav2vec2_base] [--seconds 1.0]

One training step (forward and backward, LayerDrop off) on batches of 2 utterances, the second
10% shorter (padding), at 5 lengths 10% apart, then 3 more steps at the last length. Reported per
(preset, scope): the first step (compiling included), the first step of each new length, the
median of the repeated steps, the graphs dynamo compiled (after the first length and in all),
graph breaks. Each pair runs in its own process: dynamo's caches and counters are per process.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SCOPES = ("eager", "layers", "model", "model_stock_conv")


def one(preset: str, scope: str, seconds: float) -> dict:
    import numpy as np
    import torch
    from torch._dynamo.utils import counters

    from data_prep.loader import Batch
    from pretrain.build import build_task
    from pretrain.models.compiled import set_compiled
    from pretrain.presets import get_preset

    cfg = get_preset(preset).model
    cfg.encoder_layerdrop = 0.0
    torch.manual_seed(0)
    task = build_task(cfg)
    task.model.train()
    model = task.model
    if scope == "layers":
        set_compiled([task.model], True)
    elif scope.startswith("model"):
        if scope == "model_stock_conv":  # F.conv1d instead of the CPU matmul kernel (a custom autograd.Function)
            task.model.feature_extractor.matmul_on_cpu = False
        model = torch.compile(task.model)  # what a user would write: default (automatic) dynamic shapes
    base = int(seconds * 16000)
    lengths = [int(base * (1 + 0.1 * i)) for i in range(5)]
    rng = np.random.default_rng(0)
    times, graphs_after_first = [], 0
    error = None
    for i, n in enumerate(lengths + [lengths[-1]] * 3):
        wav = torch.from_numpy(rng.standard_normal((2, n)).astype(np.float32) * 0.1)
        pad = torch.zeros(2, n, dtype=torch.bool)
        pad[1, int(n * 0.9):] = True
        start = time.perf_counter()
        try:
            record = task.train_step(model, Batch(wav, pad, torch.arange(2)), np.random.default_rng([1, i]))
            record.loss.backward()
        except Exception as err:  # noqa: BLE001 - a failed compile is a result here
            error = f"step {i} (length {n}): {type(err).__name__}: {str(err).splitlines()[0][:300]}"
            break
        times.append(time.perf_counter() - start)
        task.model.zero_grad(set_to_none=True)
        if i == 0:
            graphs_after_first = counters["stats"]["unique_graphs"]
    return {
        "preset": preset, "scope": scope, "lengths": lengths, "error": error,
        "first_step_s": round(times[0], 2) if times else None,
        "new_length_first_steps_s": [round(t, 2) for t in times[1:5]],
        "steady_step_s": round(statistics.median(times[5:]), 4) if len(times) > 5 else None,
        "graphs_after_first_length": graphs_after_first,
        "graphs_total": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "loss": float(record.loss.detach()) if error is None else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["wav2vec2_tiny", "wav2vec2_base"])
    parser.add_argument("--scopes", nargs="+", default=list(SCOPES), choices=SCOPES)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--one", nargs=2, metavar=("PRESET", "SCOPE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compile_scope.json")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.seconds)))
        return
    import torch

    rows = []
    for preset in args.presets:
        for scope in args.scopes:
            proc = subprocess.run([sys.executable, __file__, "--one", preset, scope, "--seconds", str(args.seconds)],
                                  capture_output=True, text=True, check=False)
            if proc.returncode:
                rows.append({"preset": preset, "scope": scope, "error": proc.stderr[-1500:]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    result = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "seconds": args.seconds, "runs": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
