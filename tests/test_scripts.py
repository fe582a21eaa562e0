"""The scripts of scripts/: each one imports against today's package and prints its usage (``--help``), the
shell scripts parse (``bash -n``), and a script uses the package only through its public names and hooks —
it never rebinds an attribute of the package (no monkeypatching a kernel to count evaluations)."""

from __future__ import annotations

import ast
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
PYTHON_SCRIPTS = sorted(SCRIPTS.glob("*.py"))


@pytest.mark.parametrize("script", PYTHON_SCRIPTS, ids=lambda p: p.name)
def test_every_script_imports_and_prints_its_usage(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("script", sorted(SCRIPTS.glob("*.sh")), ids=lambda p: p.name)
def test_every_shell_script_parses(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def _package_names(tree: ast.AST) -> set[str]:
    """The names a script binds to the package or its modules (``import sparse_elbo``, ``from sparse_elbo.x
    import y``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("sparse_elbo")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sparse_elbo"):
            names |= {a.asname or a.name for a in node.names}
    return names


def _violations(source: str) -> list[str]:
    tree = ast.parse(source)
    package = _package_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sparse_elbo"):
            found += [f"imports the private {a.name}" for a in node.names if a.name.startswith("_")]
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                root = target
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(target, ast.Attribute) and isinstance(root, ast.Name) and root.id in package:
                    found.append(f"rebinds {ast.unparse(target)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            if node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in package:
                found.append(f"setattr on {node.args[0].id}")
    return found


@pytest.mark.parametrize("script", PYTHON_SCRIPTS, ids=lambda p: p.name)
def test_scripts_use_the_public_api_without_monkeypatching(script):
    assert _violations(script.read_text()) == []


def test_the_monkeypatching_check_can_fail():
    source = "from sparse_elbo.inference import kernels\nkernels.DiagonalLaplaceEStep.loss_and_gradients = lambda *a: 0\n"
    assert _violations(source) == ["rebinds kernels.DiagonalLaplaceEStep.loss_and_gradients"]
    assert _violations("from sparse_elbo.results import _read_file\n") == ["imports the private _read_file"]
