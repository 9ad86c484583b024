"""Scanning a LibriSpeech-layout directory: pair audio with transcripts, check and convert audio.

The unit of parallel work is one directory (a LibriSpeech chapter). Every file ends up either
as a `Record` (usable, possibly converted to 16 kHz mono) or as a `Problem` (with its reason).
Audio checks are cached by (size, mtime) so a re-run only decodes files that changed.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .audio import AudioError, check_audio, convert_file
from .fsutil import atomic_open
from .labels import bad_characters, normalize_transcript
from .parallel import pool

AUDIO_EXTENSIONS = (".flac", ".wav")
TRANSCRIPT_SUFFIX = ".trans.txt"


@dataclass(frozen=True)
class Record:
    """A usable utterance. `relpath` is relative to the corpus root (or absolute if converted)."""

    split: str
    relpath: str
    num_samples: int
    words: str


@dataclass(frozen=True)
class Problem:
    split: str
    path: str
    reason: str
    detail: str


@dataclass(frozen=True)
class ChapterTask:
    split: str
    corpus_root: str
    directory: str
    converted_root: str
    decode: bool
    cache: dict  # relpath -> cached audio-check entry
    labelled: bool = True  # False: any audio file is usable as is, no transcript wanted
    extensions: tuple[str, ...] = AUDIO_EXTENSIONS


@dataclass
class PrepResult:
    splits: dict[str, list[Record]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def usable(self) -> int:
        return sum(len(v) for v in self.splits.values())


def has_extension(name: str, extensions: tuple[str, ...]) -> bool:
    return name.lower().endswith(extensions)


def list_chapter_dirs(split_dir: Path, extensions: tuple[str, ...] = AUDIO_EXTENSIONS,
                      transcripts: bool = True) -> list[Path]:
    """Every directory below `split_dir` that holds audio (or transcripts), sorted."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(split_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if any(has_extension(f, extensions) or (transcripts and f.endswith(TRANSCRIPT_SUFFIX)) for f in filenames):
            found.add(Path(dirpath))
    return sorted(found)


def _read_transcripts(directory: Path, split: str, rel_dir: str, problems: list[Problem]) -> dict[str, str]:
    texts: dict[str, str] = {}
    for trans in sorted(directory.glob(f"*{TRANSCRIPT_SUFFIX}")):
        rel = f"{rel_dir}/{trans.name}"
        try:
            lines = trans.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            problems.append(Problem(split, rel, "bad_transcript_file", f"cannot read as UTF-8 text: {err}"))
            continue
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            parts = line.strip().split(maxsplit=1)
            utt = parts[0]
            text = normalize_transcript(parts[1]) if len(parts) > 1 else ""
            where = f"{rel}:{lineno} ({utt})"
            if not text:
                problems.append(Problem(split, where, "empty_transcript", "the line has an id but no words"))
                texts[utt] = ""  # the audio, if any, is reported through this entry below
            elif utt in texts:
                problems.append(Problem(split, where, "duplicate_transcript", "the id appears twice; first kept"))
            else:
                texts[utt] = text
    return texts


def _check_cached(path: Path, rel: str, task: ChapterTask) -> dict:
    try:
        stat = path.stat()
    except OSError as err:  # e.g. a link to a file that is gone
        return {"size": -1, "mtime_ns": -1, "ok": False, "reason": "unreadable", "detail": err.strerror or str(err)}
    entry = task.cache.get(rel)
    if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
        # caches from before sample values were checked: re-check WAVs, the only files that can hold floats
        values_known = entry.get("values_checked", False) or path.suffix != ".wav"
        if (entry.get("decoded", False) and values_known) or not task.decode:
            converted = entry.get("converted")
            if converted is None or os.path.exists(converted):
                return entry
    entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "decoded": task.decode, "values_checked": task.decode}
    try:
        check = check_audio(str(path), decode=task.decode)
        entry.update(ok=True, num_samples=check.num_frames, converted=None, note="")
        if check.needs_conversion:
            prefix = "finetuning" if task.split.startswith("finetuning/") else ""
            # the old suffix stays in the name: a.wav and a.mp3 side by side get two copies
            dst = Path(task.converted_root) / prefix / (rel if task.labelled else rel + ".flac")
            if task.labelled:
                dst = dst.with_suffix(".flac")
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.tmp")
            num_samples = convert_file(str(path), str(tmp))
            os.replace(tmp, dst)
            entry.update(num_samples=num_samples, converted=str(dst), note=check.conversion_note())
    except AudioError as err:
        entry.update(ok=False, reason=err.reason, detail=err.detail)
    return entry


def scan_chapter(task: ChapterTask) -> tuple[str, list[Record], list[Problem], dict]:
    """Check one directory; returns its split, records, problems and fresh cache entries."""
    directory = Path(task.directory)
    rel_dir = directory.relative_to(task.corpus_root).as_posix()
    problems: list[Problem] = []
    records: list[Record] = []
    cache: dict = {}
    texts = _read_transcripts(directory, task.split, rel_dir, problems) if task.labelled else {}
    # links count even when broken: a dangling one is reported, not passed over in silence
    audio = sorted(p for p in directory.iterdir() if has_extension(p.name, task.extensions)
                   and (p.is_file() or p.is_symlink()) and not p.name.startswith("."))
    seen: set[str] = set()
    for path in audio:
        rel = f"{rel_dir}/{path.name}" if rel_dir != "." else path.name
        unlistable = manifest_name_problem(rel)
        if unlistable:
            problems.append(Problem(task.split, rel.encode("utf-8", "backslashreplace").decode(), "unlistable_name", unlistable))
            continue
        if not task.labelled:
            entry = _check_cached(path, rel, task)
            cache[rel] = entry
            if not entry["ok"]:
                problems.append(Problem(task.split, rel, entry["reason"], entry["detail"]))
                continue
            if entry["converted"]:
                problems.append(Problem(task.split, rel, "converted", f"{entry['note']}; listed as {entry['converted']}"))
            records.append(Record(task.split, entry["converted"] or rel, entry["num_samples"], ""))
            continue
        utt = path.name.split(".", 1)[0]
        if utt in seen:
            problems.append(Problem(task.split, rel, "duplicate_audio", f"another file already has id {utt}"))
            continue
        seen.add(utt)
        entry = _check_cached(path, rel, task)
        cache[rel] = entry
        if not entry["ok"]:
            problems.append(Problem(task.split, rel, entry["reason"], entry["detail"]))
            continue
        if utt not in texts:
            problems.append(Problem(task.split, rel, "no_transcript", f"no line for {utt} in any *{TRANSCRIPT_SUFFIX}"))
            continue
        words = texts[utt]
        if not words:
            continue  # already reported as empty_transcript
        bad = bad_characters(words)
        if bad:
            shown = " ".join(repr(c) for c in bad)
            problems.append(Problem(task.split, rel, "bad_characters", f"transcript has {shown} outside A-Z and '"))
            continue
        if entry["converted"]:
            problems.append(Problem(task.split, rel, "converted", f"{entry['note']}; listed as {entry['converted']}"))
        records.append(Record(task.split, entry["converted"] or rel, entry["num_samples"], words))
    for utt in sorted(set(texts) - seen):
        problems.append(Problem(task.split, f"{rel_dir}/{utt}", "missing_audio", "a transcript line has no audio file"))
    return task.split, records, problems, cache


def manifest_name_problem(name: str) -> str:
    """Why `name` cannot be a line of a tab-separated UTF-8 manifest ("" if it can)."""
    if any(c in name for c in "\t\n\r"):
        return "the name holds a tab or a line break, which would break the manifest's lines; rename the file"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "the name is not valid UTF-8 (the manifest is UTF-8); rename the file"
    return ""


def load_cache(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # a missing or damaged cache only costs a re-decode


def save_cache(path: Path, cache: dict) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(cache, f)


def problem_row(p: Problem) -> str:
    path = p.path.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")  # shown escaped, as Python would
    return "\t".join([p.split, path, p.reason, p.detail.replace("\t", " ").replace("\n", " ")])



def load_caches(cache_dir: Path, name: str) -> dict:
    """A split's scan cache, with what job-array tasks (`--part`) left next to it."""
    stem = name.replace("/", "_")
    cache = load_cache(cache_dir / f"{stem}.json")
    for part in sorted(cache_dir.glob(f"{stem}.part*.json")):
        cache.update(load_cache(part))
    return cache


def scan_dirs(jobs: list[tuple[str, Path, Path]], out: Path, workers: int, decode: bool = True,
              part: tuple[int, int] | None = None, labelled: bool = True,
              extensions: tuple[str, ...] = AUDIO_EXTENSIONS) -> PrepResult:
    """Check every audio file of `jobs`: (split name, split directory, root the paths are relative to).

    With `part=(i, n)` only every n-th directory from the i-th is scanned, and the results go to a
    partial cache that a later full run reads instead of decoding again.
    """
    cache_dir = out / ".cache"
    tasks = []
    for name, split_dir, corpus_root in jobs:
        by_dir: dict[str, dict] = defaultdict(dict)  # grouped once: 200k files must not cost dirs x files
        for k, v in load_caches(cache_dir, name).items():
            by_dir[k.rpartition("/")[0]][k] = v
        for chapter in list_chapter_dirs(split_dir, extensions, transcripts=labelled):
            rel_dir = chapter.relative_to(corpus_root).as_posix()
            tasks.append(ChapterTask(name, str(corpus_root), str(chapter), str(out.resolve() / "converted"), decode,
                                     by_dir.get("" if rel_dir == "." else rel_dir, {}), labelled, extensions))
    if part is not None:
        tasks = tasks[part[0] :: part[1]]
    result = PrepResult(splits={name: [] for name, _, _ in jobs})
    fresh: dict[str, dict] = defaultdict(dict)
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), unit="dir", desc="scanning", disable=None)
    with pool(workers) as p:
        for split, records, problems, cache in p.imap_unordered(scan_chapter, tasks, chunksize=4):
            result.splits[split].extend(records)
            result.problems.extend(problems)
            fresh[split].update(cache)
            bar.update(1)
    bar.close()
    for name, _, _ in jobs:
        stem = name.replace("/", "_")
        if part is None:
            save_cache(cache_dir / f"{stem}.json", fresh.get(name, {}))
            for leftover in cache_dir.glob(f"{stem}.part*.json"):
                leftover.unlink()
        else:
            save_cache(cache_dir / f"{stem}.part{part[0]}-of-{part[1]}.json", fresh.get(name, {}))
        result.splits[name].sort(key=lambda r: r.relpath)
    result.problems.sort(key=lambda p: (p.split, p.path))
    return result
