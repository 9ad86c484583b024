"""How the model is spread over ranks (`train.parallelism`): wrapping, gradient accumulation
without communication, gradient clipping over the ranks' gradients, loss scaling, and the
whole-model state dicts that checkpoints hold.

`ddp`: DistributedDataParallel, a whole model per rank. `fsdp`: FSDP2 (`fully_shard`) on every
transformer block, then on the rest of the model as one group; the EMA teacher (data2vec,
data2vec 2.0) is sharded the same way, so its update is a local op on matching shards. Parameters,
gradients and optimizer state are sharded along dim 0 over all ranks; checkpoints hold whole
tensors in the single-process format, so any run, exporter or `--init-from` reads them.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.distributed as dist
from torch import nn

from pretrain.distributed import DistInfo
from pretrain.models.encoder import EncoderLayer


def wrap_model(task, device: torch.device, info: DistInfo, parallelism: str = "ddp", precision: str = "fp32") -> nn.Module:
    """The module the training step calls: the task's model itself on one rank, else DDP around it
    or the model sharded in place (FSDP). The optimizer must be built afterwards (FSDP swaps the
    parameters for sharded DTensors)."""
    model = task.model
    if info.world_size == 1:
        return model
    if parallelism == "fsdp":
        return fully_shard_task(task, device, info, precision)
    # LayerDrop (and tasks with parameters a step may not use) need DDP's unused-parameter search.
    layerdrop = getattr(getattr(model, "cfg", None), "encoder_layerdrop", 0.0)
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=layerdrop > 0 or getattr(task, "has_unused_parameters", False),
    )


def fully_shard_task(task, device: torch.device, info: DistInfo, precision: str) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mesh = init_device_mesh(device.type, (info.world_size,))  # "cpu": gloo, reduce-scatter included
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    # fp32 master weights; FSDP all-gathers low-precision copies and reduces gradients in fp32.
    # Autocast still picks each op's precision (norms, softmax, losses in fp32). Inputs are not
    # cast: the fp32 residual stream and the float64 LayerDrop draws stay as under DDP.
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None,
                                  cast_forward_inputs=False)
    _shard_blocks(task.model, mesh, policy)
    teacher = getattr(task, "teacher", None)
    if teacher is not None:  # fp32, no gradients: all-gathered in its forward only
        _shard_blocks(teacher.model, mesh, MixedPrecisionPolicy(cast_forward_inputs=False))
    # LayerDrop: ranks must agree on which blocks take part in the collectives
    # (`pretrain.models.layerdrop`); the flags are a CPU tensor, so a gloo group, even beside NCCL
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    for module in task.model.modules():
        if hasattr(module, "layerdrop") and hasattr(module, "layers"):
            module.layerdrop_sync = functools.partial(_any_rank, group=group)
    return task.model


def _shard_blocks(root: nn.Module, mesh, policy) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in [m for m in root.modules() if isinstance(m, EncoderLayer)]:  # data2vec 2.0's AltBlock too
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)


def _any_rank(flags: torch.Tensor, group) -> torch.Tensor:
    flags = flags.clone()
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return flags


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def no_sync(model: nn.Module, sync: bool):
    """Context for a micro-batch's backward: gradients are communicated only when `sync`."""
    if sync:
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if is_sharded(model):
        return _no_gradient_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _no_gradient_sync(model):
    # FSDP keeps the unsharded gradients (in fp32) until a backward with sync reduce-scatters them
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (<= 0: no clipping) and return the total norm as a plain device tensor.
    Sharded (DTensor) gradients: the squares of the local shards are summed over the ranks."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not isinstance(grads[0], DTensor):
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    if not all(isinstance(g, DTensor) and all(pl.is_shard() for pl in g.placements) for g in grads):
        raise RuntimeError("clip_grad_norm expects every gradient sharded (FSDP); a replicated one would count N times")
    local = [g.to_local() for g in grads]
    squares = torch.stack(torch._foreach_norm(local, 2.0)).float().square().sum()
    dist.all_reduce(squares, group=grads[0].device_mesh.get_group())
    total = squares.sqrt()
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ formula
        torch._foreach_mul_(local, coef)
    return total


def grad_scaler(model: nn.Module, device: torch.device, init_scale: float, enabled: bool) -> torch.amp.GradScaler:
    """fp16 loss scaling. Sharded: a rank sees only its shards' overflow, so the scaler all-reduces
    it (`ShardedGradScaler`); otherwise ranks could skip different steps and scale differently."""
    if is_sharded(model):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type, init_scale=init_scale, enabled=enabled)
    return torch.amp.GradScaler(device.type, init_scale=init_scale, enabled=enabled)


# -- whole-model state (checkpoints) --------------------------------------------------------------
# Sharded: collectives, so every rank calls these, in the same order; rank 0 gets the whole state
# on the CPU (cpu_offload), the others an empty dict. The format is the single-process one.

def _full(cpu_offload: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def model_state(model: nn.Module) -> dict:
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full())


def load_model_state(model: nn.Module, state: dict) -> None:
    """`state`: the whole state, on every rank (each keeps its shards; no communication)."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_full(cpu_offload=False))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()`'s format (states keyed by position) with whole tensors, so that a
    DDP or single-process run resumes from it as well."""
    if not is_sharded(model) or not optimizer.state:
        # (an empty state: torch's gather would first initialise it with a zero-lr step)
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model.reshard()  # the root group stays gathered after a no-grad forward (validation)
    full = get_optimizer_state_dict(model, optimizer, options=_full())  # keyed by parameter name
    if not full:
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    return {"state": {index[name]: s for name, s in full["state"].items()},
            "param_groups": [dict(g, params=[index[name] for name in g["params"]]) for g in full["param_groups"]]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The inverse, from the whole state on every rank. Sharded by hand rather than with torch's
    `set_optimizer_state_dict`, which gives parameters without saved state (never had a gradient:
    a frozen encoder) a fresh state with step 1, where DDP leaves them without one."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for g in optimizer.param_groups for p in g["params"]]

    def shard(value, param):
        if isinstance(value, torch.Tensor) and isinstance(param, DTensor) and value.shape == param.shape:
            # src_data_rank=None: every rank cuts its own shard, no communication
            return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        return value

    sharded = {i: {k: shard(v, params[i]) for k, v in s.items()} for i, s in state["state"].items()}
    optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
