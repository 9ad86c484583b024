"""Offline speech synthesis through the eSpeak NG library bundled in the `espeakng-loader` wheel.

The library is driven through ctypes in synchronous mode: `espeak_Synth` returns once the
callback has received every sample, so one process can synthesise many sentences quickly.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

_SYNCHRONOUS = 2  # AUDIO_OUTPUT_SYNCHRONOUS
_CHARS_AUTO = 1
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4

_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


def _libc():
    return ctypes.CDLL(None)  # the process's own C library, the one libespeak-ng calls


class Espeak:
    """A process-wide handle on libespeak-ng (the library keeps global state)."""

    _instance: "Espeak | None" = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as err:  # pragma: no cover - core dependency
            raise RuntimeError(
                "the synthetic corpus needs the `espeakng-loader` package: pip install espeakng-loader"
            ) from err
        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._lib.espeak_Initialize.restype = ctypes.c_int
        data = espeakng_loader.get_data_path().encode()
        rate = self._lib.espeak_Initialize(_SYNCHRONOUS, 0, ctypes.c_char_p(data), 0)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (returned {rate})")
        self.sample_rate = int(rate)
        self._chunks: list[np.ndarray] = []
        # Keep a reference to the callback so it is not garbage-collected while C holds it.
        self._cb = _CALLBACK(self._collect)
        self._lib.espeak_SetSynthCallback(self._cb)

    @classmethod
    def get(cls) -> "Espeak":
        with cls._lock:
            if cls._instance is None:
                cls._instance = Espeak()
            return cls._instance

    def _collect(self, wav, num_samples, events) -> int:
        if num_samples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = continue synthesis

    def synthesize(self, text: str, voice: str, rate_wpm: int, pitch: int, seed: int = 0) -> np.ndarray:
        """Return int16 samples at `self.sample_rate` for `text` spoken by `voice`.

        Breathy voices draw noise from the C library's `rand()`, which other native code in the
        process may also consume; re-seeding it first makes the noise a function of `seed`.
        """
        with self._lock:
            self._lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
            _libc().srand(ctypes.c_uint(seed & 0xFFFFFFFF))
            if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"unknown espeak voice {voice!r}")
            self._lib.espeak_SetParameter(_RATE, int(rate_wpm), 0)
            self._lib.espeak_SetParameter(_PITCH, int(pitch), 0)
            self._chunks = []
            data = text.encode()
            status = self._lib.espeak_Synth(
                ctypes.c_char_p(data), len(data) + 1, 0, 0, 0, _CHARS_AUTO, None, None
            )
            if status != 0:
                raise RuntimeError(f"espeak_Synth failed with status {status}")
            self._lib.espeak_Synchronize()
            chunks, self._chunks = self._chunks, []
        if not chunks:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(chunks)
