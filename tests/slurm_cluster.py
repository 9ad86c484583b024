"""A real single-node SLURM on localhost (Debian's slurm-wlm + munge), for the tests.

Everything lives under one directory; daemons run as root without systemd and are stopped by
their PID files (slurmd before slurmctld). `.ci/run` installs the packages.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

CONF = """ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={s}/munge/munge.socket
StateSaveLocation={s}/state
SlurmdSpoolDir={s}/spool
SlurmctldPidFile={s}/slurmctld.pid
SlurmdPidFile={s}/slurmd.pid
SlurmctldLogFile={s}/log/slurmctld.log
SlurmdLogFile={s}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=20
MinJobAge=600
NodeName=localhost CPUs={cpus} RealMemory=20000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
DAEMONS = ("munged", "slurmctld", "slurmd")


class SlurmUnavailable(RuntimeError):
    pass


def _which(name: str) -> str:
    for d in (os.environ.get("PATH", "").split(os.pathsep) + ["/usr/sbin", "/sbin"]):
        p = Path(d) / name
        if p.exists():
            return str(p)
    raise SlurmUnavailable(f"{name} not found: install Debian's slurm-wlm and munge (apt-get install slurm-wlm munge)")


def start(base: Path) -> dict[str, str]:
    """Start munged, slurmctld and slurmd under `base`; returns the environment clients need."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("the local SLURM runs its daemons as root")
    binaries = {name: _which(name) for name in DAEMONS}
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    for sub in ("munge", "state", "spool", "log"):
        (base / sub).mkdir(exist_ok=True)
    os.chmod(base / "munge", 0o755)
    key_dir = base / "munge" / "key"
    key_dir.mkdir(mode=0o700, exist_ok=True)
    key = key_dir / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
    conf = base / "slurm.conf"
    conf.write_text(CONF.format(s=base, cpus=os.cpu_count() or 2))
    env = dict(os.environ, SLURM_CONF=str(conf))
    m = base / "munge"
    subprocess.run([binaries["munged"], f"--socket={m}/munge.socket", f"--key-file={key}", f"--log-file={m}/munged.log",
                    f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed", "--force"],
                   check=True, env=env, capture_output=True, timeout=30)
    subprocess.run([binaries["slurmctld"]], check=True, env=env, capture_output=True, timeout=30)
    subprocess.run([binaries["slurmd"], "-N", "localhost"], check=True, env=env, capture_output=True, timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc"):
            return env
        time.sleep(0.5)
    stop(base)
    raise SlurmUnavailable(f"the local SLURM did not come up; see {base / 'log'}")


def _kill(pid_file: Path, timeout: float = 20.0) -> None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


def stop(base: Path) -> None:
    """Cancel what is left, then stop slurmd, slurmctld and munged by their PID files."""
    env = dict(os.environ, SLURM_CONF=str(base / "slurm.conf"))
    if shutil.which("scancel"):
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True, timeout=30)
    _kill(base / "slurmd.pid")
    _kill(base / "slurmctld.pid")
    _kill(base / "munge" / "munged.pid")
