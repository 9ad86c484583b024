"""What both synthetic corpora share: eSpeak NG "speakers", and synthesis in a fresh interpreter."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

VOICES = ("en-us", "en", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc", "en-gb-x-gbclan")
VARIANTS = ("", "+f1", "+f2", "+f3", "+f4", "+m1", "+m2", "+m3", "+m4", "+m6")


@dataclass(frozen=True)
class Speaker:
    speaker_id: int
    voice: str
    rate_wpm: int
    pitch: int
    snr_db: float | None  # None: clean


def in_fresh_process(fn, *args):
    """Run `fn(*args)` in a new interpreter (not a fork, which would inherit eSpeak's state)."""
    package_parent = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
    code = "import pickle, sys; fn, args = pickle.load(sys.stdin.buffer); pickle.dump(fn(*args), sys.stdout.buffer)"
    proc = subprocess.run(
        [sys.executable, "-c", code], input=pickle.dumps((fn, args)), capture_output=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"speech synthesis failed:\n{proc.stderr.decode(errors='replace')[-2000:]}")
    return pickle.loads(proc.stdout)
