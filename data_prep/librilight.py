"""`python -m data_prep librilight ROOT OUT`: Libri-Light's unlabelled audio cut by its VAD.

ROOT holds the subsets (`small`, `medium`, `large`, `duplicate`), laid out as
`SUBSET/SPEAKER/BOOK/NAME.flac` with `NAME.json` beside each file. Every file is cut with the
rule of libri-light's `cut_by_vad.py` (`vad.py`) into 16 kHz mono FLAC segments holding exactly the
original samples of their chunks:

    segments/SUBSET/SPEAKER/BOOK/NAME/NAME_0000.flac, ...
    train.tsv, valid.tsv   fairseq manifests of the segments (root OUT/segments); `--valid-percent`
                           holds out whole source files, so no recording is in both
    shards/train.K.*       duration-balanced shards (--num-shards), packed PCM (--pack)
    report.tsv, summary.json

The unit of work is a book. A finished book is recorded under `OUT/.cache/librilight/` with a
fingerprint of its files, so re-runs (and the merge after a `--part I/N` job array) cut only books
that are new or changed. Files are decoded block by block: memory never grows with a file's length.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .audio import AudioError, check_audio, convert_file
from .fsutil import atomic_write_text
from .manifest import write_lines
from .parallel import pool
from .recording import cut_recording
from .scan import Problem, manifest_name_problem, problem_row
from .shards import write_shards
from .vad import VadError, parse_voice_activity, plan_segments

SAMPLE_RATE = 16_000
SUBSETS = ("small", "medium", "large", "duplicate")
DEFAULT_TARGET_SECONDS = 20.0
INFORMATIONAL = {"converted", "vad_past_end"}
_VERSION = 1  # bump when the cutting changes, so finished books are cut again


@dataclass
class LibriLightOptions:
    root: Path
    out: Path
    subsets: tuple[str, ...] | None = None  # None: every subset present under root
    target_seconds: float = DEFAULT_TARGET_SECONDS
    valid_percent: float = 0.01
    seed: int = 42
    workers: int = max(1, os.cpu_count() or 1)
    num_shards: int = 0
    pack: bool = False


@dataclass(frozen=True)
class BookTask:
    root: str
    rel: str  # SUBSET/SPEAKER/BOOK
    out: str
    target_seconds: float


@dataclass
class BookResult:
    rel: str
    segments: list[list] = field(default_factory=list)  # [relpath under segments/, samples, source relpath, bytes]
    problems: list[list[str]] = field(default_factory=list)  # [path, reason, detail]
    input_samples: int = 0
    input_bytes: int = 0
    cached: bool = False


def list_books(root: Path, subsets: tuple[str, ...] | None) -> list[str]:
    """`SUBSET/SPEAKER/BOOK` of every book directory, sorted."""
    if subsets is None:
        subsets = tuple(s for s in SUBSETS if (root / s).is_dir())
        if not subsets:
            raise FileNotFoundError(f"no Libri-Light subset ({', '.join(SUBSETS)}) under {root}")
    books = []
    for subset in subsets:
        if not (root / subset).is_dir():
            raise FileNotFoundError(f"{root / subset} is not a directory (asked for subset {subset!r})")
        for speaker in sorted(p for p in (root / subset).iterdir() if p.is_dir() and not p.name.startswith(".")):
            books += [f"{subset}/{speaker.name}/{b.name}" for b in sorted(speaker.iterdir())
                      if b.is_dir() and not b.name.startswith(".")]
    return books


def stray_files(root: Path, subsets: tuple[str, ...] | None) -> list[str]:
    """Audio and json files in the subsets but not at `SUBSET/SPEAKER/BOOK/NAME`: reported, not cut."""
    if subsets is None:
        subsets = tuple(s for s in SUBSETS if (root / s).is_dir())
    found = []
    for subset in subsets:
        for dirpath, dirnames, filenames in os.walk(root / subset):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if len(Path(dirpath).relative_to(root).parts) != 3:
                found += [(Path(dirpath) / f).relative_to(root).as_posix() for f in sorted(filenames)
                          if f.endswith((".flac", ".json")) and not f.startswith(".")]
    return found


def _fingerprint(book: Path, target_seconds: float) -> list:
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in book.iterdir()
                   if p.is_file() and p.suffix in (".flac", ".json"))
    return [_VERSION, target_seconds, [list(f) for f in files]]


def _cache_path(out: str, rel: str) -> Path:
    return Path(out) / ".cache" / "librilight" / f"{rel}.json"


def _load_finished(task: BookTask, fingerprint: list) -> BookResult | None:
    try:
        cached = json.loads(_cache_path(task.out, task.rel).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if cached.get("fingerprint") != fingerprint:
        return None
    seg_root = Path(task.out) / "segments"
    if not all((seg_root / s[0]).is_file() for s in cached["segments"]):
        return None  # segments deleted since: cut the book again
    return BookResult(task.rel, cached["segments"], cached["problems"], cached["input_samples"],
                      cached["input_bytes"], cached=True)


def cut_book(task: BookTask) -> BookResult:
    """Cut every file of one book (or return what a finished earlier run recorded)."""
    book = Path(task.root) / task.rel
    fingerprint = _fingerprint(book, task.target_seconds)
    finished = _load_finished(task, fingerprint)
    if finished is not None:
        return finished
    result = BookResult(task.rel)
    out_book = Path(task.out) / "segments" / task.rel
    if out_book.exists():
        shutil.rmtree(out_book)  # the book changed: nothing of the earlier cut may stay listed
    names = {p.name for p in book.iterdir() if p.is_file()}
    stems = sorted({n[: -len(s)] for n in names for s in (".flac", ".json") if n.endswith(s)})
    for stem in stems:
        where = f"{task.rel}/{stem}"
        unlistable = manifest_name_problem(where)
        if unlistable:
            result.problems.append([where.encode("utf-8", "backslashreplace").decode(), "unlistable_name", unlistable])
            continue
        if f"{stem}.json" not in names:
            result.problems.append([f"{where}.flac", "no_vad", f"no {stem}.json with its voice_activity beside it"])
            continue
        if f"{stem}.flac" not in names:
            result.problems.append([f"{where}.json", "missing_audio", f"no {stem}.flac beside the json"])
            continue
        try:
            chunks = _read_vad(book / f"{stem}.json")
        except VadError as err:
            result.problems.append([f"{where}.json", "bad_vad_json", str(err)])
            continue
        if not chunks:
            result.problems.append([f"{where}.json", "empty_vad", "voice_activity is empty: no speech to cut"])
            continue
        _cut_one(task, book / f"{stem}.flac", f"{where}.flac", chunks, out_book / stem, result)
    result.segments.sort(key=lambda s: s[0])
    atomic_write_text(_cache_path(task.out, task.rel), json.dumps({
        "fingerprint": fingerprint, "segments": result.segments, "problems": result.problems,
        "input_samples": result.input_samples, "input_bytes": result.input_bytes,
    }))
    return result


def _read_vad(path: Path) -> list[tuple[float, float]]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8-sig"))  # a BOM some editors add is not a defect
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise VadError(f"not readable as JSON: {' '.join(str(err).split())[:160]}") from err
    if not isinstance(meta, dict) or "voice_activity" not in meta:
        raise VadError("no voice_activity in the json")
    return parse_voice_activity(meta["voice_activity"])


def _cut_one(task: BookTask, flac: Path, rel: str, chunks, out_dir: Path, result: BookResult) -> None:
    tmp = None
    try:
        check = check_audio(str(flac), decode=False)
        source = flac
        if check.needs_conversion:
            # convert into a temporary 16 kHz file first, then cut that like any other
            tmp = Path(task.out) / ".cache" / "convert" / f"{rel}.{os.getpid()}.flac"
            tmp.parent.mkdir(parents=True, exist_ok=True)
            convert_file(str(flac), str(tmp))
            source = tmp
            check = check_audio(str(tmp), decode=False)
        plan = plan_segments(chunks, check.num_frames, task.target_seconds)
        written = cut_recording(str(source), plan.segments, out_dir, flac.stem)
    except AudioError as err:
        result.problems.append([rel, err.reason, err.detail])
        return
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    if source is not flac:
        result.problems.append([rel, "converted", f"{_conversion(flac)}; the segments hold the converted samples"])
    for note in plan.clipped:
        result.problems.append([rel, "vad_past_end", f"{note}: clipped to the audio"])
    seg_rel = Path(task.rel) / flac.stem
    result.input_samples += check.num_frames
    result.input_bytes += flac.stat().st_size
    for path, n, size in written:
        result.segments.append([(seg_rel / Path(path).name).as_posix(), n, rel, size])


def _conversion(flac: Path) -> str:
    return check_audio(str(flac), decode=False).conversion_note()


@dataclass
class LibriLightResult:
    books: list[BookResult]
    cut: int  # books cut in this run (the others were finished before)
    strays: list[str] = field(default_factory=list)  # files outside the layout

    @property
    def segments(self) -> list[list]:
        return [s for b in self.books for s in b.segments]

    @property
    def problems(self) -> list[Problem]:
        where = "a subset's SPEAKER/BOOK/NAME level"
        strays = [Problem(p.split("/", 1)[0], p, "outside_layout", f"not at {where}: not cut") for p in self.strays]
        return [Problem(b.rel.split("/", 1)[0], *p) for b in self.books for p in b.problems] + strays


def _run_books(opts: LibriLightOptions, part: tuple[int, int] | None) -> LibriLightResult:
    root, out = opts.root.resolve(), opts.out.resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; pass the Libri-Light directory holding small/ medium/ large/")
    if out == root or root in out.parents:
        raise ValueError(f"OUT ({out}) is inside ROOT ({root}); write the segments somewhere else")
    if opts.target_seconds <= 0:
        raise ValueError(f"--segment-seconds must be positive, got {opts.target_seconds}")
    books = list_books(root, opts.subsets)
    if part is not None:
        books = books[part[0] :: part[1]]
    tasks = [BookTask(str(root), rel, str(out), opts.target_seconds) for rel in books]
    from tqdm import tqdm

    results, cut, seconds = [], 0, 0.0
    bar = tqdm(total=len(tasks), unit="book", desc="cutting", disable=None)
    with pool(min(opts.workers, max(1, len(tasks)))) as p:
        for book in p.imap_unordered(cut_book, tasks):
            results.append(book)
            cut += not book.cached
            seconds += book.input_samples / SAMPLE_RATE
            bar.set_postfix_str(f"{seconds / 3600:.1f} h of audio", refresh=False)
            bar.update(1)
    bar.close()
    results.sort(key=lambda b: b.rel)
    return LibriLightResult(results, cut)


def prepare_librilight_part(opts: LibriLightOptions, index: int, count: int) -> LibriLightResult:
    """Task `index` of a job array of `count`: cut every count-th book; write no manifests."""
    if not 0 <= index < count:
        raise ValueError(f"part {index} of {count} does not exist (parts are numbered 0 to {count - 1})")
    return _run_books(opts, (index, count))


def prepare_librilight(opts: LibriLightOptions) -> LibriLightResult:
    """Cut every book not finished yet, then write manifests, shards, report and summary."""
    from .folder import split_held_out
    from .manifest import write_manifest

    result = _run_books(opts, None)
    result.strays = stray_files(opts.root.resolve(), opts.subsets)
    out = opts.out.resolve()
    segments = result.segments
    sources = sorted({s[2] for s in segments})
    held = dict(zip(sources, split_held_out(len(sources), opts.valid_percent, opts.seed).tolist()))
    split = {"train": [s for s in segments if not held[s[2]]], "valid": [s for s in segments if held[s[2]]]}
    for name, segs in split.items():
        if segs:
            write_manifest(out / f"{name}.tsv", str(out / "segments"), [(s[0], s[1]) for s in segs])
        else:
            (out / f"{name}.tsv").unlink(missing_ok=True)
    num_shards = opts.num_shards or (1 if opts.pack else 0)
    if num_shards and split["train"]:
        write_shards(out, "train", min(num_shards, len(split["train"])), opts.pack, opts.workers)
    problems = sorted(result.problems, key=lambda p: (p.split, p.path, p.reason))
    write_lines(out / "report.tsv", ["split\tpath\tproblem\tdetail"] + [problem_row(p) for p in problems])
    atomic_write_text(out / "summary.json", json.dumps(_summary(opts, result, split, num_shards), indent=2) + "\n")
    return result


def _summary(opts: LibriLightOptions, result: LibriLightResult, split: dict, num_shards: int) -> dict:
    per_subset: dict[str, dict] = defaultdict(lambda: {"books": 0, "input_hours": 0.0, "segments": 0, "segment_hours": 0.0})
    for b in result.books:
        s = per_subset[b.rel.split("/", 1)[0]]
        s["books"] += 1
        s["input_hours"] += b.input_samples / SAMPLE_RATE / 3600
        s["segments"] += len(b.segments)
        s["segment_hours"] += sum(x[1] for x in b.segments) / SAMPLE_RATE / 3600
    for s in per_subset.values():
        s["input_hours"], s["segment_hours"] = round(s["input_hours"], 4), round(s["segment_hours"], 4)
    samples = sum(s[1] for s in result.segments)
    return {
        "root": str(opts.root.resolve()),
        "segment_seconds": opts.target_seconds,
        "subsets": dict(sorted(per_subset.items())),
        "splits": {n: {"utterances": len(v), "hours": round(sum(s[1] for s in v) / SAMPLE_RATE / 3600, 4)}
                   for n, v in split.items() if v},
        "problems": dict(sorted(Counter(p.reason for p in result.problems).items())),
        "valid_percent": opts.valid_percent,
        "seed": opts.seed,
        "num_shards": num_shards,
        "packed": opts.pack,
        "disk": {
            "input_flac_bytes": sum(b.input_bytes for b in result.books),
            "segment_flac_bytes": sum(s[3] for s in result.segments),
            "packed_int16_bytes": 2 * samples,
        },
    }


def summary_lines(result: LibriLightResult, out: Path) -> list[str]:
    """What the run did, and what the audio takes on disk, in a few printed lines."""
    counts = Counter(p.reason for p in result.problems)
    rejected = {k: v for k, v in counts.items() if k not in INFORMATIONAL}
    segs = result.segments
    samples = sum(s[1] for s in segs)
    in_samples = sum(b.input_samples for b in result.books)
    speech = f" ({100 * samples / in_samples:.0f}% of {in_samples / SAMPLE_RATE / 3600:.2f} h of input)" if in_samples else ""
    flac, packed, source = sum(s[3] for s in segs), 2 * samples, sum(b.input_bytes for b in result.books)
    noted = ", ".join(f"{counts[k]} {k}" for k in sorted(INFORMATIONAL) if counts.get(k))
    return [
        f"{len(result.books)} books ({result.cut} cut now, {len(result.books) - result.cut} finished before): "
        f"{len(segs)} segments, {samples / SAMPLE_RATE / 3600:.2f} h of speech{speech}",
        "rejected: " + (", ".join(f"{v} {k}" for k, v in sorted(rejected.items())) or "none")
        + (f"; noted: {noted}" if noted else "") + f" -- details in {out / 'report.tsv'}",
        f"disk: segments as FLAC {flac / 1e9:.3f} GB (the input FLAC: {source / 1e9:.3f} GB); "
        f"packed as int16 (--pack) {packed / 1e9:.3f} GB more, 115.2 MB per hour of speech",
    ]
