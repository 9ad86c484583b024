"""Two CPU processes (torchrun, gloo) give the losses of one process with update_freq 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_single_and_ddp(common: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """The same run as one process with update_freq 2 (`one`) and as two gloo ranks (`two`)."""
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one"), "--set", "train.update_freq=2"],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *common, "--out", str(tmp_path / "two")], capture_output=True, text=True, cwd=ROOT,
                         timeout=600, env=env)
    (tmp_path / "ddp.log").write_text(ddp.stderr)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return tmp_path / "one", tmp_path / "two"


@pytest.mark.slow
def test_two_rank_ddp_matches_update_freq_two(prepared, tmp_path):
    common = ["-m", "pretrain", "--preset", "wav2vec2_tiny", "--data", str(prepared), "--max-steps", "6",
              "--set", "train.log_interval=1", "--set", "train.valid_interval=1000", "--device", "cpu",
              "--set", "model.encoder_layerdrop=0.0"]
    run_single_and_ddp(common, tmp_path)

    def losses(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["accuracy"]) for r in rows if r["split"] == "train"]

    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [x[0] for x in a] == [x[0] for x in b] == list(range(1, 7))
    for (_, la, aa), (_, lb, ab) in zip(a, b):
        assert abs(la - lb) <= 1e-4 * abs(la), (a, b)
        assert aa == ab


@pytest.mark.slow
def test_data2vec_teachers_stay_identical_under_ddp(prepared, tmp_path):
    import torch

    from pretrain.training import checkpoint as ckpt

    common = ["-m", "pretrain", "--preset", "data2vec_tiny", "--data", str(prepared), "--max-steps", "4",
              "--set", "train.log_interval=1", "--set", "train.valid_interval=1000", "--device", "cpu"]
    run_single_and_ddp(common, tmp_path)
    a, b = ckpt.load(tmp_path / "one"), ckpt.load(tmp_path / "two")
    for k, v in a["task"]["teacher"].items():
        assert torch.allclose(v, b["task"]["teacher"][k], rtol=1e-4, atol=1e-6), k
    rows = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in rows] == [r["split"] for r in ref]  # train x4, then valid
    for r, s in zip(rows, ref):  # validation too: the batch cap is global, each rank takes its share
        assert abs(r["loss"] - s["loss"]) <= 1e-4 * abs(s["loss"]), (r, s)


@pytest.mark.slow
def test_ctc_fine_tuning_under_ddp_matches_update_freq_two(pretrained_run, prepared, tmp_path):
    """Through the frozen period into full training: the frozen encoder leaves parameters without
    gradients, which DDP must accept; losses, WER and final weights match one process."""
    import torch

    from pretrain.training import checkpoint as ckpt

    common = ["-m", "finetune", "--preset", "ctc_tiny", "--init-from", str(pretrained_run), "--data", str(prepared),
              "--max-steps", "4", "--train-split", "train", "--set", "ctc.freeze_finetune_updates=2", "--set", "train.log_interval=1",
              "--set", "train.valid_interval=4", "--set", "train.max_valid_batches=4", "--device", "cpu"]
    run_single_and_ddp(common, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in rows] == [(r["split"], r["step"]) for r in ref]
    for r, s in zip(rows, ref):
        assert abs(r["loss"] - s["loss"]) <= 1e-4 * abs(s["loss"]), (r, s)
    assert rows[-1]["wer"] == ref[-1]["wer"] and rows[-1]["cer"] == ref[-1]["cer"]
    # Adam turns float noise in near-zero gradients into whole steps on a few elements, so the
    # weights agree element-wise only almost everywhere; unsynchronised gradients would differ everywhere.
    a, b = ckpt.load(tmp_path / "one")["model"], ckpt.load(tmp_path / "two")["model"]
    differing = sum(int(((a[k] - b[k]).abs() > 1e-4).sum()) for k in a)
    assert differing <= 1e-3 * sum(v.numel() for v in a.values()), differing
    assert not torch.equal(a["w2v.encoder.layers.0.fc1.weight"], ckpt.load(pretrained_run)["model"]["encoder.layers.0.fc1.weight"])


@pytest.mark.slow
def test_activation_checkpointing_with_layerdrop_under_ddp(prepared, tmp_path):
    """Checkpointed layers, some of them skipped by LayerDrop, on two ranks (DDP with unused
    parameters): the losses of one process with update_freq 2."""
    common = ["-m", "pretrain", "--preset", "data2vec_tiny", "--data", str(prepared), "--max-steps", "4",
              "--set", "train.log_interval=1", "--set", "train.valid_interval=1000", "--device", "cpu",
              "--set", "model.encoder_layerdrop=0.5", "--set", "train.activation_checkpointing=true"]
    run_single_and_ddp(common, tmp_path)
    rows = [[json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("one", "two")]
    a, b = ([(r["step"], r["loss"]) for r in run if r["split"] == "train"] for run in rows)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (_, la), (_, lb) in zip(a, b):
        assert abs(la - lb) <= 1e-4 * abs(la), (a, b)


@pytest.mark.slow
def test_data2vec2_under_ddp_matches_update_freq_two(prepared, tmp_path):
    """The loader draws each batch's masks from (seed, epoch, batch), whichever rank reads it: two
    ranks train as one process with update_freq 2 (losses, masks, teachers)."""
    import torch

    from pretrain.training import checkpoint as ckpt

    common = ["-m", "pretrain", "--preset", "data2vec2_tiny", "--data", str(prepared), "--max-steps", "4",
              "--set", "train.log_interval=1", "--set", "train.valid_interval=1000", "--device", "cpu"]
    run_single_and_ddp(common, tmp_path)
    rows = [[json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("one", "two")]
    a, b = rows
    assert [(r["split"], r["step"]) for r in a] == [(r["split"], r["step"]) for r in b]
    assert [r["step"] for r in a if r["split"] == "train"] == [1, 2, 3, 4]
    for r, s in zip(a, b):  # validation too
        assert abs(r["loss"] - s["loss"]) <= 1e-4 * abs(r["loss"]), (r, s)
        assert r["masked_pct"] == pytest.approx(s["masked_pct"], abs=1e-6), (r, s)
    t1, t2 = ckpt.load(tmp_path / "one")["task"]["teacher"], ckpt.load(tmp_path / "two")["task"]["teacher"]
    assert set(t1) == set(t2) and "alibi_scale" in t1
    for k, v in t1.items():
        assert torch.allclose(v, t2[k], rtol=1e-4, atol=1e-6), k
