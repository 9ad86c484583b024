"""A small synthetic corpus in Libri-Light's unlabelled layout, to try VAD segmentation offline.

    OUT/librilight/{small,medium}/SPK/BOOK_DIR/NAME.flac   (16 kHz mono 16-bit, one "chapter" each)
    OUT/librilight/{small,medium}/SPK/BOOK_DIR/NAME.json   {"speaker", "book_meta", "snr", "voice_activity"}

Each file is several eSpeak NG utterances (new speakers, not those of the LibriSpeech toy tree)
laid out on a floor of -70 dBFS noise, separated by silences; `voice_activity` is the exact
placement of each utterance. Placements are whole milliseconds (16 samples), so the seconds in
the json are exact at 3 decimals. As in toy.py, synthesis runs in a fresh process in plan order,
so the tree is a function of (num_utterances, seed) alone.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE, to_mono_16k, to_pcm16, write_flac
from .synth import VARIANTS as _VARIANTS
from .synth import VOICES as _VOICES
from .synth import Speaker
from .synth import in_fresh_process as _in_fresh_process
from .vocabulary import WORDS

SUBSETS = ("small", "medium")
_MS = SAMPLE_RATE // 1000  # placements are multiples of 1 ms so the json's 3 decimals are exact
_FLOOR_DBFS = -70.0  # "silence" is very quiet noise, as in a real recording, not digital zeros
_GENRES = ("Literary Fiction", "Children's Fiction", "Poetry", "Short Stories", "Science Fiction",
           "Action & Adventure Fiction", "History", "Philosophy", "Religion", "Humor")
_MIN_UTTERANCES = 12  # two files of 6: one per subset


@dataclass(frozen=True)
class LongFile:
    subset: str
    speaker: Speaker
    book_id: str
    book_dir: str
    title: str
    genres: tuple[str, ...]
    name: str
    texts: tuple[str, ...]  # upper case, in reading order

    @property
    def relpath(self) -> str:  # without the suffix: .flac and .json share it
        return f"{self.subset}/{self.speaker.speaker_id}/{self.book_dir}/{self.name}"


def _slug(words: list[str], sep: str) -> str:
    return sep.join(re.sub(r"[^a-z0-9]", "", w.lower()) for w in words)


def _chunks(rng: np.random.Generator, n: int, low: int, high: int, first_max: int | None = None) -> list[int]:
    """Split n items into consecutive group sizes drawn from [low, high] (the last takes what is left)."""
    sizes: list[int] = []
    while n > 0:
        size = min(int(rng.integers(low, high + 1)), n)
        if not sizes and first_max is not None:
            size = min(size, first_max)
        if n <= high and sizes:
            size = n
        elif 0 < n - size < low:
            size = n - low  # leave enough for a final group of at least `low`
        sizes.append(size)
        n -= size
    return sizes


def plan_librilight(num_utterances: int, seed: int) -> list[LongFile]:
    """Decide every file (subset, speaker, book, words) from the seed alone."""
    if num_utterances < _MIN_UTTERANCES:
        raise ValueError(f"the synthetic Libri-Light tree needs at least {_MIN_UTTERANCES} utterances")
    rng = np.random.default_rng([seed, 10])  # streams 0-2 are toy.py's
    file_sizes = _chunks(rng, num_utterances, 6, 12, first_max=num_utterances - 6)
    book_sizes = _chunks(rng, len(file_sizes), 1, 3, first_max=len(file_sizes) - 1)  # >= 2 books
    speaker_sizes = _chunks(rng, len(book_sizes), 1, 2)
    n_books = len(book_sizes)
    medium = set(rng.choice(n_books, size=max(1, round(n_books / 4)), replace=False).tolist())
    # speaker ids above toy.py's range (19..8999), so the two trees never share a speaker
    speaker_ids = rng.choice(np.arange(10_000, 15_000), size=len(speaker_sizes), replace=False).tolist()
    book_ids = rng.choice(np.arange(1, 15_000), size=n_books, replace=False).tolist()
    plan: list[LongFile] = []
    files, books = iter(file_sizes), iter(range(n_books))
    for spk_id, spk_books in zip(speaker_ids, speaker_sizes):
        speaker = Speaker(
            speaker_id=int(spk_id),
            voice=str(rng.choice(_VOICES)) + str(rng.choice(_VARIANTS)),
            rate_wpm=int(rng.integers(130, 185)),
            pitch=int(rng.integers(25, 80)),
            snr_db=None,
        )
        author = _slug([str(rng.choice(WORDS))], "")
        for _ in range(spk_books):
            b = next(books)
            title_words = [str(w) for w in rng.choice(WORDS, size=int(rng.integers(2, 4)))]
            title = " ".join(w.capitalize() for w in title_words)
            # LibriVox archive names: words, a yymm code, "librivox_64kb_mp3"
            yymm = f"{int(rng.integers(5, 17)):02d}{int(rng.integers(1, 13)):02d}"
            book_dir = f"{_slug(title_words, '_')}_{yymm}_librivox_64kb_mp3"
            genres = tuple(str(g) for g in rng.choice(_GENRES, size=int(rng.integers(1, 3)), replace=False))
            for part in range(1, book_sizes[b] + 1):
                texts = tuple(
                    " ".join(WORDS[w] for w in rng.choice(len(WORDS), size=int(rng.integers(5, 19))))
                    for _ in range(next(files))
                )
                plan.append(LongFile(
                    subset=SUBSETS[1] if b in medium else SUBSETS[0],
                    speaker=speaker,
                    book_id=str(book_ids[b]),
                    book_dir=book_dir,
                    title=title,
                    genres=genres,
                    name=f"{_slug(title_words, '')}_{part:02d}_{author}_64kb",
                    texts=texts,
                ))
    return plan


def _speech(engine, text: str, speaker: Speaker, seed: int) -> np.ndarray:
    """One utterance at 16 kHz, trimmed to its voiced extent and padded to whole milliseconds."""
    raw = engine.synthesize(text.lower(), speaker.voice, speaker.rate_wpm, speaker.pitch, seed=seed)
    x = to_mono_16k(raw.astype(np.float32) / 32768.0, engine.sample_rate)
    loud = np.flatnonzero(np.abs(x) > 0.01 * (float(np.abs(x).max()) or 1.0))
    x = x[loud[0] : loud[-1] + 1] if len(loud) else x  # eSpeak's own lead-in/out silence is not speech
    x = np.concatenate([x, np.zeros(-len(x) % _MS, dtype=np.float32)])
    return x / (float(np.abs(x).max()) or 1.0)


def _write_files(root: Path, plan: list[LongFile], seed: int) -> list[dict]:
    """Runs in a fresh process: synthesise every file in plan order, write .flac and .json."""
    from .espeak import Espeak

    engine = Espeak.get()
    stats = []
    position = 0
    for k, f in enumerate(plan):
        rng = np.random.default_rng([seed, 11, k])
        gain = rng.uniform(0.3, 0.8)  # one recording level per file, a little per-utterance drift
        pieces, spans = [], []
        cursor = int(rng.uniform(0.3, 1.5) * 1000) * _MS  # leading silence
        for text in f.texts:
            x = _speech(engine, text, f.speaker, seed * 100_003 + 50_000_000 + position)
            position += 1
            pieces.append((cursor, x * gain * 10 ** (rng.uniform(-1.5, 1.5) / 20)))
            spans.append((cursor, cursor + len(x)))
            # mostly 0.3-2.5 s pauses; sometimes a near-zero one (run-on sentences)
            gap = rng.uniform(0.0, 0.03) if rng.random() < 0.1 else rng.uniform(0.3, 2.5)
            cursor += len(x) + int(gap * 1000) * _MS
        total = spans[-1][1] + int(rng.uniform(0.3, 1.5) * 1000) * _MS  # trailing silence
        audio = (rng.standard_normal(total) * 10 ** (_FLOOR_DBFS / 20)).astype(np.float32)
        for start, x in pieces:
            audio[start : start + len(x)] += x
        audio = np.clip(audio, -1.0, 32767 / 32768)
        # snr as measured on the written samples: speech spans against the gaps between them
        pcm = to_pcm16(audio).astype(np.float64)
        voiced = np.zeros(total, dtype=bool)
        for a, b in spans:
            voiced[a:b] = True
        snr = 10 * np.log10(np.mean(pcm[voiced] ** 2) / max(np.mean(pcm[~voiced] ** 2), 1e-12))
        path = root / f.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        write_flac(str(path.with_suffix(".flac")), audio)
        meta = {
            "speaker": str(f.speaker.speaker_id),
            "book_meta": {"id": f.book_id, "title": f.title, "genre": list(f.genres)},
            "snr": round(float(snr), 3),
            "voice_activity": [[round(a / SAMPLE_RATE, 3), round(b / SAMPLE_RATE, 3)] for a, b in spans],
        }
        path.with_suffix(".json").write_text(json.dumps(meta) + "\n", encoding="utf-8")
        stats.append({"samples": total, "speech_samples": int(voiced.sum())})
    return stats


def make_toy_librilight(out: str | Path, num_utterances: int = 160, seed: int = 0) -> dict:
    """Write OUT/librilight/{small,medium}/SPK/BOOK/NAME.{flac,json}; return files and hours per subset."""
    root = Path(out) / "librilight"
    if root.exists():
        shutil.rmtree(root)  # a re-run replaces the tree, never mixes two seeds
    plan = plan_librilight(num_utterances, seed)
    stats = _in_fresh_process(_write_files, root, plan, seed)
    subsets = {s: {"files": 0, "hours": 0.0, "speech_hours": 0.0} for s in SUBSETS}
    for f, st in zip(plan, stats):
        subsets[f.subset]["files"] += 1
        subsets[f.subset]["hours"] += st["samples"] / SAMPLE_RATE / 3600
        subsets[f.subset]["speech_hours"] += st["speech_samples"] / SAMPLE_RATE / 3600
    for s in subsets.values():
        s["hours"], s["speech_hours"] = round(s["hours"], 6), round(s["speech_hours"], 6)
    return {"root": str(root), "subsets": subsets, "utterances": sum(len(f.texts) for f in plan)}
