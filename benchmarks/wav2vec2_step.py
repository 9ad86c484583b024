"""wav2vec 2.0 BASE training step (forward, backward, AdamW) vs transformers' Wav2Vec2ForPreTraining.

    python benchmarks/wav2vec2_step.py [--steps 3] [--seconds 10] [--batch 2]

Both models get the same weights, batch, masks and negatives; each runs in its own process so
that its peak memory (RSS on CPU, allocator peak on GPU) is its own. LayerDrop is off in both so
that every step does the same work. Both use fused AdamW. Ours runs with the process settings a
training run of ours makes (`configure_backends`: on CPUs, freed host memory kept for reuse); on
CPUs a third process runs transformers with that setting too (`transformers_retained_memory`,
`speedup_same_allocator`), so the part of the ratio that is the setting shows. On a GPU the step
runs under bf16 autocast and the result also gives audio-seconds per second and MFU.
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


def _setup(args):
    import numpy as np
    import torch

    from pretrain.interop.hf import hf_config, to_hf
    from pretrain.models.wav2vec2 import Wav2Vec2Model
    from pretrain.objectives.masking import compute_mask_indices, sample_negatives
    from pretrain.presets import get_preset

    cfg = get_preset("wav2vec2_base").model
    cfg.encoder_layerdrop = 0.0
    torch.manual_seed(0)
    ours = Wav2Vec2Model(cfg)
    rng = np.random.default_rng(0)
    samples = int(args.seconds * 16000)
    wav = torch.from_numpy(rng.standard_normal((args.batch, samples)).astype(np.float32) * 0.1)
    frames = int(ours.feature_extractor.output_lengths(torch.tensor(samples)))
    mask = compute_mask_indices((args.batch, frames), None, cfg.mask_prob, cfg.mask_length, rng, min_masks=2)
    negs = sample_negatives(args.batch, int(mask[0].sum()), cfg.num_negatives, rng)
    hf_negs = np.zeros((args.batch, frames, cfg.num_negatives), dtype=np.int64)
    for b in range(args.batch):
        pos = np.nonzero(mask[b])[0]
        hf_negs[b, pos] = b * frames + pos[negs[b]]
    return cfg, ours, wav, torch.from_numpy(mask), torch.from_numpy(negs), torch.from_numpy(hf_negs), hf_config, to_hf


def run_one(args) -> dict:
    import torch

    from pretrain.training.hardware import configure_backends, retain_freed_memory

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.impl == "ours":
        configure_backends(device)  # what a training run of ours sets up (host memory reuse on CPUs)
    elif args.retain_memory:
        retain_freed_memory()  # transformers under our allocator setting, to show what the setting alone gives
    cfg, ours, wav, mask, negs, hf_negs, hf_config, to_hf = _setup(args)
    if args.impl == "hf":
        from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

        model = Wav2Vec2ForPreTraining(Wav2Vec2Config(**hf_config(cfg, False)))
        model.load_state_dict(to_hf(ours.state_dict(), "wav2vec2."))
        del ours

        def loss_fn():
            return model(wav, mask_time_indices=mask, sampled_negative_indices=hf_negs).loss
    else:
        from pretrain.objectives.wav2vec2_loss import wav2vec2_loss

        model = ours

        def loss_fn():
            out = model(wav, None, mask, negs)
            return wav2vec2_loss(out, cfg.diversity_weight, cfg.feature_pen_weight).loss

    model.to(device).train()
    wav, mask, negs, hf_negs = (t.to(device) for t in (wav, mask, negs, hf_negs))
    # the fused kernel on both sides: our trainer's optimizer and transformers' Trainer default
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, fused=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    times = []
    for i in range(args.steps + 1):  # the first step warms up and is not timed
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    result = {"impl": args.impl, "device": device.type, "step_s": statistics.median(times), "steps": times}
    if device.type == "cuda":
        result["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=2, help="timed steps per process (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=2, help="processes per implementation, alternating")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--impl", choices=["ours", "hf"], default=None, help="run one side only (internal)")
    p.add_argument("--retain-memory", action="store_true", help="with --impl hf: our host-memory setting (internal)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "wav2vec2_step.json")
    args = p.parse_args()
    if args.impl:
        print(json.dumps(run_one(args)))
        return
    # Alternate the two so that a slow spell of a shared machine hits both alike.
    results: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name in ("hf", "ours", "hf_retained"):
            cmd = [sys.executable, __file__, "--impl", name.removesuffix("_retained"), "--steps", str(args.steps), "--seconds",
                   str(args.seconds), "--batch", str(args.batch)] + (["--retain-memory"] if name == "hf_retained" else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            one = json.loads(proc.stdout.strip().splitlines()[-1])
            if one["device"] != "cpu" and name == "hf_retained":
                continue  # a host-memory setting: nothing to compare on a GPU
            seen = results.setdefault(name, {"steps": [], "peak_mem_mb": 0.0, "device": one["device"]})
            seen["steps"] += one["steps"]
            seen["peak_mem_mb"] = max(seen["peak_mem_mb"], one["peak_mem_mb"])
    for seen in results.values():
        seen["step_s"] = statistics.median(seen["steps"])
    import torch

    ours, hf = results["ours"], results["hf"]
    summary = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "device": ours["device"],
        "batch": f"{args.batch} x {args.seconds:g} s",
        "timed_steps_each": len(ours["steps"]),
        "step_s": {"ours": round(ours["step_s"], 3), "transformers": round(hf["step_s"], 3)},
        "speedup": round(hf["step_s"] / ours["step_s"], 2),
        "peak_mem_mb": {"ours": round(ours["peak_mem_mb"]), "transformers": round(hf["peak_mem_mb"])},
        "memory_ratio": round(ours["peak_mem_mb"] / hf["peak_mem_mb"], 2),
        "targets": {"speedup_cpu": 2.0, "memory_ratio_below": 1.0},
    }
    if "hf_retained" in results:
        # Our runs keep freed host memory for reuse (pretrain.training.hardware.retain_freed_memory);
        # transformers given the same setting shows how much of the speedup is that setting.
        same = results["hf_retained"]
        summary["step_s"]["transformers_retained_memory"] = round(same["step_s"], 3)
        summary["speedup_same_allocator"] = round(same["step_s"] / ours["step_s"], 2)
        summary["peak_mem_mb"]["transformers_retained_memory"] = round(same["peak_mem_mb"])
    if ours["device"] == "cuda":
        from pretrain.models.flops import peak_flops, train_flops_per_audio_second
        from pretrain.presets import get_preset

        audio_per_s = args.batch * args.seconds / ours["step_s"]
        peak = peak_flops(torch.device("cuda"))
        summary["audio_s_per_s"] = round(audio_per_s, 1)
        if peak:
            summary["mfu"] = round(audio_per_s * train_flops_per_audio_second(get_preset("wav2vec2_base").model) / peak, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
