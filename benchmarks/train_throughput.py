"""Training throughput, MFU, peak memory and the largest batch that fits, on whatever device is here.

    python benchmarks/train_throughput.py [--presets wav2vec2_base,...] [--variants eager,compiled,...]
        [--seconds S] [--batch B] [--steps N] [--max-batch] [--out FILE]

For each preset (default: wav2vec2_base, wav2vec2_large_lv60k, data2vec_base, data2vec_large) and
variant, one process times full training steps of ours (forward, backward, AdamW; data2vec: the
EMA teacher's forward and update too) and of transformers' model of the same architecture on the
same device and batch: `Wav2Vec2ForPreTraining` with the same masks and negatives for wav2vec 2.0,
`Data2VecAudioModel` forward + backward for data2vec (transformers has no data2vec objective, so
its side does less work than ours). Variants:
- `eager`: the default model;
- `compiled`: `train.compile` (transformer blocks as torch.compile graphs);
- `checkpointed`: `train.activation_checkpointing`;
- `fsdp`: `train.parallelism=fsdp` (FSDP2) on a one-rank process group: on one device it measures
  what the sharding machinery costs (all-gathers, reduce-scatters and the mixed-precision casts
  become copies), not what sharding saves on many.
GPUs run under bf16 autocast, CPUs in fp32; LayerDrop is off so every step does the same work.
`--max-batch` (CUDA) doubles the batch until a step runs out of memory, then bisects.
Results go to `benchmarks/results/train_throughput-<device>.json` with the device name.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PRESETS = ("wav2vec2_base", "wav2vec2_large_lv60k", "data2vec_base", "data2vec_large")
VARIANTS = ("eager", "compiled", "checkpointed", "fsdp")


class Unavailable(Exception):
    """A variant this build cannot run, with the reason."""


def _batch(cfg, batch: int, seconds: float, rng):
    import numpy as np
    import torch

    from data_prep.loader import Batch

    wav = torch.from_numpy(rng.standard_normal((batch, int(seconds * 16000))).astype(np.float32) * 0.1)
    return Batch(wav, None, torch.arange(batch))


def _ours(preset: str, variant: str, device):
    """A step function for our task in this variant."""
    import numpy as np

    from pretrain.build import build_task
    from pretrain.models.encoder import set_activation_checkpointing
    from pretrain.presets import get_preset
    from pretrain.training.optimizer import build_optimizer

    cfg = get_preset(preset)
    cfg.model.encoder_layerdrop = 0.0
    task = build_task(cfg.model).to(device)
    set_activation_checkpointing(task.model, variant == "checkpointed")
    if variant == "fsdp":
        _shard_one_rank(task, device)
    if variant == "compiled":
        try:
            from pretrain.models.compiled import compile_task
        except ImportError as err:
            raise Unavailable(f"train.compile is not in this build ({err})") from None
        compile_task(task, True, device)
    model = task.model.train()
    opt = build_optimizer(model, cfg.optim, device)
    count = [0]

    def step(batch):
        task.before_update(count[0])
        rec = task.train_step(model, batch, np.random.default_rng(count[0]))
        (rec.loss / rec.sample_size).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        count[0] += 1
        task.after_update(count[0])

    return cfg, task.train_flops_per_audio_second(), step


def _shard_one_rank(task, device) -> None:
    """`train.parallelism=fsdp` as the trainer applies it, on a process group of one rank."""
    import os
    import socket

    import torch.distributed as dist

    from pretrain.distributed import DistInfo
    from pretrain.training import parallel

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    parallel.fully_shard_task(task, device, DistInfo(0, 1, 0), "bf16" if device.type == "cuda" else "fp32")


def _transformers(preset: str, device):
    """transformers' model of the preset's architecture, with our initial weights, and its step."""
    import numpy as np
    import torch

    from pretrain.interop.hf import hf_config, to_hf
    from pretrain.objectives.masking import compute_mask_indices, sample_negatives
    from pretrain.presets import get_preset

    cfg = get_preset(preset)
    m = cfg.model
    m.encoder_layerdrop = 0.0
    if m.arch == "wav2vec2":
        from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

        from pretrain.models.wav2vec2 import Wav2Vec2Model

        model = Wav2Vec2ForPreTraining(Wav2Vec2Config(**hf_config(m, False)))
        model.load_state_dict(to_hf(Wav2Vec2Model(m).state_dict(), "wav2vec2."))
    else:
        from transformers import Data2VecAudioConfig, Data2VecAudioModel

        from pretrain.models.data2vec import Data2VecModel

        model = Data2VecAudioModel(Data2VecAudioConfig(**hf_config(m, True)))
        ours = {k: v for k, v in Data2VecModel(m).state_dict().items() if not k.startswith("final_proj.")}
        model.load_state_dict(to_hf(ours, ""))
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay, fused=device.type in ("cuda", "cpu") or None)

    def step(batch):
        wav = batch.source.to(device)
        if m.arch == "wav2vec2":
            rng = np.random.default_rng(0)
            b, frames = wav.shape[0], int(model.wav2vec2._get_feat_extract_output_lengths(wav.shape[1]))
            mask = compute_mask_indices((b, frames), None, m.mask_prob, m.mask_length, rng, min_masks=2)
            negs = sample_negatives(b, int(mask[0].sum()), m.num_negatives, rng)
            hf_negs = np.zeros((b, frames, m.num_negatives), dtype=np.int64)
            for i in range(b):
                pos = np.nonzero(mask[i])[0]
                hf_negs[i, pos] = i * frames + pos[negs[i]]
            loss = model(wav, mask_time_indices=torch.from_numpy(mask).to(device),
                         sampled_negative_indices=torch.from_numpy(hf_negs).to(device)).loss
        else:
            loss = model(wav).last_hidden_state.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return cfg, None, step


def _time(step, batch, steps: int, device) -> float:
    import torch

    times = []
    for i in range(steps + 1):  # the first step warms up (and compiles) and is not timed
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _largest_batch(step, cfg, seconds: float, device, limit: int = 512) -> int:
    """The largest batch of `seconds`-long utterances one step runs with (CUDA), by doubling then bisecting."""
    import numpy as np
    import torch

    def fits(b: int) -> bool:
        try:
            _time(step, _batch(cfg, b, seconds, np.random.default_rng(0)), 0, device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    good, bad = 0, None
    b = 1
    while b <= limit and fits(b):
        good, b = b, b * 2
    bad = b if b <= limit else None
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def run_one(args) -> dict:
    import numpy as np
    import torch

    from pretrain.models.flops import peak_flops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    row = {"preset": args.preset, "variant": args.variant, "impl": args.impl}
    try:
        cfg, flops, step = _transformers(args.preset, device) if args.impl == "transformers" else \
            _ours(args.preset, args.variant, device)
    except Unavailable as why:
        return dict(row, unavailable=str(why))
    step_s = _time(step, _batch(cfg, args.batch, args.seconds, np.random.default_rng(0)), args.steps, device)
    audio = args.batch * args.seconds / step_s
    row.update(step_s=round(step_s, 4), audio_s_per_s_per_device=round(audio, 2))
    peak = peak_flops(device)
    row["mfu"] = round(audio * flops / peak, 4) if flops and peak else None
    row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if args.max_batch and device.type == "cuda":
        row["max_batch"] = _largest_batch(step, cfg, args.seconds, device)
    return row


def main() -> None:
    import torch

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser()
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seconds", type=float, default=15.0 if cuda else 4.0, help="utterance length")
    p.add_argument("--batch", type=int, default=8 if cuda else 1)
    p.add_argument("--steps", type=int, default=5 if cuda else 1, help="timed steps after one warm-up step")
    p.add_argument("--max-batch", action="store_true", help="also search the largest batch that fits (CUDA)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.preset:
        print(json.dumps(run_one(args)))
        return
    device_name = torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    rows = []
    for preset in args.presets.split(","):
        jobs = [("transformers", "eager")] + [("ours", v) for v in args.variants.split(",")]
        for impl, variant in jobs:
            cmd = [sys.executable, __file__, "--preset", preset, "--variant", variant, "--impl", impl,
                   "--seconds", str(args.seconds), "--batch", str(args.batch), "--steps", str(args.steps)]
            cmd += ["--max-batch"] if args.max_batch else []
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                row = {"preset": preset, "variant": variant, "impl": impl,
                       "failed": (proc.stderr.strip().splitlines() or ["?"])[-1]}
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    ratios: dict = {}
    for preset in args.presets.split(","):
        ref = next((r for r in rows if r["preset"] == preset and r["impl"] == "transformers" and "step_s" in r), None)
        for r in rows:
            if ref and r["preset"] == preset and r["impl"] == "ours" and "step_s" in r:
                ratios.setdefault(preset, {})[r["variant"]] = {
                    "speedup_vs_transformers": round(ref["step_s"] / r["step_s"], 2),
                    "memory_ratio": round(r["peak_mem_mb"] / ref["peak_mem_mb"], 2)}
    result = {"device": device_name, "torch": torch.__version__, "precision": "bf16 autocast" if cuda else "fp32",
              "batch": f"{args.batch} x {args.seconds:g} s", "timed_steps": args.steps, "rows": rows, "ratios": ratios}
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    out = args.out or ROOT / "benchmarks" / "results" / f"train_throughput-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
