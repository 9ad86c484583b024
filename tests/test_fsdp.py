"""`train.parallelism=fsdp`: two CPU ranks (torchrun, gloo) sharding the model with FSDP2 train as
two DDP ranks and as one process with update_freq 2, LayerDrop and the EMA teacher included;
their checkpoints are single-process ones; a killed run resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_ddp import run_single_and_ddp

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
FSDP = ["--set", "train.parallelism=fsdp"]


def _fsdp_cmd(common: list[str], out: Path) -> list[str]:
    return [*TORCHRUN, *common, *FSDP, "--out", str(out)]


def _run_fsdp(common: list[str], out: Path) -> None:
    proc = subprocess.run(_fsdp_cmd(common, out), capture_output=True, text=True, cwd=ROOT, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _rows(run: Path, split: str | None = "train") -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if split is None or r["split"] == split]


def _close(a: list[dict], b: list[dict], key: str = "loss", rel: float = 1e-4) -> None:
    assert [(r["split"], r["step"]) for r in a] == [(r["split"], r["step"]) for r in b]
    for r, s in zip(a, b):  # measured: equal to the last digit on this CPU
        assert abs(r[key] - s[key]) <= rel * abs(s[key]), (a, b)


def test_unknown_parallelism_is_refused():
    from pretrain.config import TrainConfig

    with pytest.raises(ValueError, match="train.parallelism must be one of ddp, fsdp, got 'zero3'"):
        TrainConfig(parallelism="zero3").validate()


@pytest.mark.slow
def test_fsdp_matches_ddp_and_update_freq_two_with_layerdrop(prepared, tmp_path):
    """LayerDrop 0.5 on two blocks: ranks drop different blocks (ghost blocks keep FSDP's
    collectives in step) and some blocks no rank runs (no gradient, as under DDP). Then the
    checkpoint: the single-process format and values, resumable by one process, exportable."""
    from safetensors.torch import load_file

    from pretrain.training import checkpoint as ckpt

    common = ["-m", "pretrain", "--preset", "wav2vec2_tiny", "--data", str(prepared), "--max-steps", "6",
              "--set", "train.log_interval=1", "--set", "train.valid_interval=6", "--device", "cpu",
              "--set", "model.encoder_layerdrop=0.5"]
    one, ddp = run_single_and_ddp(common, tmp_path)
    _run_fsdp(common, tmp_path / "fsdp")
    fsdp = tmp_path / "fsdp"
    for other in (ddp, one):
        _close(_rows(fsdp, None), _rows(other, None))
        _close(_rows(fsdp), _rows(other), "gnorm")
        assert [r["accuracy"] for r in _rows(fsdp)] == [r["accuracy"] for r in _rows(other)]

    a, b = ckpt.load(fsdp), ckpt.load(one)
    assert a["model"].keys() == b["model"].keys()
    for k, v in b["model"].items():
        assert a["model"][k].dtype == v.dtype and torch.allclose(a["model"][k], v, rtol=1e-4, atol=1e-6), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]  # positions, whole tensors
    assert sa.keys() == sb.keys() and a["optimizer"]["param_groups"][0]["params"] == b["optimizer"]["param_groups"][0]["params"]
    for i in sb:
        assert torch.allclose(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"], rtol=1e-4, atol=1e-12), i

    # one process resumes the FSDP run's checkpoint (optimizer included) as it resumes its own
    cont = common[:common.index("--max-steps") + 1] + ["8"] + common[common.index("--max-steps") + 2:]
    for run in (fsdp, one):
        proc = subprocess.run([sys.executable, *cont, "--out", str(run), "--set", "train.update_freq=2"],
                              capture_output=True, text=True, cwd=ROOT, timeout=600, env=ENV)
        assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-2000:]
    _close(_rows(fsdp)[6:], _rows(one)[6:])

    exports = []
    for run in (fsdp, one):
        out = tmp_path / f"export_{run.name}"
        proc = subprocess.run([sys.executable, "-m", "pretrain.export", str(run), "--format", "safetensors", "--out", str(out)],
                              capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        exports.append({k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()})
    assert exports[0] and exports[0].keys() == exports[1].keys()
    assert all(torch.allclose(exports[0][k], exports[1][k], rtol=1e-4, atol=1e-6) for k in exports[1])


@pytest.mark.slow
def test_fsdp_data2vec_teacher_and_sigkill_resume(prepared, tmp_path):
    """data2vec: the EMA teacher is sharded as the student (a local update per rank) and saved whole
    in fp32; losses, validation and teacher are those of one process with update_freq 2. Then
    SIGKILL to the launcher and both ranks at once (a lost node): the rerun resumes the sharded
    model, optimizer and teacher from the whole-tensor checkpoint and logs the same losses."""
    from pretrain.training import checkpoint as ckpt

    common = ["-m", "pretrain", "--preset", "data2vec_tiny", "--data", str(prepared), "--max-steps", "10",
              "--set", "train.log_interval=1", "--set", "train.save_interval=4", "--set", "train.valid_interval=1000",
              "--device", "cpu", "--set", "model.encoder_layerdrop=0.3"]
    ref, run, one = tmp_path / "ref", tmp_path / "killed", tmp_path / "one"
    _run_fsdp(common, ref)
    single = subprocess.run([sys.executable, *common, "--out", str(one), "--set", "train.update_freq=2"],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    _close(_rows(ref, None), _rows(one, None))  # train x10, then valid
    a, b = ckpt.load(ref)["task"]["teacher"], ckpt.load(one)["task"]["teacher"]
    assert a.keys() == b.keys()
    for k, v in b.items():
        assert a[k].dtype == torch.float32 and torch.allclose(a[k], v, rtol=1e-4, atol=1e-6), k

    proc = subprocess.Popen(_fsdp_cmd(common, run), cwd=ROOT, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step_00000004.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(0.5)  # a few updates past the checkpoint
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(_rows(run)) < 10, "killed too late to test a resume"
    again = subprocess.run(_fsdp_cmd(common, run), capture_output=True, text=True, cwd=ROOT, timeout=600, env=ENV)
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-3000:]
    a, b = _rows(ref), _rows(run)
    assert [r["step"] for r in b] == list(range(1, 11))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    t_ref, t_run = ckpt.load(ref)["task"]["teacher"], ckpt.load(run)["task"]["teacher"]
    assert all(torch.equal(t_ref[k], t_run[k]) for k in t_ref)


class _Net(torch.nn.Module):
    """A transformer encoder, and a layer that never gets a gradient."""

    def __init__(self) -> None:
        from pretrain.models.encoder import TransformerEncoder

        super().__init__()
        self.encoder = TransformerEncoder(8, 16, 2, 2, 0.0, 0.0, 0.0, 0.0, False, 4, 2)
        self.unused = torch.nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[0].square().sum()


def _helpers_on_two_ranks(rank: int, port: int) -> None:
    """Compared with the same model whole on every rank: clipping, fp16 loss scaling, the
    optimizer state round trip (a parameter without gradients stays without state), the EMA step."""
    import copy
    from types import SimpleNamespace

    import torch.distributed as dist
    from pretrain.distributed import DistInfo
    from pretrain.objectives.ema import EMATeacher
    from pretrain.training import parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = _Net()
        task = SimpleNamespace(model=model, teacher=EMATeacher(model.encoder))
        whole = copy.deepcopy(model)
        xs = [torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(r)) for r in range(2)]
        for x in xs:  # the gradient of the mean over ranks
            (whole(x) / 2).backward()
        parallel.wrap_model(task, torch.device("cpu"), DistInfo(rank, 2), "fsdp", "fp32")
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        scaler = parallel.grad_scaler(model, torch.device("cpu"), 8.0, enabled=True)
        scaler.scale(model(xs[rank])).backward()
        if rank == 1:  # an overflow in one rank's shard: both ranks skip the step and lower the scale
            model.encoder.layers[0].fc1.weight.grad.to_local()[0, 0] = float("inf")
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == 4.0 and not opt.state
        opt.zero_grad()
        model(xs[rank]).backward()
        params = [p for p in model.parameters() if p.requires_grad]
        ref = torch.nn.utils.clip_grad_norm_(whole.parameters(), 0.5)
        total = parallel.clip_grad_norm(params, 0.5)
        assert type(total) is torch.Tensor and torch.allclose(total, ref, rtol=1e-5), (total, ref)
        for (name, p), q in zip(model.named_parameters(), whole.parameters()):
            if q.grad is not None:
                assert torch.allclose(p.grad.full_tensor(), q.grad, rtol=1e-4, atol=1e-7), name
        opt.step()
        task.teacher.update(model.encoder, 0.5)
        teacher = task.teacher.state_dict()  # every rank calls; rank 0 gets the whole teacher
        saved = parallel.optimizer_state(model, opt)
        state = [saved]
        dist.broadcast_object_list(state)
        fresh = copy.deepcopy(whole)
        parallel.wrap_model(SimpleNamespace(model=fresh), torch.device("cpu"), DistInfo(rank, 2), "fsdp", "fp32")
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
        parallel.load_optimizer_state(fresh, fresh_opt, state[0])
        names = [n for n, _ in model.named_parameters()]
        stateful = {names[i] for i in state[0]["state"]}
        assert stateful and not any(n.startswith("unused.") for n in stateful)
        for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
            assert (p in opt.state) == (q in fresh_opt.state) == (name in stateful), name
            if name in stateful:
                assert torch.equal(opt.state[p]["exp_avg"].to_local(), fresh_opt.state[q]["exp_avg"].to_local()), name
        if rank == 0:
            student = parallel.model_state(model)
        else:
            parallel.model_state(model)
        if rank == 0:
            for k, v in teacher.items():
                assert torch.allclose(v, 0.5 * whole.encoder.state_dict()[k] + 0.5 * student[f"encoder.{k}"],
                                      atol=1e-6) or k.startswith("pos_conv."), k
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_helpers_match_whole_model():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_helpers_on_two_ranks, args=(port,), nprocs=2)
