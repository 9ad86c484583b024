"""Imports point one way: data_prep <- pretrain <- finetune <- slurm, and inside pretrain
config/distributed <- models <- objectives <- training, with interop beside objectives.

Every import counts, including the ones inside functions: a lazy import still ties the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_prep", "pretrain", "finetune", "slurm")

#: what each top-level package may import from the project
PACKAGE_RULES = {
    "data_prep": set(),
    "pretrain": {"data_prep"},
    "finetune": {"data_prep", "pretrain"},
    "slurm": {"data_prep", "pretrain", "finetune"},
}

#: what each layer of pretrain may import from pretrain (a layer may always import itself)
LAYER_RULES = {
    "foundation": set(),
    "models": {"foundation"},
    "interop": {"foundation", "models"},
    "objectives": {"foundation", "models"},
    "training": {"foundation", "models", "objectives"},
    "entry": {"foundation", "models", "interop", "objectives", "training"},
}
FOUNDATION = {"pretrain.config", "pretrain.distributed", "pretrain"}


def layer_of(module: str) -> str:
    """The layer of a pretrain module: its sub-package, `foundation`, or `entry`."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("models", "objectives", "training", "interop"):
        return parts[1]
    return "foundation" if module in FOUNDATION else "entry"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Project modules imported anywhere in `path` (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from pkg import module` imports the module itself
            found.update(f"{target}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def project_edges() -> list[tuple[str, str]]:
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    edges = []
    for name, path in modules.items():
        for target in imports_of(path):
            # keep only real modules (drop imported function names)
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                edges.append((name, target))
    return edges


def violations(edges: list[tuple[str, str]]) -> list[str]:
    bad = []
    for src, dst in edges:
        sp, dp = src.split(".")[0], dst.split(".")[0]
        if sp != dp:
            if dp not in PACKAGE_RULES[sp]:
                bad.append(f"{src} imports {dst}: {sp} may import only {sorted(PACKAGE_RULES[sp]) or 'nothing'}")
        elif sp == "pretrain":
            sl, dl = layer_of(src), layer_of(dst)
            if sl != dl and dl not in LAYER_RULES[sl]:
                bad.append(f"{src} ({sl}) imports {dst} ({dl}): {sl} may import {sorted(LAYER_RULES[sl])}")
    return bad


def cycles(edges: list[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_point_one_way():
    edges = project_edges()
    assert len(edges) > 100, "the import scan found too little to be meaningful"
    assert violations(edges) == []


def test_no_import_cycles():
    # a package's __init__ importing its own modules is not a cycle of concern
    edges = [(a, b) for a, b in project_edges() if not b.startswith(a + ".")]
    assert cycles(edges) == []


@pytest.mark.parametrize(
    "edge",
    [
        ("pretrain.objectives.data2vec_task", "pretrain.training.trainer"),  # objectives -> training
        ("pretrain.models.encoder", "pretrain.objectives.masking"),  # models -> objectives
        ("pretrain.training.trainer", "pretrain.interop.hf"),  # training -> interop
        ("pretrain.models.wav2vec2", "pretrain.build"),  # models -> entry point
        ("pretrain.training.runner", "finetune.task"),  # pretrain -> finetune
        ("data_prep.loader", "pretrain.config"),  # data_prep -> pretrain
        ("finetune.model", "slurm.stages"),  # finetune -> slurm
    ],
)
def test_an_upward_import_is_caught(edge):
    assert violations(project_edges() + [edge]), f"{edge} should break the layering"


def test_a_cycle_is_caught():
    edges = [("pretrain.models.encoder", "pretrain.models.ops"), ("pretrain.models.ops", "pretrain.models.encoder")]
    assert cycles(edges) == [["pretrain.models.encoder", "pretrain.models.ops"]]


def test_every_subpackage_says_what_it_holds_and_may_import():
    for init in (ROOT / "pretrain").glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "mport" in doc, f"{init} should say what it may import"
