"""One run per directory: an exclusive lock on `RUN/.lock`, taken before anything in the run is
read or written."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path

import torch

from pretrain.distributed import DistInfo, all_reduce_sum

log = logging.getLogger(__name__)
#: exit status of a run refused because another process holds its directory
BUSY = 2


class RunDirBusy(Exception):
    """Another live process holds the run directory."""


class RunLock:
    """An exclusive lock on a run directory, `RUN/.lock`: two processes writing one run mix their
    metrics, and one would resume from the other's live checkpoints.

    flock belongs to the open file, so the kernel drops it when the holder ends in any way,
    SIGKILL included: a dead run never leaves a stale lock. The file names the holder (pid,
    host, start time) for the message a refused process prints; it is never deleted, because
    removing a lock file races with a process that has just opened it."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Take the lock at once or raise RunDirBusy; nothing in the directory changes if refused."""
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "it has not written its name yet"
            os.close(fd)
            raise RunDirBusy(
                f"{run_dir} is in use by another run ({holder}). Two runs writing one directory would mix "
                "their metrics and checkpoints, so this one stops without touching it. Wait for that run to "
                "finish or stop it, then run the command again (it resumes); or pass another --out."
            ) from None
        except OSError as err:  # a filesystem without flock (some NFS and Lustre mounts)
            os.close(fd)
            log.warning("cannot lock %s (%s); nothing stops a second run from writing this directory",
                        path, err.strerror)
            return cls(None)
        os.ftruncate(fd, 0)
        holder = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.pwrite(fd, (holder + "\n").encode(), 0)
        return cls(fd)

    @classmethod
    def for_ranks(cls, run_dir: Path, info: DistInfo, device: torch.device) -> RunLock:
        """Rank 0 takes the lock (the other ranks would contend with it) and tells every rank
        whether it got it, so a refused DDP run stops on all ranks instead of hanging."""
        lock, busy = cls(None), None
        if info.is_main:
            try:
                lock = cls.acquire(run_dir)
            except RunDirBusy as err:
                busy = err
        if info.world_size > 1:
            refused = all_reduce_sum(torch.tensor([float(busy is not None)], device=device)).item() > 0
            if refused and busy is None:
                busy = RunDirBusy("rank 0 was refused the run directory")
        if busy is not None:
            raise busy
        return lock

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
