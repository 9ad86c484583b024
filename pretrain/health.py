"""Health verdicts on a run (divergence, collapse, stalled learning), read back from its
`metrics.jsonl` and `config.json`; `pretrain.report` draws and writes them."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

# Health thresholds. Each logged value is a mean over `train.log_interval` updates, so one noisy
# update does not trip them.
#: fewer train records than this cannot show a trend
MIN_RECORDS = 3
#: a last loss this many times the run's minimum is a divergence: a healthy run ends near its minimum
RISE_WARNING, RISE_PROBLEM = 1.2, 1.5
#: share of updates skipped (non-finite, or fp16 overflow); a few while the fp16 scaler settles are normal
SKIPPED_WARNING, SKIPPED_PROBLEM = 0.01, 0.05
#: codebook perplexity under this share of its G x V entries: most codes unused (the trainer warns at the same share)
CODEBOOK_MIN_SHARE = 0.1
#: contrastive accuracy over the last third under this multiple of chance, 1 / (1 + negatives): nothing learned
CHANCE_FACTOR = 1.5
#: data2vec target or prediction variance under this share of its first value: collapsing to a constant.
#: The absolute floors are the run's `model.min_target_var` / `min_pred_var` (fairseq's stop values).
VARIANCE_MIN_SHARE = 0.1
VARIANCE_FLOORS = {"target_var": ("min_target_var", 0.1), "pred_var": ("min_pred_var", 0.01)}
#: the loss over the last third of the records must be this much (relative) under the first third's
STALL_MIN_DROP = 0.02
#: a CTC run's valid WER / CER must fall this many points (%) under its first validation
WER_MIN_GAIN = 1.0

STATUSES = ("ok", "warning", "problem")
Verdict = tuple[str, str, str]  # (check, status, sentence)
Points = list[tuple[int, float]]


class ReportError(Exception):
    """The run directory cannot be reported on."""


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def finite_points(points: Points) -> Points:
    return [(s, v) for s, v in points if math.isfinite(v)]


@dataclass
class Run:
    path: Path
    config: dict
    rows: list[dict]
    bad_lines: int = 0

    def points(self, key: str, split: str = "train") -> Points:
        """(step, value) of `key` in `split`, NaN included (a plot shows it as a gap)."""
        return [(r["step"], float(r[key])) for r in self.rows if r.get("split") == split and _num(r.get(key))]

    def values(self, key: str, split: str = "train") -> list[float]:
        return [v for _, v in finite_points(self.points(key, split))]

    def has(self, key: str, split: str | None = None) -> bool:
        return any(self.values(key, s) for s in ([split] if split else ["train", "valid"]))

    @property
    def model(self) -> dict:
        return self.config.get("model", {})

    @property
    def kind(self) -> str:
        """`ctc`, `data2vec` or `wav2vec2`: from config.json, else from what was logged."""
        if "ctc" in self.config or self.has("wer"):
            return "ctc"
        return "data2vec" if self.model.get("arch") == "data2vec" or self.has("target_var") else "wav2vec2"

    @property
    def codes(self) -> int:
        """Codebook entries, G x V (0 when unknown)."""
        return self.model.get("latent_vars", 0) * self.model.get("latent_groups", 0)

    @property
    def last_step(self) -> int:
        return max(r["step"] for r in self.rows)


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """The records of a `metrics.jsonl`, the last one per (split, step), and how many lines could
    not be read (a line cut short by a kill)."""
    records: dict[tuple[str, int], dict] = {}
    bad = 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)  # Python's json reads the NaN / Infinity the logger writes
        except ValueError:
            row = None
        if isinstance(row, dict) and _num(row.get("step")):
            records[(str(row.get("split", "train")), int(row["step"]))] = row
        elif line.strip():
            bad += 1
    return sorted(records.values(), key=lambda r: (r["step"], r.get("split") != "train")), bad


def load_run(path: Path) -> Run:
    if not path.is_dir():
        raise ReportError(f"{path} is not a directory")
    metrics = path / "metrics.jsonl"
    if not metrics.exists():
        raise ReportError(f"no metrics.jsonl in {path}: not a run directory of `python -m pretrain` or "
                          "`python -m finetune`, or the run has not logged yet")
    rows, bad = read_metrics(metrics)
    if not rows:
        raise ReportError(f"{metrics} holds no readable record")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}  # the metrics still make a report; the header says the preset is unknown
    return Run(path, config, rows, bad)


def _thirds(values: list[float]) -> tuple[float, float]:
    """Mean of the first and of the last third of `values`."""
    k = max(1, len(values) // 3)
    return statistics.fmean(values[:k]), statistics.fmean(values[-k:])


def judged_loss(run: Run) -> tuple[str, Points]:
    """The train loss the verdicts follow over time: per token for CTC (the summed loss grows with
    the batch), relative to `target_energy` for data2vec (its targets move as the teacher learns)."""
    if run.kind == "data2vec" and run.has("target_energy", "train"):
        pts = [(r["step"], r["loss"] / r["target_energy"]) for r in run.rows if r.get("split") == "train"
               and _num(r.get("loss")) and _num(r.get("target_energy")) and r["target_energy"] > 0]
        return "loss / target_energy", finite_points(pts)
    key = "loss_per_token" if run.has("loss_per_token", "train") else "loss"
    return key.replace("_", " "), finite_points(run.points(key))


def _grade(value: float, warning: float, problem: float) -> str:
    return "problem" if value > problem else "warning" if value > warning else "ok"


def _combine(name: str, parts: list[tuple[str, str]]) -> Verdict:
    status = max((s for s, _ in parts), key=STATUSES.index, default="ok")
    return name, status, " ".join(text for _, text in parts)


def divergence(run: Run) -> Verdict:
    parts = []
    bad = [r for r in run.rows if _num(r.get("loss")) and not math.isfinite(r["loss"])]
    if bad:
        parts.append(("problem", f"The loss was not finite in {len(bad)} record(s), first at {bad[0]['split']} "
                                 f"step {bad[0]['step']} ({bad[0]['loss']})."))
    label, pts = judged_loss(run)
    if len(pts) >= 2:
        (low_step, low), (last_step, last) = min(pts, key=lambda p: p[1]), pts[-1]
        ratio = last / low if low > 0 else 1.0
        parts.append((_grade(ratio, RISE_WARNING, RISE_PROBLEM),
                      f"The {label} ended at {last:.4g} (step {last_step}), {ratio:.2f}x its minimum {low:.4g} "
                      f"(step {low_step}; over {RISE_WARNING}x warns, over {RISE_PROBLEM}x is a problem)."))
    elif not bad:
        parts.append(("warning", f"Only {len(pts)} finite train {label} value(s): nothing to compare."))
    skipped = sum(run.values("skipped"))
    share = skipped / max(run.last_step, 1)
    parts.append((_grade(share, SKIPPED_WARNING, SKIPPED_PROBLEM),
                  f"{skipped:.0f} of {run.last_step} updates were skipped ({share:.1%})." if skipped
                  else "No update was skipped."))
    return _combine("divergence", parts)


def collapse_wav2vec2(run: Run) -> Verdict:
    parts = []
    for key in ("prob_perplexity", "code_perplexity"):
        if not (values := run.values(key)):
            continue
        label, first, last, of = key.replace("_", " ").capitalize(), values[0], values[-1], f" of {run.codes} codes"
        if not run.codes:
            parts.append(("ok", f"{label} {first:.3g} -> {last:.3g} (codebook size unknown: no config.json)."))
        elif last < CODEBOOK_MIN_SHARE * run.codes:  # falling there is a collapse; starting there, a worry
            how = "fell from" if last < first else "stayed low, from"
            parts.append(("problem" if last < first else "warning",
                          f"{label} {how} {first:.3g} to {last:.3g}{of} (under {CODEBOOK_MIN_SHARE:.0%})."))
        else:
            parts.append(("ok", f"{label} {first:.3g} -> {last:.3g}{of}."))
    accuracy, negatives = run.values("accuracy"), run.model.get("num_negatives")
    if accuracy and negatives:
        chance, late = 1 / (1 + negatives), _thirds(accuracy)[1]
        if late >= CHANCE_FACTOR * chance:
            parts.append(("ok", f"Accuracy {late:.3f} over the last third, {late / chance:.1f}x chance ({chance:.3f})."))
        elif len(accuracy) < MIN_RECORDS:
            parts.append(("warning", f"Accuracy {late:.3f} is near chance ({chance:.3f}) after only "
                                     f"{len(accuracy)} record(s): too early to tell."))
        else:
            parts.append(("problem", f"Accuracy {late:.3f} over the last third is stuck near chance "
                                     f"({chance:.3f}, 1 in {1 + negatives})."))
    return _combine("collapse", parts or [("warning", "No codebook or accuracy metric was logged.")])


def collapse_data2vec(run: Run) -> Verdict:
    parts = []
    for key, (floor_key, default) in VARIANCE_FLOORS.items():
        if not (values := run.values(key)):
            continue
        label = "Target variance" if key == "target_var" else "Prediction variance"
        floor, first, last = run.model.get(floor_key, default), values[0], values[-1]
        if last < floor:
            parts.append(("problem", f"{label} fell from {first:.3g} to {last:.3g}, under the floor {floor:g} "
                                     f"(model.{floor_key})."))
        elif last < VARIANCE_MIN_SHARE * first:
            parts.append(("problem", f"{label} fell from {first:.3g} to {last:.3g}, "
                                     f"under {VARIANCE_MIN_SHARE:.0%} of where it began."))
        else:
            parts.append(("ok", f"{label} {first:.3g} -> {last:.3g} (floor {floor:g})."))
    return _combine("collapse", parts or [("warning", "No target or prediction variance was logged.")])


def stalled(run: Run) -> Verdict:
    label, pts = judged_loss(run)
    parts = []
    if len(pts) < MIN_RECORDS:
        parts.append(("warning", f"Only {len(pts)} train record(s): too few to judge a trend."))
    else:
        early, late = _thirds([v for _, v in pts])
        drop = 1 - late / early if early > 0 else 0.0
        parts.append(("ok" if drop >= STALL_MIN_DROP else "problem",
                      f"The {label} averaged {early:.4g} over the first third of the records and {late:.4g} "
                      f"over the last: {drop:.1%} lower (at least {STALL_MIN_DROP:.0%} expected)."))
    if run.kind == "ctc":
        texts, stuck = [], []
        for key in ("wer", "cer"):
            if len(pts := finite_points(run.points(key, "valid"))) < 2:
                continue
            best = min(pts, key=lambda p: p[1])
            texts.append(f"{key.upper()} {pts[0][1]:.1f} (step {pts[0][0]}) -> best {best[1]:.1f} (step {best[0]})")
            if pts[0][1] - best[1] < WER_MIN_GAIN:
                stuck.append(key.upper())
        if not texts:
            parts.append(("warning", "Fewer than 2 validations: cannot tell whether WER improves."))
        else:  # one of WER / CER stuck: a warning (WER lags CER early on); both: a problem
            status = "ok" if not stuck else "problem" if len(stuck) == len(texts) else "warning"
            gain = f": {' and '.join(stuck)} did not improve by {WER_MIN_GAIN:g} point" if stuck else ""
            parts.append((status, "Valid " + "; ".join(texts) + gain + "."))
    return _combine("stalled learning", parts)


def verdicts(run: Run) -> list[Verdict]:
    """Health checks as (name, 'ok' | 'warning' | 'problem', sentence with the numbers)."""
    collapse = {"wav2vec2": collapse_wav2vec2, "data2vec": collapse_data2vec}.get(run.kind)
    return [divergence(run)] + ([collapse(run)] if collapse else []) + [stalled(run)]
