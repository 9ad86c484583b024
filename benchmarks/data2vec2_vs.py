"""data2vec 2.0 against data2vec and wav2vec 2.0: equal pretraining wall-clock, then the same CTC
fine-tuning, on the synthetic corpus; and one BASE training step of each.

    python benchmarks/data2vec2_vs.py [--budget 150] [--work runs/d2v2_vs] [--out FILE]
    python benchmarks/data2vec2_vs.py --skip-tiny        # BASE step timings only

1. The corpus is prepared as `make demo` prepares it (skipped when WORK already holds it).
2. For each tiny preset, updates per second come from a calibration run (the time between its
   logged updates 10 and 30, so start-up is left out); it is then pretrained for budget x rate
   updates: the same wall-clock for each, and each with its whole learning-rate schedule.
3. Each is fine-tuned with `ctc_tiny` (identical settings) and evaluated with greedy decoding.
4. One training step (forward, backward, AdamW; data2vec: EMA teacher too) of each BASE model on
   2 x 10 s of audio, median of `--base-steps` after a warm-up step, each in its own process.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TINY = ("data2vec2_tiny", "data2vec_tiny", "wav2vec2_tiny")
BASE = ("data2vec2_base", "data2vec_base", "wav2vec2_base")
SPLITS = ("dev-clean", "dev-other", "test-clean", "test-other")


def sh(*args: str) -> None:
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def prepare(work: Path) -> None:
    if (work / "unlabelled" / "train.tsv").exists():
        return
    sh("-m", "data_prep", "toy", str(work / "corpus"))
    sh("-m", "data_prep", "librispeech", str(work / "corpus"), str(work / "manifests"),
       "--finetuning-root", str(work / "corpus" / "librispeech_finetuning"))
    sh("-m", "data_prep", "librilight", str(work / "corpus" / "librilight"), str(work / "librilight"), "--segment-seconds", "4")
    sh("-m", "data_prep", "merge", str(work / "manifests"), str(work / "librilight"), "--out", str(work / "unlabelled"),
       "--num-shards", "2", "--pack")


def metrics(run: Path, split: str = "train") -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def updates_per_second(work: Path, preset: str) -> float:
    run = work / f"calibrate-{preset}"
    sh("-m", "pretrain", "--preset", preset, "--data", str(work / "unlabelled"), "--out", str(run), "--max-steps", "30",
       "--set", "train.log_interval=10", "--set", "train.valid_interval=1000", "--set", "train.save_interval=1000")
    rows = {r["step"]: r["time"] for r in metrics(run)}
    return 20 / (rows[30] - rows[10])


def tiny_row(work: Path, preset: str, budget: float) -> dict:
    rate = updates_per_second(work, preset)
    steps = max(30, int(budget * rate))
    run, ctc = work / preset, work / f"ctc-{preset}"
    start = time.perf_counter()
    sh("-m", "pretrain", "--preset", preset, "--data", str(work / "unlabelled"), "--out", str(run), "--max-steps", str(steps))
    wall = time.perf_counter() - start
    rows = metrics(run)
    train_s = rows[-1]["time"] - rows[0]["time"]
    sh("-m", "finetune", "--preset", "ctc_tiny", "--init-from", str(run), "--data", str(work / "manifests"), "--out", str(ctc))
    out = work / f"eval-{preset}.json"
    sh("-m", "finetune.evaluate", str(ctc), "--data", str(work / "manifests"), "--out", str(out))
    cer = {s: r["cer"] for s, r in json.loads(out.read_text())["splits"].items()}
    return {"preset": preset, "updates_per_s": round(rate, 2), "updates": steps, "pretrain_wall_s": round(wall, 1),
            "pretrain_between_first_and_last_log_s": round(train_s, 1), "cer": cer}


def one_base_step(preset: str, steps: int) -> dict:
    import numpy as np
    import torch

    from data_prep.loader import Batch
    from pretrain.build import build_task
    from pretrain.presets import get_preset
    from pretrain.training.optimizer import build_optimizer

    cfg = get_preset(preset)
    torch.manual_seed(0)
    task = build_task(cfg.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task.to(device)
    model = task.model.train()
    opt = build_optimizer(model, cfg.optim, device)
    wav = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 160_000)).astype(np.float32))
    batch = Batch(wav, None, torch.arange(2))
    times = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        task.before_update(i)
        rec = task.train_step(model, batch, np.random.default_rng(i))
        (rec.loss / rec.sample_size).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        task.after_update(i + 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"preset": preset, "device": device.type, "step_s": round(step, 3), "s_per_audio_s": round(step / 20, 4),
            "peak_mem_mb": round(peak)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=150.0, help="pretraining seconds per objective")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "d2v2_vs")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "data2vec2_vs.json")
    p.add_argument("--base-steps", type=int, default=2)
    p.add_argument("--skip-tiny", action="store_true")
    p.add_argument("--one-base-step", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one_base_step:
        print(json.dumps(one_base_step(args.one_base_step, args.base_steps)))
        return
    import torch

    result: dict = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    if not args.skip_tiny:
        prepare(args.work)
        result["budget_s"] = args.budget
        result["tiny"] = [tiny_row(args.work, preset, args.budget) for preset in TINY]
    base = []
    for preset in BASE:
        cmd = [sys.executable, __file__, "--one-base-step", preset, "--base-steps", str(args.base_steps)]
        base.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout.splitlines()[-1]))
    result["base_step_2x10s"] = base
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
