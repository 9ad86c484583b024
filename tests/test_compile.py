"""`train.compile`: compiled transformer blocks give the eager losses and gradients for every
objective, one graph serves every batch length, the Gumbel quantizer compiles without NaNs, and
a run (one process, and two under torchrun) trains with it.

Compiled vs eager comparisons run with dropout off: a compiled graph draws its dropout masks with
inductor's generator, not the eager kernels', so masks differ (they stay seeded: a resumed run
draws the same ones). Tolerance (fp32): losses to rtol 1e-4; each gradient to rtol 1e-4 plus an
atol of 1e-5 times that tensor's largest gradient. Seen on the tiny models: losses equal to 2e-7,
gradients within 1.6e-6 of their tensor's largest value.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, metric_rows, pretrain_cmd, run_ok
from torch._dynamo.utils import counters

from data_prep.loader import Batch
from pretrain.build import build_task
from pretrain.models.compiled import compile_task, inductor_problem, set_compiled
from pretrain.presets import get_preset

RTOL, ATOL_OF_MAX = 1e-4, 1e-5


def no_dropout(cfg):
    for name in ("dropout", "attention_dropout", "activation_dropout", "dropout_input", "dropout_features",
                 "decoder_dropout", "encoder_layerdrop"):
        setattr(cfg, name, 0.0)
    return cfg


def batch(samples: int, seed: int = 1) -> Batch:
    """Two utterances, the second 20% shorter (padding, hence an attention mask)."""
    waves = torch.from_numpy(np.random.default_rng(seed).standard_normal((2, samples)).astype(np.float32) * 0.1)
    padding = torch.zeros(2, samples, dtype=torch.bool)
    padding[1, int(samples * 0.8):] = True
    return Batch(waves, padding, torch.arange(2))


def modules(task) -> list[torch.nn.Module]:
    teacher = getattr(getattr(task, "teacher", None), "model", None)
    return [task.model] + ([teacher] if teacher is not None else [])


def loss_and_grads(task, b: Batch, compiled: bool, step: int = 0):
    set_compiled(modules(task), compiled)
    task.model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # Gumbel noise, data2vec 2.0's decoder noise
    record = task.train_step(task.model, b, np.random.default_rng([3, step]))
    record.loss.backward()
    grads = {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}
    return record.loss.item(), grads


def assert_same(eager, compiled):
    (loss_e, grads_e), (loss_c, grads_c) = eager, compiled
    assert math.isfinite(loss_c) and loss_c == pytest.approx(loss_e, rel=RTOL)
    assert grads_e.keys() == grads_c.keys() and len(grads_e) > 10
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, rtol=RTOL, atol=ATOL_OF_MAX * float(g.abs().max()), msg=name)


@pytest.mark.parametrize("preset", ["wav2vec2_tiny", "data2vec_tiny", "data2vec2_tiny"])
def test_compiled_blocks_give_the_eager_loss_and_gradients(preset):
    torch.manual_seed(0)
    task = build_task(no_dropout(get_preset(preset).model))
    task.model.train()
    b = batch(20_000)
    assert_same(loss_and_grads(task, b, False), loss_and_grads(task, b, True))
    set_compiled(modules(task), False)


def test_compiled_ctc_model_gives_the_eager_loss_and_gradients():
    """Time and channel masks on, padding, the frozen (no-grad) period and full training."""
    from finetune.model import CTCModel
    from finetune.task import ctc_loss

    torch.manual_seed(0)
    model = CTCModel(no_dropout(get_preset("wav2vec2_tiny").model), 12).train()
    b = batch(20_000, seed=2)
    frames = int(model.w2v.feature_extractor.output_lengths(torch.tensor(20_000)))
    time_mask = torch.zeros(2, frames, dtype=torch.bool)
    time_mask[:, 10:20] = True
    channel_mask = torch.zeros(2, model.cfg.encoder_embed_dim, dtype=torch.bool)
    channel_mask[0, :8] = True
    targets = [[4, 5, 6, 7, 5], [8, 9, 4]]

    def run(compiled: bool, frozen: bool):
        set_compiled([model], compiled)
        model.zero_grad(set_to_none=True)
        logits, pad = model(b.source, b.padding_mask, time_mask, channel_mask, frozen=frozen)
        loss = ctc_loss(logits, model.output_lengths(logits, pad), targets)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert_same(run(False, False), run(True, False))
    frozen_eager, frozen_compiled = run(False, True), run(True, True)
    assert frozen_compiled[1].keys() == {"proj.weight", "proj.bias"}
    assert frozen_compiled[0] == pytest.approx(frozen_eager[0], rel=RTOL)
    set_compiled([model], False)


def test_batch_lengths_do_not_recompile():
    """Batch and time are symbolic: after the first length, four more (and a batch size of 3)
    reuse the same graphs."""
    torch.manual_seed(0)
    task = build_task(no_dropout(get_preset("wav2vec2_tiny").model))
    task.model.train()
    set_compiled(modules(task), True)
    loss_and_grads(task, batch(16_000), True)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    for i, samples in enumerate((17_600, 19_200, 23_999, 30_000)):
        loss, _ = loss_and_grads(task, batch(samples, seed=i), True, step=i)
        assert math.isfinite(loss)
    wider = Batch(torch.randn(3, 18_000) * 0.1, torch.zeros(3, 18_000, dtype=torch.bool), torch.arange(3))
    wider.padding_mask[2, 15_000:] = True
    loss_and_grads(task, wider, True)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]  # each block is one whole graph
    set_compiled(modules(task), False)


def test_activation_checkpointing_replays_the_compiled_dropout():
    """Dropout on: a checkpointed compiled block recomputes with the same (inductor) masks."""
    from pretrain.models.encoder import set_activation_checkpointing

    torch.manual_seed(0)
    task = build_task(get_preset("wav2vec2_tiny").model)
    task.model.train()
    b = batch(20_000)
    plain = loss_and_grads(task, b, True)
    set_activation_checkpointing(task.model, True)
    assert_same(plain, loss_and_grads(task, b, True))
    set_activation_checkpointing(task.model, False)
    set_compiled(modules(task), False)


def test_compiled_dropout_is_seeded_and_drops_the_requested_share():
    from pretrain.models.ops import dropout

    drop = torch.compile(lambda x: dropout(x, 0.3, True))
    torch.manual_seed(0)
    y = drop(torch.ones(200_000))
    assert abs(float((y == 0).float().mean()) - 0.3) < 0.01
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.7))
    torch.manual_seed(0)
    assert torch.equal(drop(torch.ones(200_000)), y)  # a resumed run draws the same masks


def test_compiled_gumbel_quantizer_matches_eager_without_nans():
    """pytorch#127749: inductor's exponential_ could return 0, so the hard Gumbel softmax got
    +inf noise and NaN codes. With inductor drawing through the eager kernels (`fallback_random`)
    the compiled quantizer gives the eager codes and gradients for a seed; with its own generator
    (what a run uses) it stays finite over 2**25 draws, where that bug would give about 2 NaNs."""
    import torch._inductor.config as inductor_config

    from pretrain.models.quantizer import GumbelQuantizer

    torch.manual_seed(0)
    quantizer = GumbelQuantizer(32, 16, 2, 16).train()
    quantizer.temperature = 0.5
    x = torch.randn(4, 50, 32) * 3
    weights = torch.randn(4, 50, 16)

    def run(fn):
        quantizer.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        out = fn(x)
        (out.x * weights).sum().add(out.prob_perplexity).backward()
        return out.x.detach(), {n: p.grad.clone() for n, p in quantizer.named_parameters()}

    with inductor_config.patch(fallback_random=True):
        (q_e, g_e), (q_c, g_c) = run(quantizer), run(torch.compile(quantizer, dynamic=True))
    torch.testing.assert_close(q_c, q_e, rtol=0, atol=0)  # the same codes picked
    for name in g_e:
        torch.testing.assert_close(g_c[name], g_e[name], rtol=RTOL, atol=ATOL_OF_MAX * float(g_e[name].abs().max()),
                                   msg=name)
    native = torch.compile(lambda v: quantizer(v), dynamic=True)  # its own cache entry, inductor's generator
    q_n, g_n = run(native)
    assert torch.isfinite(q_n).all() and all(torch.isfinite(g).all() for g in g_n.values())
    assert not torch.equal(q_n, q_e)  # really inductor's draws, not the eager ones
    with torch.no_grad():
        big = torch.randn(2**19, 32) * 3  # 2**19 frames x 2 groups x 16 entries = 2**24 draws per call
        for _ in range(2):
            out = native(big)
            assert torch.isfinite(out.x).all() and torch.isfinite(out.prob_perplexity)


def test_inductor_problem_is_reported_before_training(monkeypatch):
    import torch._inductor.config as inductor_config

    assert inductor_problem(torch.device("cpu")) is None  # g++ is here
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    task = build_task(get_preset("wav2vec2_tiny").model)
    with pytest.raises(ValueError, match="train.compile=true needs .*C\\+\\+ compiler"):
        compile_task(task, True, torch.device("cpu"))
    assert not any(getattr(m, "use_compiled", False) for m in task.model.modules())
    compile_task(task, False, torch.device("cpu"))  # off: nothing to check


@pytest.mark.slow
def test_compiled_run_trains_alone_and_under_torchrun(prepared, tmp_path):
    """Three updates with the preset's dropout, in one process and as two gloo ranks, under DDP
    and under FSDP (compiled blocks inside FSDP's per-block wrapping)."""
    common = ["--max-steps", "3", "--set", "train.log_interval=1", "--set", "train.valid_interval=1000",
              "--set", "train.compile=true", "--device", "cpu"]
    run_ok(pretrain_cmd("wav2vec2_tiny", prepared, tmp_path / "one", *common))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for run, parallelism in (("two", "ddp"), ("fsdp", "fsdp")):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               *pretrain_cmd("wav2vec2_tiny", prepared, tmp_path / run, *common)[1:],
                               "--set", f"train.parallelism={parallelism}"],
                              capture_output=True, text=True, cwd=ROOT, timeout=600, env=env, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for run in ("one", "two", "fsdp"):
        rows = metric_rows(tmp_path / run)
        assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows), rows
        assert json.loads((tmp_path / run / "config.json").read_text())["train"]["compile"] is True
    # the same two ranks, batches and dropout seeds: FSDP's losses are DDP's up to float rounding
    for a, b in zip(metric_rows(tmp_path / "fsdp"), metric_rows(tmp_path / "two")):
        assert abs(a["loss"] - b["loss"]) <= 1e-3 * abs(b["loss"]), (a, b)
