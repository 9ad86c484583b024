"""Process pools for data preparation: one worker per core, killable, and a serial stand-in."""

from __future__ import annotations

import multiprocessing
import signal
from typing import Callable, Iterable, Iterator


def worker_signals() -> None:
    """Pool workers die on SIGTERM: a forked worker inherits its parent's handlers (submitit's
    ignores SIGTERM), and `Pool.__exit__` ends its workers with SIGTERM, then waits for them."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)


class Serial:
    """The part of `multiprocessing.Pool` used here, in this process (no fork for one worker)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap_unordered(self, fn, items, chunksize=1):
        return map(fn, items)


def pool(workers: int):
    """A fork pool of `workers` processes, or `Serial()` for one."""
    if workers > 1:
        return multiprocessing.get_context("fork").Pool(workers, worker_signals)
    return Serial()


def run_unordered(fn: Callable, tasks: Iterable, workers: int, chunksize: int = 1) -> Iterator:
    """`fn(task)` for every task, results as they finish."""
    tasks = list(tasks)
    with pool(min(workers, max(1, len(tasks)))) as p:
        yield from p.imap_unordered(fn, tasks, chunksize=chunksize)
