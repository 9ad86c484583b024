"""What a job asks of the cluster, and a check against what the cluster has (before submitting).

SLURM keeps a job that can never run pending without complaint (e.g. more GPUs per node than
any node has); `check_request` turns that into an error at submission.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass


class ClusterError(ValueError):
    """A request this cluster cannot satisfy, or no SLURM to ask."""


@dataclass
class Resources:
    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: int | None = None
    """Default: one task per GPU (one on CPU-only jobs)."""
    cpus_per_task: int = 10
    partition: str | None = None
    time_min: int = 4320
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem_gb: float | None = None
    signal_delay_s: int = 120
    """The time-limit warning (USR2) comes this long before the kill: one update plus a save must fit."""

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node


@dataclass
class Partition:
    name: str
    default: bool
    nodes: int
    cpus: int
    gpus: int
    mem_mb: int


def _gpus(gres: str) -> int:
    """`gpu:8`, `gpu:a100:8(S:0-1)`, `(null)` -> GPUs per node."""
    total = 0
    for item in gres.split(","):
        m = re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())
        if m:
            total += int(m.group(1))
    return total


def partitions() -> dict[str, Partition]:
    """The cluster's partitions from `sinfo` (the largest node of each, where node kinds differ)."""
    if shutil.which("sinfo") is None:
        raise ClusterError("no SLURM here (sinfo not found): run on a cluster login node, or pass --local")
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P|%D|%c|%G|%m"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        raise ClusterError(f"cannot ask SLURM for its partitions: {err}") from err
    if out.returncode != 0:
        last = (out.stderr.strip() or out.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise ClusterError(f"cannot reach SLURM (sinfo: {last[0]}): run on a cluster login node, or pass --local")
    parts: dict[str, Partition] = {}
    for line in out.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5:
            continue
        name, nodes, cpus, gres, mem = fields
        default = name.endswith("*")
        name = name.rstrip("*")
        p = Partition(name, default, int(nodes), int(cpus.rstrip("+")), _gpus(gres), int(re.sub(r"\D", "", mem) or 0))
        if name in parts:
            q = parts[name]
            p = Partition(name, default or q.default, p.nodes + q.nodes, max(p.cpus, q.cpus),
                          max(p.gpus, q.gpus), max(p.mem_mb, q.mem_mb))
        parts[name] = p
    if not parts:
        raise ClusterError("sinfo lists no partitions")
    return parts


def check_request(r: Resources, available: dict[str, Partition]) -> Partition:
    """The partition the job goes to; ClusterError if it could never start there."""
    names = ", ".join(f"{p.name}{' (default)' if p.default else ''}" for p in available.values())
    if r.partition is None:
        default = [p for p in available.values() if p.default]
        if not default:
            raise ClusterError(f"this cluster has no default partition: pass --partition (one of {names})")
        part = default[0]
    elif r.partition not in available:
        raise ClusterError(f"unknown partition {r.partition!r}; this cluster has: {names}")
    else:
        part = available[r.partition]
    if r.nodes > part.nodes:
        raise ClusterError(f"--nodes {r.nodes}: partition {part.name} has {part.nodes} node(s)")
    if r.gpus_per_node > part.gpus:
        raise ClusterError(
            f"--gpus-per-node {r.gpus_per_node}: nodes of partition {part.name} have {part.gpus} GPU(s); "
            "the job would wait forever (use --gpus-per-node 0 to run on CPUs)"
        )
    cpus = r.cpus_per_task * r.ntasks_per_node
    if cpus > part.cpus:
        raise ClusterError(
            f"{r.ntasks_per_node} task(s) x --cpus-per-task {r.cpus_per_task} = {cpus} CPUs per node; "
            f"nodes of partition {part.name} have {part.cpus}"
        )
    if r.mem_gb and part.mem_mb and r.mem_gb * 1024 > part.mem_mb:
        raise ClusterError(f"--mem {r.mem_gb:g} GB: nodes of partition {part.name} have {part.mem_mb / 1024:.1f} GB")
    return part
