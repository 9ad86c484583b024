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
#: float WAV subtypes: their samples can be NaN, infinite or far beyond full scale; PCM ones cannot
FLOAT_SUBTYPES = frozenset({"FLOAT", "DOUBLE"})
MAX_PEAK = 2.0
"""Largest |sample| accepted in float audio (full scale is 1.0). Resampled or mixed audio can overshoot
a little; 6 dB over full scale means another scale (e.g. int16 values stored as float), and such
samples would swamp the loss."""


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


def check_samples(samples: np.ndarray, offset: int = 0) -> None:
    """Raise `AudioError` (`non_finite` or `out_of_range`) if float samples cannot be trained on.

    `samples` is (frames,) or (frames, channels); `offset` is the index of its first frame in the file.
    """
    bad = ~np.isfinite(samples)
    if bad.any():
        frame = int(np.flatnonzero(bad.reshape(len(samples), -1).any(axis=1))[0])
        value = samples[frame] if samples.ndim == 1 else samples[frame][bad[frame]][0]
        raise AudioError("non_finite", f"sample {offset + frame} is {value} ({int(bad.sum())} non-finite samples here)")
    loud = np.abs(samples) > MAX_PEAK
    if loud.any():
        frame = int(np.flatnonzero(loud.reshape(len(samples), -1).any(axis=1))[0])
        peak = float(np.abs(samples).max())
        raise AudioError(
            "out_of_range",
            f"sample {offset + frame} is beyond +-{MAX_PEAK} (peak {peak:.6g}; full scale is 1.0): the samples "
            "are on another scale, e.g. int16 values stored as float; rescale the file to [-1, 1]",
        )


def check_audio(path: str, decode: bool = True) -> AudioCheck:
    """Raise `AudioError` if `path` is not usable audio; with `decode`, read every sample."""
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise AudioError("unreadable", err.strerror or str(err)) from err
    if size == 0:
        raise AudioError("empty_file", "the file has 0 bytes")
    try:
        info = sf.info(path)
    except Exception as err:  # libsndfile reports every open failure the same way
        raise AudioError("not_audio", describe_error(err, path)) from err
    frames = int(info.frames)
    # libsndfile reports a FLAC header with an unknown (0) sample count as a huge number:
    # only decoding can tell such a file's length.
    unknown = frames >= _UNKNOWN_FRAMES
    if frames <= 0:
        raise AudioError("zero_length", "the header declares 0 samples")
    if decode or unknown:
        decoded = 0
        # PCM is counted as int16 (cheapest); float audio is read as float, its values checked
        is_float = info.subtype in FLOAT_SUBTYPES
        try:
            with sf.SoundFile(path) as f:
                for block in f.blocks(blocksize=_BLOCK, dtype="float32" if is_float else "int16", always_2d=True):
                    if is_float:
                        check_samples(block, decoded)
                    decoded += len(block)
        except AudioError:
            raise
        except Exception as err:
            if unknown and decoded == 0:
                raise AudioError("zero_length", "the header declares no sample count and no audio frame decodes") from err
            said = "an unknown number of" if unknown else str(frames)
            raise AudioError(
                "truncated", f"decoding failed after {decoded} of {said} samples ({describe_error(err, path)})"
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
    """Read any soundfile-supported file as 16 kHz mono float32 in [-1, 1).

    Raises `AudioError`; its detail does not repeat `path`, which the caller reports.
    """
    try:
        samples, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as err:
        raise AudioError("unreadable", describe_error(err, path)) from err
    check_samples(samples)
    return to_mono_16k(samples, rate)


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1) as int16, rounded; anything beyond full scale is clipped."""
    return np.clip(np.round(np.asarray(samples) * 32768.0), -32768, 32767).astype(np.int16)


def read_pcm16(path: str) -> np.ndarray:
    """A file's samples as int16 (channels kept), as packed shards store them.

    libsndfile hands float files to int16 readers unscaled (0.5 -> 0), so those are read as float
    and scaled here.
    """
    with sf.SoundFile(path) as f:
        if f.subtype in FLOAT_SUBTYPES:
            return to_pcm16(f.read(dtype="float32"))
        return f.read(dtype="int16")


def write_flac(path: str, samples: np.ndarray) -> None:
    """Write float samples in [-1, 1) as 16 kHz mono 16-bit FLAC."""
    sf.write(path, to_pcm16(samples), SAMPLE_RATE, format="FLAC", subtype="PCM_16")


def describe_error(err: Exception, path: str | None = None) -> str:
    """`err` on one short line, without libsndfile's "Error opening 'PATH': " (callers name the file)."""
    text = " ".join(str(err).split())
    if path is not None:
        if not os.path.exists(path):
            return "no such file"
        text = text.replace(f"Error opening {str(path)!r}: ", "").replace(f"{str(path)!r}", "the file")
    return text[:200]


def convert_file(src: str, dst: str) -> int:
    """Write `src` as 16 kHz mono 16-bit FLAC at `dst`, block by block (an hour-long file is never
    held whole); return the number of samples written. Raises `AudioError` on bad input."""
    written = 0
    try:
        f = sf.SoundFile(src)
    except Exception as err:
        raise AudioError("unreadable", describe_error(err, src)) from err
    declared, decoded = f.frames, 0
    try:
        with f, sf.SoundFile(dst, "w", SAMPLE_RATE, 1, "PCM_16", format="FLAC") as out:
            stream = None
            if f.samplerate != SAMPLE_RATE:
                import soxr

                stream = soxr.ResampleStream(f.samplerate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
            for block in f.blocks(blocksize=_BLOCK, dtype="float32", always_2d=True):
                check_samples(block, decoded)
                decoded += len(block)
                mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
                if stream is not None:
                    mono = stream.resample_chunk(mono)
                out.write(to_pcm16(mono))
                written += len(mono)
            if stream is not None:
                tail = stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
                out.write(to_pcm16(tail))
                written += len(tail)
    except AudioError:
        raise
    except Exception as err:
        raise AudioError("truncated", f"decoding failed after {decoded} of {declared} samples "
                                      f"({describe_error(err, src)})") from err
    if decoded != declared and declared < _UNKNOWN_FRAMES:
        raise AudioError("truncated", f"header declares {declared} samples but {decoded} decode")
    if written == 0:
        raise AudioError("zero_length", "the file decodes to 0 samples")
    return written
