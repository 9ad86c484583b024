"""`python -m pretrain.report RUN [--out DIR]`: one page on how a run went, read back from its
`metrics.jsonl` and `config.json`.

Writes into DIR (default RUN/report) one PNG per group of metrics the run logged (loss, accuracy,
codebook, targets, wer, optim, speed, skipped), and `report.md` / `report.html`: the key config,
final and best numbers, the plots and health verdicts. Serves wav2vec 2.0 and data2vec pretraining
runs and CTC fine-tuning runs alike (`python -m finetune.report` is this same engine).
"""

from __future__ import annotations

import argparse
import html
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from pretrain.health import ReportError, Run, Verdict, finite_points, judged_loss, load_run, verdicts

@dataclass(frozen=True)
class Plot:
    name: str
    title: str
    left: tuple[str, ...]
    right: tuple[str, ...] = ()  # on a second y axis
    right_log: bool = False
    only_if_nonzero: bool = False  # drawn only when a left-axis value is above zero


PLOTS = (
    Plot("loss", "loss and its terms", ("loss", "contrastive", "target_energy"),
         ("diversity", "features_pen", "loss_per_token")),
    Plot("accuracy", "contrastive accuracy", ("accuracy",)),
    Plot("codebook", "codebook perplexity, Gumbel temperature", ("prob_perplexity", "code_perplexity"), ("temperature",)),
    Plot("targets", "data2vec target / prediction variance, EMA decay", ("target_var", "pred_var"), ("ema_decay",)),
    Plot("wer", "validation WER / CER (%)", ("wer", "cer")),
    Plot("optim", "learning rate, gradient norm (log)", ("lr",), ("gnorm",), right_log=True),
    Plot("speed", "audio seconds per second, MFU", ("audio_s_per_s",), ("mfu",)),
    Plot("skipped", "skipped updates per log window, fp16 loss scale", ("skipped",), ("loss_scale",), True, True),
)


def config_rows(run: Run) -> list[tuple[str, str]]:
    c, m = run.config, run.model
    d, o, t = (c.get(k, {}) for k in ("data", "optim", "train"))
    objective = {"ctc": "CTC fine-tuning", "data2vec": "data2vec (EMA teacher regression)",
                 "wav2vec2": "wav2vec 2.0 (contrastive, quantized targets)"}[run.kind]
    if m.get("arch") == "data2vec2":
        objective = f"data2vec 2.0 (EMA teacher regression, {m.get('clone_batch')} masks per teacher pass)"
    if c.get("ctc", {}).get("init_from"):
        objective += f" of {c['ctc']['init_from']}"
    rows = [("run", str(run.path.resolve())), ("preset", c.get("preset", "? (no config.json)")), ("objective", objective)]
    if m:
        codebook = f", codebook {m.get('latent_groups')} x {m.get('latent_vars')}" if run.kind == "wav2vec2" else ""
        rows.append(("model", f"{m.get('encoder_layers')} layers x {m.get('encoder_embed_dim')} (FFN "
                              f"{m.get('encoder_ffn_embed_dim')}, {m.get('encoder_attention_heads')} heads){codebook}"))
    rows.append(("steps", f"{run.last_step} logged of {t.get('max_steps', '?')}"))
    if d:
        rows.append(("batch", f"max_tokens {d.get('max_tokens'):,} samples per GPU x update_freq {t.get('update_freq', 1)}"))
    if o:  # tri_stage takes its phases from phase_ratio; the other schedules warm up for warmup_updates
        shape = f"phases {o.get('phase_ratio')}" if o.get("schedule") == "tri_stage" else f"warm-up {o.get('warmup_updates')}"
        rows.append(("lr", f"{o.get('lr'):g} ({o.get('schedule')}, {shape})"))
    return rows + ([("precision", str(t.get("precision")))] if t else [])


def numbers(run: Run) -> list[tuple[str, str]]:
    """Final and best values: what one compares between runs."""
    out = []
    if pts := finite_points(run.points("loss")):
        out.append(("last train loss", f"{pts[-1][1]:.4g} (step {pts[-1][0]})"))
    label, pts = judged_loss(run)
    if run.kind == "data2vec" and pts:  # its raw losses move with the teacher's targets
        out.append((f"last train {label}", f"{pts[-1][1]:.4g} (under 1: the student explains part of the targets)"))
    for key, label in (("loss", "valid loss"), ("wer", "valid WER %"), ("cer", "valid CER %")):
        if pts := finite_points(run.points(key, "valid")):
            step, best = min(pts, key=lambda p: p[1])
            out.append((f"best {label}", f"{best:.4g} at step {step} (last {pts[-1][1]:.4g})"))
    for key in ("loss_per_token", "accuracy", "prob_perplexity", "code_perplexity", "temperature",
                "target_energy", "target_var", "pred_var", "ema_decay", "masked_pct"):
        if shown := [f"{split} {run.values(key, split)[-1]:.4g}" for split in ("train", "valid") if run.has(key, split)]:
            of = f" of {run.codes} codes" if "perplexity" in key and run.codes else ""
            out.append((f"final {key.replace('_', ' ')}", ", ".join(shown) + of))
    if speed := run.values("audio_s_per_s"):
        out.append(("throughput", f"{statistics.median(speed):.4g} audio s/s (median)"))
    if mfu := run.values("mfu"):
        out.append(("final MFU", f"{mfu[-1]:.1%}"))
    return out


def draw(run: Run, plot: Plot, out: Path) -> bool:
    """Write `out/<plot.name>.png` if the run logged any of its left-axis metrics."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not any(run.has(k) for k in plot.left):
        return False
    if plot.only_if_nonzero and not any(v > 0 for k in plot.left for v in run.values(k)):
        return False
    fig = Figure(figsize=(7.5, 3.8))
    FigureCanvasAgg(fig)  # Agg: a file, never a window
    ax = fig.subplots()
    twin = ax.twinx() if any(run.has(k) for k in plot.right) else None
    handles, color, right_values = [], 0, []
    for axis, keys in ((ax, plot.left), (twin, plot.right)):
        for key in keys if axis is not None else ():
            for split, style in (("train", "-"), ("valid", "--")):
                pts = run.points(key, split)
                if not finite_points(pts):
                    continue  # e.g. MFU is NaN where the device's peak FLOPs are unknown
                right_values += run.values(key, split) if axis is twin else []
                label = key + (" (valid)" if split == "valid" else "") + (" (right)" if axis is twin else "")
                handles += axis.plot(*zip(*pts), style, marker=".", color=f"C{color}", label=label)
            color += 1
    if plot.right_log and twin is not None and min(right_values) > 0:
        twin.set_yscale("log")
    ax.set_xlabel("update step")
    ax.set_title(plot.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out / f"{plot.name}.png", dpi=100)
    return True


def render_md(run: Run, found: list[Verdict], nums: list[tuple[str, str]], plots: list[str]) -> str:
    lines = [f"# Run report: {run.path.name}", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in config_rows(run)]
    if run.bad_lines:
        lines += ["", f"{run.bad_lines} unreadable line(s) of metrics.jsonl left out (a line cut short by a kill)."]
    lines += ["", "## Health", ""] + [f"- {name}: **{status}** — {text}" for name, status, text in found]
    lines += ["", "## Numbers", "", "| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in nums]
    return "\n".join(lines + ["", "## Plots", ""] + [f"![{p}]({p}.png)\n" for p in plots])


def render_html(run: Run, found: list[Verdict], nums: list[tuple[str, str]], plots: list[str]) -> str:
    e, colors = html.escape, {"ok": "#2e7d32", "warning": "#b26a00", "problem": "#c62828"}

    def table(rows: list[tuple[str, str]]) -> str:
        return "<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows) + "</table>"

    note = f"<p>{run.bad_lines} unreadable line(s) of metrics.jsonl left out.</p>" if run.bad_lines else ""
    health = "".join(f'<li><b>{e(n)}</b>: <b style="color:{colors[s]}">{s}</b> — {e(t)}</li>' for n, s, t in found)
    images = "".join(f'<p><img src="{p}.png" alt="{p}"></p>' for p in plots)
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}th{text-align:left}"
             "td,th{border-bottom:1px solid #ddd;padding:2px 8px}img{max-width:100%}")
    title = f"Run report: {e(run.path.name)}"
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>{style}</style>'
            f"</head><body><h1>{title}</h1>{table(config_rows(run))}{note}<h2>Health</h2><ul>{health}</ul>"
            f"<h2>Numbers</h2>{table(nums)}<h2>Plots</h2>{images}</body></html>\n")


def write_report(run: Run, out: Path) -> list[Verdict]:
    """Write the plots, report.md and report.html into `out`; return the verdicts."""
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    for plot in PLOTS:
        if draw(run, plot, out):
            plots.append(plot.name)
        else:
            (out / f"{plot.name}.png").unlink(missing_ok=True)  # stale from an earlier report
    found, nums = verdicts(run), numbers(run)
    (out / "report.md").write_text(render_md(run, found, nums, plots))
    (out / "report.html").write_text(render_html(run, found, nums, plots))
    return found


def main(argv: list[str] | None = None, prog: str = "python -m pretrain.report") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run directory (holding metrics.jsonl and config.json)")
    p.add_argument("--out", type=Path, help="where the report goes (default RUN/report)")
    args = p.parse_args(argv)
    try:
        run = load_run(args.run)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or args.run / "report"
    for name, status, text in write_report(run, out):
        print(f"{name}: {status} - {text}")
    print(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
