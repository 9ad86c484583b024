"""Reading, checking and converting audio files: 16 kHz mono is what every stage expects.

Files at another rate are resampled with soxr (the resampler behind SoX's `rate` effect) and
multi-channel files are down-mixed by averaging the channels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16_000
_BLOCK = 1 << 18
_UNKNOWN_FRAMES = 1 << 62  # decode in blocks so a long file never needs two full copies in memory


class AudioError(Exception):
    """A file that cannot be used as audio; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class AudioCheck:
    """Outcome of checking one file that is usable (possibly after conversion)."""

    num_frames: int
    sample_rate: int
    channels: int

    @property
    def needs_conversion(self) -> bool:
        return self.sample_rate != SAMPLE_RATE or self.channels != 1

    def conversion_note(self) -> str:
        notes = []
        if self.sample_rate != SAMPLE_RATE:
            notes.append(f"resampled {self.sample_rate} Hz -> {SAMPLE_RATE} Hz")
        if self.channels != 1:
            notes.append(f"downmixed {self.channels} channels -> mono")
        return "; ".join(notes)


def check_audio(path: str, decode: bool = True) -> AudioCheck:
    """Raise `AudioError` if `path` is not usable audio; with `decode`, read every sample."""
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise AudioError("unreadable", str(err)) from err
    if size == 0:
        raise AudioError("empty_file", "the file has 0 bytes")
    try:
        info = sf.info(path)
    except Exception as err:  # libsndfile reports every open failure the same way
        raise AudioError("not_audio", _short(err)) from err
    frames = int(info.frames)
    # libsndfile reports a FLAC header with an unknown (0) sample count as a huge number:
    # only decoding can tell such a file's length.
    unknown = frames >= _UNKNOWN_FRAMES
    if frames <= 0:
        raise AudioError("zero_length", "the header declares 0 samples")
    if decode or unknown:
        decoded = 0
        try:
            with sf.SoundFile(path) as f:
                for block in f.blocks(blocksize=_BLOCK, dtype="int16", always_2d=True):
                    decoded += len(block)
        except Exception as err:
            if unknown and decoded == 0:
                raise AudioError("zero_length", "the header declares no sample count and no audio frame decodes") from err
            said = "an unknown number of" if unknown else str(frames)
            raise AudioError(
                "truncated", f"decoding failed after {decoded} of {said} samples ({_short(err)})"
            ) from err
        if decoded == 0:
            raise AudioError("zero_length", "the file decodes to 0 samples")
        if unknown:
            frames = decoded
        elif decoded != frames:
            raise AudioError("truncated", f"header declares {frames} samples but {decoded} decode")
    return AudioCheck(num_frames=frames, sample_rate=int(info.samplerate), channels=int(info.channels))


def to_mono_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Down-mix (channel mean) and resample float samples to 16 kHz mono float32."""
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if sample_rate != SAMPLE_RATE:
        import soxr

        x = soxr.resample(x, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return x


def read_audio(path: str) -> np.ndarray:
    """Read any soundfile-supported file as 16 kHz mono float32 in [-1, 1)."""
    try:
        samples, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as err:
        raise AudioError("unreadable", f"{path}: {_short(err)}") from err
    return to_mono_16k(samples, rate)


def write_flac(path: str, samples: np.ndarray) -> None:
    """Write float samples in [-1, 1) as 16 kHz mono 16-bit FLAC."""
    pcm = np.clip(np.round(np.asarray(samples) * 32768.0), -32768, 32767).astype(np.int16)
    sf.write(path, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")


def _short(err: Exception) -> str:
    return " ".join(str(err).split())[:200]
