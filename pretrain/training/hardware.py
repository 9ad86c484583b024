"""Per-process device settings in one place: the precision a run really trains in, the CPU
threads and loader workers each rank may use, and the `torch.backends` switches for GPUs."""

from __future__ import annotations

import ctypes
import logging
import os
import platform

import torch

log = logging.getLogger(__name__)


def resolve_precision(precision: str, bf16_for_fp16: bool, device: torch.device) -> tuple[str, str | None]:
    """(precision to train in, why it differs from the config's, or None).

    fairseq's recipes say fp16 because V100s had no bf16. On a GPU that has it, bf16 trains as
    fast without loss scaling or overflow skips, so fp16 becomes bf16 unless `train.bf16_for_fp16`
    is off. fp16 on a CPU has neither fast kernels nor a loss scaler here: fp32."""
    if precision != "fp16":
        return precision, None
    if device.type != "cuda":
        return "fp32", (f"train.precision=fp16 needs a CUDA GPU; this run is on {device.type} and trains in fp32 "
                        "instead (--set train.precision=bf16 gives mixed precision on a CPU, fp32 silences this)")
    if bf16_for_fp16 and torch.cuda.is_bf16_supported():
        return "bf16", ("train.precision=fp16 (the recipe's) runs as bf16 on this GPU: no loss scaling needed; "
                        "--set train.bf16_for_fp16=false keeps fp16 with dynamic loss scaling")
    return "fp16", None


def cpus_per_rank(local_world_size: int) -> int:
    """CPUs this rank may use: its affinity set when a launcher bound it (SLURM's --cpus-per-task),
    else an equal share of the node's CPUs among the ranks on it."""
    try:
        mine = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        mine = os.cpu_count() or 1
    if mine < (os.cpu_count() or mine):
        return max(1, mine)  # already bound to this rank's share
    return max(1, mine // max(1, local_world_size))


def local_world_size() -> int:
    env = os.environ
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(key, "").split("(")[0]  # SLURM may say "4(x2)"
        if value.isdigit():
            return int(value)
    return 1


def bound_threads(num_workers: int, device: torch.device) -> tuple[int, int]:
    """Set torch's intra-op threads for this rank and return (threads, loader workers).

    Unbounded, every rank and every loader worker starts one thread per CPU of the node, and on
    a multi-GPU node they starve each other and the GPUs (fairseq#3342). An `OMP_NUM_THREADS` the
    user set wins. On GPUs the step needs few host threads and the loader gets the rest; on CPUs
    the step gets them all."""
    share = cpus_per_rank(local_world_size())
    workers = min(num_workers, max(0, share - 1))
    if workers < num_workers:
        log.warning("data.num_workers=%d lowered to %d: this rank has %d CPU(s)", num_workers, workers, share)
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads(), workers
    threads = max(1, share - workers) if device.type == "cuda" else share
    torch.set_num_threads(threads)
    return threads, workers


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the kernel.

    By default every CPU tensor over 32 MB gets its own mmap and goes back with munmap when freed,
    so the next step's tensors are fresh pages: a BASE step on 2 x 10 s of audio takes ~450k page
    faults, 1-4 s of kernel time (measured), spent inside whichever kernel first writes the
    memory. Served from the heap and never trimmed, the pages are faulted once, at the first
    step; this is what the GPU's caching allocator does for device memory. The resident size
    then stays at the run's peak. True if the setting took (glibc on Linux)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def configure_backends(device: torch.device) -> None:
    """Host memory kept for reuse on CPUs (`retain_freed_memory`). GPU kernel choices: TF32 for
    the parts that run in fp32 (the conv front end's group norm, losses, the EMA teacher), SDPA
    free to take the flash or memory-efficient kernel, and no cuDNN autotuning (batch lengths
    vary, so it would re-tune at every new shape)."""
    if device.type == "cpu":
        retain_freed_memory()
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.enable_flash_sdp(True)
    torch.backends.cuda.enable_mem_efficient_sdp(True)
