"""Cutting a long recording into training segments by its voice-activity chunks.

The rule is libri-light's `cut_by_vad.py`: walk the chunks in order, slice each one as
`samples[int(start * sr):int(end * sr)]`, and concatenate consecutive chunks (the silence between
them is dropped). When adding the next chunk would take the accumulated length past the target
and something is already accumulated, the accumulated piece becomes a segment and a new one
starts; so a chunk longer than the target is a segment of its own, and the last piece is written
whatever its length. Lengths are accumulated in VAD seconds (`end - start`), as there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SAMPLE_RATE = 16_000


class VadError(ValueError):
    """A `voice_activity` list that cannot be cut (not pairs of numbers, unordered, overlapping)."""


@dataclass(frozen=True)
class Plan:
    """Segments as lists of sample ranges `(begin, end)` into the recording, in order."""

    segments: list[list[tuple[int, int]]]
    clipped: list[str]
    """One note per chunk that ran past the end of the audio (clipped to it, or dropped)."""

    @property
    def num_samples(self) -> int:
        return sum(b - a for seg in self.segments for a, b in seg)


def parse_voice_activity(value) -> list[tuple[float, float]]:
    """Check the json's `voice_activity`: `[[start, end], ...]` in seconds, sorted, not overlapping."""
    if not isinstance(value, list):
        raise VadError(f"voice_activity is {type(value).__name__}, expected a list of [start, end] pairs")
    chunks: list[tuple[float, float]] = []
    for k, pair in enumerate(value):
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2
        ok = ok and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in pair)
        if not ok:
            raise VadError(f"voice_activity[{k}] is {pair!r}, expected [start, end] in seconds")
        start, end = float(pair[0]), float(pair[1])
        if start < 0 or end < start:
            raise VadError(f"voice_activity[{k}] = [{start}, {end}] is not a forward time span")
        if chunks and start < chunks[-1][1]:
            raise VadError(
                f"voice_activity[{k}] starts at {start} s, before the previous chunk ends ({chunks[-1][1]} s): "
                "chunks must be sorted and must not overlap"
            )
        chunks.append((start, end))
    return chunks


def plan_segments(chunks: list[tuple[float, float]], num_samples: int, target_sec: float,
                  sample_rate: int = SAMPLE_RATE) -> Plan:
    """Group `chunks` (from `parse_voice_activity`) into segments of a recording of `num_samples`."""
    if target_sec <= 0:
        raise ValueError(f"the target segment length must be positive, got {target_sec}")
    segments: list[list[tuple[int, int]]] = []
    clipped: list[str] = []
    current: list[tuple[int, int]] = []
    accumulated = 0.0
    duration = num_samples / sample_rate
    for k, (start, end) in enumerate(chunks):
        if end > duration:
            # a VAD span past the audio (a shortened file, or a VAD run on another version):
            # keep what exists, as the slice in cut_by_vad would, and say so
            clipped.append(f"voice_activity[{k}] = [{start:g}, {end:g}] s ends after the audio ({duration:.3f} s)")
            end = duration
            if end <= start:
                continue  # the whole chunk is past the audio
        begin, stop = int(start * sample_rate), min(int(end * sample_rate), num_samples)
        if accumulated + (end - start) > target_sec and accumulated > 0:
            segments.append(current)
            current, accumulated = [], 0.0
        current.append((begin, stop))
        accumulated += end - start
    segments.append(current)
    # a chunk shorter than a sample slices nothing; a segment made only of such chunks is no file
    segments = [kept for kept in ([(a, b) for a, b in seg if b > a] for seg in segments) if kept]
    return Plan(segments, clipped)
