"""`train.compile`: the transformer blocks run as `torch.compile` (inductor) graphs.

What is compiled: each `EncoderLayer` call, in the student, the data2vec / data2vec 2.0 teacher
and the CTC encoder, through one compiled function that takes the layer as an argument. The
layers' weights are graph inputs, so every layer of the same width shares the compiled code:
one compile serves all blocks. The rest (conv front end, positional conv, masking, quantizer,
losses) stays eager: it holds the data-dependent shapes (boolean indexing, per-utterance loops,
LayerDrop draws) that break or respecialise a whole-model graph, and the Gumbel temperature, a
float that changes every update.

Shapes: batch and time are symbolic (`dynamic=True`), so batches of any length reuse one graph;
nothing is padded or bucketed. Graphs differ only by use (training, validation, the frozen
teacher), by the kind of attention mask (none, padding, ALiBi bias) and, as dynamo specialises
sizes 0 and 1, by a batch of one: a bounded set (a data2vec run: 3), well under `RECOMPILE_LIMIT`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: graphs kept per compiled function; past it dynamo runs the blocks eagerly (with a warning)
RECOMPILE_LIMIT = 32

_block: Callable | None = None


def _run_block(layer: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None):
    return layer(x, attn_mask)


def compiled_block() -> Callable:
    """The compiled `layer(x, attn_mask)`, made on first use (compiling starts at the first call)."""
    global _block
    if _block is None:
        # raise, never lower, a limit the user may have set for other code
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
        _block = torch.compile(_run_block, dynamic=True)
    return _block


def set_compiled(modules: list[nn.Module], enabled: bool) -> None:
    """Route every transformer block in `modules` through `compiled_block` (or back to eager).

    The flag lives on the blocks, so a copy made later (a data2vec teacher reset from the student)
    keeps it, and checkpointing and LayerDrop, which call the blocks, need no change."""
    for module in modules:
        for block in module.modules():
            if hasattr(block, "use_compiled"):
                block.use_compiled = enabled


def inductor_problem(device: torch.device) -> str | None:
    """Why inductor could not build kernels on `device`, or None when it can (as far as can be
    told without compiling): a C++ compiler on CPUs, Triton on GPUs."""
    try:
        if device.type == "cpu":
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        elif device.type == "cuda":
            from torch.utils._triton import has_triton

            if not has_triton():
                return "Triton is not installed (pip install triton)"
    except ImportError:  # another torch layout: let the first compile speak for itself
        return None
    except Exception as err:  # noqa: BLE001 - inductor raises its own types for a missing compiler
        return f"no working C++ compiler for inductor's CPU kernels ({err})"
    return None


def compile_task(task, enabled: bool, device: torch.device) -> None:
    """Apply `train.compile` to a task's model and, where it has one, its EMA teacher; refuse
    before any data is read when inductor cannot work here."""
    if not enabled:
        return
    problem = inductor_problem(device)
    if problem:
        raise ValueError(f"train.compile=true needs torch.compile's inductor backend, which cannot build kernels "
                         f"here: {problem}. Install one (e.g. apt-get install g++, or set CXX) or drop "
                         "--set train.compile=true")
    teacher = getattr(getattr(task, "teacher", None), "model", None)
    set_compiled([task.model] + ([teacher] if teacher is not None else []), True)
