"""data2vec LARGE training step vs transformers' Data2VecAudioModel forward + backward.

    python benchmarks/data2vec_step.py [--steps 1] [--seconds 10] [--batch 1]

Ours: student forward on the masked input, EMA-teacher forward on the unmasked input, regression
loss, backward, AdamW step and EMA update. transformers has no data2vec pretraining head, so its
side is the encoder's forward + backward on the same batch (a squared-output loss), with no
teacher and no optimizer. `ours_encoder` does exactly that work with our model, for a like-for-like
ratio; the full step is reported beside it. Each side runs in its own process, alternating over
`--rounds`, and the medians are compared; peak memory is RSS on CPU and the allocator peak on GPU.
LayerDrop is off in both. Ours runs with the process settings a training run of ours makes (on
CPUs: freed host memory kept for reuse); on CPUs transformers also runs once more with that
setting (`speedup_same_allocator`), as in `wav2vec2_step.py`.
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


def run_one(args) -> dict:
    import numpy as np
    import torch

    from pretrain.interop.hf import hf_config, to_hf
    from pretrain.presets import get_preset
    from pretrain.training.hardware import configure_backends, retain_freed_memory

    cfg = get_preset("data2vec_large").model
    cfg.encoder_layerdrop = 0.0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.impl != "hf":
        configure_backends(device)  # what a training run of ours sets up
    elif args.retain_memory:
        retain_freed_memory()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    wav = torch.from_numpy(rng.standard_normal((args.batch, int(args.seconds * 16000))).astype(np.float32))
    if args.impl == "ours_encoder":  # the same work as the transformers side
        from pretrain.models.data2vec import Data2VecModel

        model = Data2VecModel(cfg).to(device).train()
        wav = wav.to(device)

        def step():
            loss = model(wav).encoder_out.float().pow(2).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
    elif args.impl == "hf":
        from transformers import Data2VecAudioConfig, Data2VecAudioModel

        from pretrain.models.data2vec import Data2VecModel

        ours = Data2VecModel(cfg)
        model = Data2VecAudioModel(Data2VecAudioConfig(**hf_config(cfg, True)))
        model.load_state_dict(to_hf({k: v for k, v in ours.state_dict().items() if not k.startswith("final_proj.")}, ""))
        del ours
        model.to(device).train()
        wav = wav.to(device)

        def step():
            loss = model(wav).last_hidden_state.float().pow(2).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
    else:
        from data_prep.loader import Batch
        from pretrain.objectives.data2vec_task import Data2VecTask

        task = Data2VecTask(cfg).to(device)
        model = task.model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, fused=True)
        batch = Batch(wav, None, torch.arange(args.batch))
        count = [0]

        def step():
            rec = task.train_step(model, batch, np.random.default_rng(count[0]))
            (rec.loss / rec.sample_size).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            count[0] += 1
            task.after_update(count[0])

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    times = []
    for i in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"impl": args.impl, "device": device.type, "steps": times, "peak_mem_mb": peak}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=2, help="timed steps per process (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=2, help="processes per implementation, alternating")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--impl", choices=["ours", "ours_encoder", "hf"], default=None)
    p.add_argument("--retain-memory", action="store_true", help="with --impl hf: our host-memory setting (internal)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "data2vec_step.json")
    args = p.parse_args()
    if args.impl:
        print(json.dumps(run_one(args)))
        return
    res: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name in ("hf", "ours_encoder", "ours", "hf_retained"):
            cmd = [sys.executable, __file__, "--impl", name.removesuffix("_retained"), "--steps", str(args.steps),
                   "--seconds", str(args.seconds), "--batch", str(args.batch)]
            one = json.loads(subprocess.run(cmd + (["--retain-memory"] if name == "hf_retained" else []),
                                            capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            if name == "hf_retained" and one["device"] != "cpu":
                continue  # a host-memory setting: nothing to compare on a GPU
            seen = res.setdefault(name, {"steps": [], "peak_mem_mb": 0.0, "device": one["device"]})
            seen["steps"] += one["steps"]
            seen["peak_mem_mb"] = max(seen["peak_mem_mb"], one["peak_mem_mb"])
    ours, enc, hf = (statistics.median(res[k]["steps"]) for k in ("ours", "ours_encoder", "hf"))
    import torch

    summary = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "device": res["ours"]["device"],
        "batch": f"{args.batch} x {args.seconds:g} s",
        "step_s": {
            "ours_full_step_with_teacher_and_adamw": round(ours, 3),
            "ours_encoder_forward_backward": round(enc, 3),
            "transformers_forward_backward": round(hf, 3),
        },
        "speedup_same_work": round(hf / enc, 2),
        "peak_mem_mb": {k: round(res[k]["peak_mem_mb"]) for k in ("ours", "ours_encoder", "hf")},
        "timed_steps_each": len(res["ours"]["steps"]),
    }
    if "hf_retained" in res:
        same = statistics.median(res["hf_retained"]["steps"])
        summary["step_s"]["transformers_forward_backward_retained_memory"] = round(same, 3)
        summary["speedup_same_allocator"] = round(same / enc, 2)
        summary["peak_mem_mb"]["hf_retained"] = round(res["hf_retained"]["peak_mem_mb"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
