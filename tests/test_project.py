"""Project-level invariants: packages import, and dependencies run one way."""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["data_prep", "pretrain", "finetune", "slurm"]


@pytest.mark.parametrize("package", ORDER)
def test_package_imports(package):
    assert importlib.import_module(package).__doc__


@pytest.mark.parametrize("package", ORDER)
def test_dependencies_run_one_way(package):
    later = set(ORDER[ORDER.index(package) + 1 :])
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in later, f"{path} imports {name}"
