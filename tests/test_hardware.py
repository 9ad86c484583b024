"""Per-process device settings: the precision a run trains in, threads and loader workers per rank."""

import os
import subprocess
import sys

import torch

from pretrain.training import hardware


def test_fp16_recipes_train_in_bf16_on_gpus_that_have_it(monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # no GPU here
    precision, why = hardware.resolve_precision("fp16", True, gpu)
    assert precision == "bf16" and "bf16_for_fp16=false" in why
    assert hardware.resolve_precision("fp16", False, gpu) == ("fp16", None)  # the option keeps fp16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a V100
    assert hardware.resolve_precision("fp16", True, gpu) == ("fp16", None)
    assert hardware.resolve_precision("fp32", True, gpu) == ("fp32", None)
    assert hardware.resolve_precision("fp16", True, torch.device("cpu"))[0] == "fp32"
    assert hardware.resolve_precision("bf16", True, torch.device("cpu")) == ("bf16", None)


def test_ranks_share_the_node_cpus(monkeypatch):
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    assert hardware.local_world_size() == 1
    assert hardware.cpus_per_rank(1) == cpus
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8(x2)")
    assert hardware.local_world_size() == 8
    assert hardware.cpus_per_rank(8) == max(1, cpus // 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's, first
    assert hardware.local_world_size() == 2
    # a launcher already bound this process to fewer CPUs than the node has: that set is its share
    monkeypatch.setattr(os, "cpu_count", lambda: 4 * cpus)
    assert hardware.cpus_per_rank(2) == cpus


def test_threads_and_workers_are_bounded_per_rank():
    """In a fresh process (threads are per process): 64 ranks on this node leave one CPU each,
    so the loader gets no worker processes; OMP_NUM_THREADS set by the user is kept."""
    code = ("import torch; from pretrain.training import hardware as h; "
            "print(h.bound_threads(6, torch.device('cuda')), h.bound_threads(6, torch.device('cpu')), torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, LOCAL_WORLD_SIZE="64"), capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.split() == ["(1,", "0)", "(1,", "0)", "1"], out.stdout
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, LOCAL_WORLD_SIZE="1", OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    cpus = len(os.sched_getaffinity(0))
    assert out.stdout.split()[:2] == ["(1,", f"{min(6, max(0, cpus - 1))})"], out.stdout


def test_cpu_runs_reuse_freed_memory_without_page_faults():
    """Steps that make and free the same large activations fault their pages in once, not at
    every step (glibc, Linux); in a fresh process, because the setting is process-wide."""
    import platform

    code = """
import resource, sys, torch
from pretrain.training import hardware
if sys.argv[1] == "on":
    assert hardware.retain_freed_memory()
def step():  # a training step's pattern: large activations made, then all freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    xs = [torch.ones(16 * 2**20) for _ in range(4)]  # 4 x 64 MB
    ys = [x * 2 for x in xs]
    del xs, ys
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(min(step() for _ in range(8)))
"""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        assert not hardware.retain_freed_memory()
        return
    faults = {}
    for mode in ("off", "on"):
        proc = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120, check=False,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert proc.returncode == 0, proc.stderr[-2000:]
        faults[mode] = int(proc.stdout.split()[-1])
    # 512 MB made per step: 131072 faults with 4 KB pages, 256 with transparent huge pages; kept, ~none
    assert faults["off"] >= 200 and faults["on"] <= faults["off"] // 20, faults
