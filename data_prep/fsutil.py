"""Atomic file writing: a reader (or a re-run after a crash) never sees a half-written file."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import IO, Callable, Iterator


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_beside(path)
    try:
        f = open(fd, mode, **kwargs)
    except BaseException:  # e.g. a bad mode: the descriptor is not closed for us
        os.close(fd)
        os.unlink(tmp)
        raise
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _create_beside(path: Path) -> tuple[int, Path]:
    """Create a new, empty temporary file next to `path`; return its descriptor and name.

    The file gets mode 0o666 minus the umask, as a plain open() would give: tempfile.mkstemp
    makes it 0600, and the rename would carry that onto manifests and exports others must read.
    """
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue  # another writer drew the same name
    raise FileExistsError(f"could not create a temporary file beside {path}")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_with(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Atomic writing for libraries that only take a file name: `write(name)` writes a temporary
    file beside `path`, which is then given the umask's permissions and renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())  # safetensors, for one, creates its files 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (no race with other threads)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
