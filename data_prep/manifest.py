"""fairseq/fairseq2 audio manifests: first line the root directory, then `relpath<TAB>num_samples`.

A path that is absolute is kept as is: `os.path.join(root, path)` (fairseq) and
`Path(root) / path` (fairseq2) both return it unchanged, which is how converted copies written
outside the corpus root are listed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .fsutil import atomic_open


@dataclass
class Manifest:
    """An ordered list of utterances under one root."""

    root: str
    paths: list[str] = field(default_factory=list)
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    lines: list[int] | None = None
    """Line number of each utterance in the file it was read from (None: not read from a file)."""

    def __len__(self) -> int:
        return len(self.paths)

    def line_number(self, i: int) -> int:
        """Where utterance i is in its manifest file (line 1 is the root)."""
        return self.lines[i] if self.lines is not None else i + 2

    def full_path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def utterance_id(self, i: int) -> str:
        return utterance_id(self.paths[i])


def utterance_id(path: str) -> str:
    """`train-clean-100/103/1240/103-1240-0000.flac` -> `103-1240-0000`."""
    name = os.path.basename(path)
    return name.split(".", 1)[0]


def write_manifest(path: str | os.PathLike, root: str, rows: list[tuple[str, int]]) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(f"{root}\n")
        for rel, n in rows:
            f.write(f"{rel}\t{n}\n")


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Parse a manifest; a malformed line raises with its file and line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist; run `python -m data_prep` first")
    with open(path, encoding="utf-8") as f:
        root = f.readline().rstrip("\n")
        paths: list[str] = []
        sizes: list[int] = []
        lines: list[int] = []
        for lineno, line in enumerate(f, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) < 2 or not parts[1].isdigit():
                raise ValueError(
                    f"{path}:{lineno}: expected `relpath<TAB>num_samples`, got {line[:80]!r}"
                )
            paths.append(parts[0])
            sizes.append(int(parts[1]))
            lines.append(lineno)
    return Manifest(root=root, paths=paths, sizes=np.asarray(sizes, dtype=np.int64), lines=lines)


def write_lines(path: str | os.PathLike, lines: list[str]) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")


def read_lines(path: str | os.PathLike) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]
