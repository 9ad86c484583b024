"""A small synthetic corpus in the exact LibriSpeech and Libri-Light fine-tuning layouts.

English sentences drawn from a fixed vocabulary are spoken by eSpeak NG "speakers" (voice,
variant, speaking rate and pitch), resampled to 16 kHz and written as 16-bit mono FLAC:

    OUT/LibriSpeech/{train-clean-100,dev-clean,dev-other,test-clean,test-other}/SPK/CHAP/
        SPK-CHAP-UTT.flac, SPK-CHAP.trans.txt
    OUT/librispeech_finetuning/1h/{0..5}/{clean,other}/SPK/CHAP/...   (6 folds of "10 minutes")
    OUT/librispeech_finetuning/9h/{clean,other}/SPK/CHAP/...
    OUT/librilight/{small,medium}/SPK/BOOK/NAME.{flac,json}   (unlabelled long files with
        voice_activity; other speakers and sentences, see toy_librilight.py)

As in Libri-Light, the fine-tuning files are copies of training utterances. The "-other" dev and
test splits are harder: faster speech with added noise. eSpeak's output depends on what the
library synthesised before in the same process, so synthesis always runs in a fresh process in a
fixed order; that makes the corpus a function of (utterances, seed) alone.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE, to_mono_16k, write_flac
from .synth import VARIANTS as _VARIANTS
from .synth import VOICES as _VOICES
from .synth import Speaker
from .synth import in_fresh_process as _in_fresh_process
from .vocabulary import WORDS

SPLITS = ("train-clean-100", "dev-clean", "dev-other", "test-clean", "test-other")
_EVAL_FRACTION = 0.075  # each dev/test split; the rest is training data
_FINETUNE_1H_FRACTION = 0.25
_FINETUNE_9H_FRACTION = 0.35


@dataclass(frozen=True)
class Utterance:
    split: str
    speaker: Speaker
    chapter_id: int
    index: int
    text: str  # upper case, as in LibriSpeech transcripts

    @property
    def utt_id(self) -> str:
        return f"{self.speaker.speaker_id}-{self.chapter_id}-{self.index:04d}"

    @property
    def relpath(self) -> str:
        s = self.speaker.speaker_id
        return f"{self.split}/{s}/{self.chapter_id}/{self.utt_id}.flac"


def plan_corpus(num_utterances: int, seed: int) -> list[Utterance]:
    """Decide every utterance (speaker, chapter, words) from the seed alone."""
    if num_utterances < 20:
        raise ValueError("the synthetic corpus needs at least 20 utterances (4 per split)")
    rng = np.random.default_rng([seed, 0])
    n_eval = max(4, int(round(num_utterances * _EVAL_FRACTION)))
    counts = {s: n_eval for s in SPLITS[1:]}
    counts[SPLITS[0]] = num_utterances - 4 * n_eval
    n_speakers = {s: max(2, counts[s] // 25) for s in SPLITS}
    ids = rng.choice(np.arange(19, 9000), size=sum(n_speakers.values()), replace=False)
    chapters = iter(rng.choice(np.arange(1000, 300000), size=2 * len(ids), replace=False))
    plan: list[Utterance] = []
    id_iter = iter(ids.tolist())
    for split in SPLITS:
        other = split.endswith("other")
        speakers = [
            Speaker(
                speaker_id=next(id_iter),
                voice=str(rng.choice(_VOICES)) + str(rng.choice(_VARIANTS)),
                rate_wpm=int(rng.integers(170, 230) if other else rng.integers(130, 185)),
                pitch=int(rng.integers(25, 80)),
                snr_db=float(rng.uniform(8, 18)) if other else None,
            )
            for _ in range(n_speakers[split])
        ]
        speaker_chapters = {sp.speaker_id: [int(next(chapters)), int(next(chapters))] for sp in speakers}
        next_index: dict[int, int] = defaultdict(int)
        for k in range(counts[split]):
            sp = speakers[k % len(speakers)]
            chapter = speaker_chapters[sp.speaker_id][int(rng.integers(0, 2)) if split == SPLITS[0] else 0]
            words = rng.choice(len(WORDS), size=int(rng.integers(5, 19)))
            text = " ".join(WORDS[w] for w in words)
            plan.append(Utterance(split, sp, chapter, next_index[chapter], text))
            next_index[chapter] += 1
    return plan


def _render(utt: Utterance, seed: int, position: int, engine) -> np.ndarray:
    raw = engine.synthesize(
        utt.text.lower(), utt.speaker.voice, utt.speaker.rate_wpm, utt.speaker.pitch, seed=seed * 100_003 + position
    )
    x = to_mono_16k(raw.astype(np.float32) / 32768.0, engine.sample_rate)
    rng = np.random.default_rng([seed, 1, position])
    pad = lambda: np.zeros(int(rng.uniform(0.05, 0.3) * SAMPLE_RATE), dtype=np.float32)  # noqa: E731
    x = np.concatenate([pad(), x, pad()])
    peak = float(np.abs(x).max()) or 1.0
    x = x * (rng.uniform(0.3, 0.9) / peak)
    if utt.speaker.snr_db is not None:
        power = float(np.mean(x**2))
        noise = rng.standard_normal(len(x)).astype(np.float32)
        x = x + noise * np.sqrt(power / 10 ** (utt.speaker.snr_db / 10))
    return np.clip(x, -1.0, 32767 / 32768)


def _write_split_files(root: Path, plan: list[Utterance], seed: int) -> list[float]:
    """Runs in a fresh process: synthesise every utterance in plan order and write the tree."""
    from .espeak import Espeak

    engine = Espeak.get()
    durations = []
    transcripts: dict[Path, list[str]] = defaultdict(list)
    for position, utt in enumerate(plan):
        path = root / "LibriSpeech" / utt.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        audio = _render(utt, seed, position, engine)
        write_flac(str(path), audio)
        durations.append(len(audio) / SAMPLE_RATE)
        transcripts[path.parent / f"{utt.speaker.speaker_id}-{utt.chapter_id}.trans.txt"].append(
            f"{utt.utt_id} {utt.text}"
        )
    for trans_path, lines in transcripts.items():
        trans_path.write_text("\n".join(sorted(lines)) + "\n", encoding="utf-8")
    return durations


def _write_finetuning(root: Path, plan: list[Utterance], seed: int) -> dict[str, int]:
    """Copy training utterances into the Libri-Light `librispeech_finetuning` layout."""
    train = [u for u in plan if u.split == SPLITS[0]]
    order = np.random.default_rng([seed, 2]).permutation(len(train))
    n_1h = max(6, int(len(train) * _FINETUNE_1H_FRACTION))
    n_9h = max(2, int(len(train) * _FINETUNE_9H_FRACTION))
    speaker_ids = sorted({u.speaker.speaker_id for u in train})
    other_speakers = set(speaker_ids[len(speaker_ids) // 2 :])
    groups: dict[str, list[Utterance]] = defaultdict(list)
    for rank, i in enumerate(order[: n_1h + n_9h]):
        u = train[i]
        kind = "other" if u.speaker.speaker_id in other_speakers else "clean"
        subset = f"1h/{rank % 6}" if rank < n_1h else "9h"
        groups[f"{subset}/{kind}"].append(u)
    ft_root = root / "librispeech_finetuning"
    for group, utts in groups.items():
        transcripts: dict[Path, list[str]] = defaultdict(list)
        for u in utts:
            dst = ft_root / group / f"{u.speaker.speaker_id}/{u.chapter_id}/{u.utt_id}.flac"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / "LibriSpeech" / u.relpath, dst)
            transcripts[dst.parent / f"{u.speaker.speaker_id}-{u.chapter_id}.trans.txt"].append(
                f"{u.utt_id} {u.text}"
            )
        for trans_path, lines in transcripts.items():
            trans_path.write_text("\n".join(sorted(lines)) + "\n", encoding="utf-8")
    return {"1h": n_1h, "9h": n_9h}


def make_toy_corpus(
    out: str | Path, num_utterances: int = 500, seed: int = 0, librilight_utterances: int = 160
) -> dict:
    """Write the synthetic corpus under `out`; return a summary (counts and hours).

    `librilight_utterances` more utterances go to the unlabelled `librilight` tree (0: none).
    """
    out = Path(out)
    for sub in ("LibriSpeech", "librispeech_finetuning", "librilight"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)  # a re-run replaces the corpus, never mixes two seeds
    plan = plan_corpus(num_utterances, seed)
    out.mkdir(parents=True, exist_ok=True)
    # model cards and reports look for this file to say that a model was trained on synthetic speech
    (out / "SYNTHETIC.md").write_text(
        f"Synthetic speech (eSpeak NG) written by `python -m data_prep toy` (utterances {num_utterances}, seed {seed}); "
        "not LibriSpeech or Libri-Light audio, only their layouts.\n", encoding="utf-8")
    durations = _in_fresh_process(_write_split_files, out, plan, seed)
    finetune = _write_finetuning(out, plan, seed)
    hours: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for u, d in zip(plan, durations):
        hours[u.split] += d / 3600
        count[u.split] += 1
    summary = {
        "root": str(out),
        "splits": {s: {"utterances": count[s], "hours": round(hours[s], 4)} for s in SPLITS},
        "finetuning_utterances": finetune,
    }
    if librilight_utterances:
        from .toy_librilight import make_toy_librilight

        summary["librilight"] = make_toy_librilight(out, librilight_utterances, seed)
    return summary
