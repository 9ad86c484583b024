"""Writing a recording's segments: one sequential decode, one segment in memory at a time."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf

from .audio import FLOAT_SUBTYPES, SAMPLE_RATE, AudioError, check_samples, describe_error, to_pcm16
from .fsutil import atomic_write_with

_BLOCK = 1 << 18


def cut_recording(src: str, segments: list[list[tuple[int, int]]], out_dir: Path, stem: str) -> list[tuple[str, int, int]]:
    """Write segment k (the samples of its ranges, concatenated) as `out_dir/{stem}_{k:04d}.flac`.

    `src` is 16 kHz mono; the ranges are sorted and disjoint (`vad.plan_segments`). The whole
    file is decoded once, so damage anywhere in it is found; a file that does not decode to its
    declared length raises `AudioError("truncated")` and leaves none of its segments behind.
    Returns (path, samples, bytes) per segment.
    """
    ranges = [(k, a, b) for k, seg in enumerate(segments) for a, b in seg]
    lengths = [sum(b - a for a, b in seg) for seg in segments]
    written: list[tuple[str, int, int]] = []
    try:
        with sf.SoundFile(src) as f:
            declared = f.frames
            is_float = f.subtype in FLOAT_SUBTYPES
            r, pos = 0, 0
            buf, filled = None, 0
            try:
                for block in f.blocks(blocksize=_BLOCK, dtype="float32" if is_float else "int16"):
                    if is_float:
                        check_samples(block, pos)
                        block = to_pcm16(block)
                    lo, hi = pos, pos + len(block)
                    while r < len(ranges) and ranges[r][1] < hi:
                        k, a, b = ranges[r]
                        if buf is None:
                            buf, filled = np.empty(lengths[k], dtype=np.int16), 0
                        s, e = max(a, lo), min(b, hi)
                        buf[filled : filled + e - s] = block[s - lo : e - lo]
                        filled += e - s
                        if b > hi:
                            break  # the range goes on in the next block
                        r += 1
                        if r == len(ranges) or ranges[r][0] != k:
                            written.append(_write_segment(buf, out_dir, f"{stem}_{k:04d}.flac"))
                            buf = None
                    pos = hi
            except AudioError:
                raise
            except Exception as err:
                raise AudioError("truncated", f"decoding failed after {pos} of {declared} samples "
                                 f"({describe_error(err, src)})") from err
            if pos != declared and declared < 1 << 62:
                raise AudioError("truncated", f"header declares {declared} samples but {pos} decode")
            if r < len(ranges):
                raise AudioError("truncated", f"the audio ends at sample {pos}, inside a voice-activity chunk")
    except AudioError:
        for path, _, _ in written:
            Path(path).unlink(missing_ok=True)
        raise
    except Exception as err:  # opening failed
        raise AudioError("unreadable", describe_error(err, src)) from err
    return written


def _write_segment(samples: np.ndarray, out_dir: Path, name: str) -> tuple[str, int, int]:
    path = out_dir / name
    atomic_write_with(path, lambda tmp: sf.write(tmp, samples, SAMPLE_RATE, format="FLAC", subtype="PCM_16"))
    return str(path), len(samples), os.path.getsize(path)
