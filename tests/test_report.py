"""Run reports (`python -m pretrain.report`, `python -m finetune.report`) on synthetic run
directories: a config.json written as the trainer writes it, metrics.jsonl records shaped as the
metric logger writes them. No training, except the last test, which reuses the session's run."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.report import load_run, main, verdicts
from pretrain.training.trainer import write_config

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = range(50, 501, 50)


def write_run(path: Path, preset: str, rows: list[dict], tail: str = "") -> Path:
    """A run directory as the trainer leaves it: config.json of `preset`, metrics.jsonl of `rows`."""
    if preset.startswith("ctc"):
        from finetune.presets import get_preset
    else:
        from pretrain.presets import get_preset
    path.mkdir(parents=True)
    write_config(path, get_preset(preset))
    # json.dumps writes NaN as the logger does (`"mfu": NaN`)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def _speed(step: int) -> dict:
    return {"lr": 2e-3 * (1 - step / 500) + 1e-6, "gnorm": 0.5 + step / 1000, "skipped": 0,
            "audio_s_per_s": 120.0, "mfu": math.nan}


def wav2vec2_rows(ppl_end: float = 26.0, loss_end: float = 2.7) -> list[dict]:
    """A run whose loss falls 3.5 -> `loss_end` and whose perplexity moves 25 -> `ppl_end` (of 32)."""
    rows = []
    for i, step in enumerate(STEPS):
        f = i / (len(STEPS) - 1)
        ppl = 25 + (ppl_end - 25) * f
        values = {"loss": 3.5 + (loss_end - 3.5) * f, "contrastive": 3.45 + (loss_end - 3.5) * f, "diversity": 0.2,
                  "features_pen": 4.0, "accuracy": 0.1 + 0.2 * f, "prob_perplexity": ppl, "code_perplexity": ppl - 0.5,
                  "temperature": 1.0 - 0.4 * f}
        rows.append({"split": "train", "step": step, "time": 1.0 * step, **values, **_speed(step)})
        if step % 250 == 0:
            rows.append({"split": "valid", "step": step, "time": 1.0 * step, **values})
    return rows


def data2vec_rows(target_end: float = 0.6) -> list[dict]:
    """Loss / target_energy falls 0.9 -> 0.5; target variance moves 0.6 -> `target_end`."""
    rows = []
    for i, step in enumerate(STEPS[:8]):
        f = i / 7
        values = {"loss": 0.9 - 0.4 * f, "target_energy": 1.0, "target_var": 0.6 + (target_end - 0.6) * f,
                  "pred_var": 0.4, "ema_decay": 0.99 + 0.009 * f}
        rows.append({"split": "train", "step": step, "time": 1.0 * step, **values, **_speed(step)})
    return rows


def ctc_rows() -> list[dict]:
    """Loss per token 6.5 -> 1.8; valid WER 90 -> 60 (best, step 400) -> 70, CER 80 -> 50."""
    rows = [{"split": "train", "step": s, "time": 1.0 * s, "loss": 400 - 0.5 * s, "loss_per_token": 6.5 - 0.008 * s,
             **_speed(s)} for s in STEPS]
    for step, wer, cer in ((200, 90.0, 80.0), (400, 60.0, 55.0), (500, 70.0, 50.0)):
        rows.append({"split": "valid", "step": step, "time": 1.0 * step, "loss": 200.0, "loss_per_token": 3.0,
                     "wer": wer, "cer": cer})
    return rows


def statuses(report_md: str) -> dict[str, str]:
    """{check: status} from the Health section of a report.md."""
    return dict(re.findall(r"^- ([a-z ]+): \*\*(ok|warning|problem)\*\* — ", report_md, re.M))


def verdict_of(run: Path, name: str) -> tuple[str, str]:
    found = {n: (status, text) for n, status, text in verdicts(load_run(run))}
    return found[name]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5000, f"{path} is too small to hold a plot"


def test_healthy_wav2vec2_run_gives_plots_numbers_and_ok_verdicts(tmp_path):
    # a last line cut short by a kill is left out, and said so
    run = write_run(tmp_path / "run", "wav2vec2_tiny", wav2vec2_rows(), tail='{"split": "train", "step": 55')
    assert main([str(run)]) == 0
    out = run / "report"
    for name in ("loss", "accuracy", "codebook", "optim", "speed"):
        assert_png(out / f"{name}.png")
    for name in ("targets", "wer", "skipped"):  # metrics this run did not log
        assert not (out / f"{name}.png").exists()
    md = (out / "report.md").read_text()
    assert statuses(md) == {"divergence": "ok", "collapse": "ok", "stalled learning": "ok"}
    assert "| preset | wav2vec2_tiny |" in md and "codebook 2 x 16" in md
    assert "best valid loss" in md and "1 unreadable line" in md
    html = (out / "report.html").read_text()
    assert '<img src="loss.png"' in html and "wav2vec2_tiny" in html


def test_falling_perplexity_turns_collapse_into_a_problem(tmp_path):
    healthy = write_run(tmp_path / "healthy", "wav2vec2_tiny", wav2vec2_rows())
    collapsed = write_run(tmp_path / "collapsed", "wav2vec2_tiny", wav2vec2_rows(ppl_end=2.0))
    assert verdict_of(healthy, "collapse")[0] == "ok"
    status, text = verdict_of(collapsed, "collapse")
    assert status == "problem"
    assert "fell from 25 to 2 of 32 codes" in text, text


def test_data2vec_target_variance_collapse_is_a_problem(tmp_path):
    healthy = write_run(tmp_path / "healthy", "data2vec_tiny", data2vec_rows())
    collapsed = write_run(tmp_path / "collapsed", "data2vec_tiny", data2vec_rows(target_end=0.02))
    assert [s for _, s, _ in verdicts(load_run(healthy))] == ["ok", "ok", "ok"]
    status, text = verdict_of(collapsed, "collapse")
    assert status == "problem" and "Target variance fell from 0.6 to 0.02" in text, text
    assert main([str(collapsed)]) == 0
    assert_png(collapsed / "report" / "targets.png")


def test_nan_loss_is_a_divergence(tmp_path):
    rows = wav2vec2_rows()
    rows[-1]["loss"] = math.nan
    status, text = verdict_of(write_run(tmp_path / "nan", "wav2vec2_tiny", rows), "divergence")
    assert status == "problem" and "not finite" in text and "step 500" in text, text


def test_rising_loss_is_a_divergence(tmp_path):
    rows = wav2vec2_rows()
    last = [r for r in rows if r["split"] == "train"][-1]
    last["loss"] = 6.0  # over 1.5x the minimum the run reached
    assert verdict_of(write_run(tmp_path / "rise", "wav2vec2_tiny", rows), "divergence")[0] == "problem"


def test_flat_loss_is_stalled(tmp_path):
    run = write_run(tmp_path / "flat", "wav2vec2_tiny", wav2vec2_rows(loss_end=3.5))
    assert verdict_of(run, "stalled learning")[0] == "problem"


def test_ctc_run_plots_wer_and_names_the_best_step(tmp_path):
    from finetune.report import main as finetune_main

    run = write_run(tmp_path / "ctc", "ctc_tiny", ctc_rows())
    assert finetune_main([str(run), "--out", str(tmp_path / "out")]) == 0
    assert_png(tmp_path / "out" / "wer.png")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| best valid WER % | 60 at step 400 (last 70) |" in md
    assert statuses(md) == {"divergence": "ok", "stalled learning": "ok"}  # no codebook, no collapse check


def test_cli_exit_codes(tmp_path):
    run = write_run(tmp_path / "run", "wav2vec2_tiny", wav2vec2_rows())
    cmd = [sys.executable, "-m", "pretrain.report"]
    ok = subprocess.run(cmd + [str(run)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "collapse: ok" in ok.stdout and (run / "report" / "report.html").exists()
    missing = subprocess.run(cmd + [str(tmp_path / "nowhere")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert missing.returncode == 2 and "nowhere is not a directory" in missing.stderr
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2


@pytest.mark.slow
def test_report_of_a_real_tiny_run(pretrained_run, tmp_path):
    assert main([str(pretrained_run), "--out", str(tmp_path)]) == 0
    assert_png(tmp_path / "loss.png")
    md = (tmp_path / "report.md").read_text()
    assert set(statuses(md)) == {"divergence", "collapse", "stalled learning"}
    assert "| preset | wav2vec2_tiny |" in md
