"""The shape of the code, checked: layers import one way, functions stay short, every trainer follows the
contract and declares its capabilities as data, the shipped YAML equals the constructor defaults, and a
results file written before the redesign can still be read."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

import sparse_elbo
from sparse_elbo.config import config_dir
from sparse_elbo.trainers.base import FAMILIES, OBJECTIVES, Capabilities, Trainer

PACKAGE = Path(sparse_elbo.__file__).resolve().parent
# closed forms -> distributions -> model -> objectives -> problem -> inference -> trainers -> evaluation ->
# runner and trained models -> the API, the tools and the reporting (report/). A module imports only from its
# own layer or the layers before it.
LAYERS = [
    {"version", "errors", "validation", "closed_forms", "annealing", "data", "images", "results", "metrics"},
    {"gaussians", "priors"},
    {"model", "posteriors", "encoders"},
    {"objectives"},
    {"problem"},
    {"inference"},
    {"trainers", "initialisation"},
    {"evaluation", "held_out", "gradients"},
    {"runner", "trained"},
    {"__init__", "config", "cli", "train", "encode", "denoise", "report"},
]
LAYER = {name: index for index, names in enumerate(LAYERS) for name in names}


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "configs" not in p.parts)


def _component(path: Path) -> str:
    """``sparse_elbo/trainers/em.py`` -> ``trainers``; ``sparse_elbo/closed_forms.py`` -> ``closed_forms``."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imported_components(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):  # function-level imports count too
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] if node.module != "sparse_elbo" else [f"sparse_elbo.{a.name}" for a in node.names]
        else:
            continue
        found |= {name.split(".")[1] for name in names if name.startswith("sparse_elbo.")}
    return found


def test_every_module_has_a_layer():
    assert {_component(p) for p in _modules()} <= set(LAYER), "a new module needs a layer in this test"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_layers_import_one_way(path):
    importer = _component(path)
    for imported in _imported_components(ast.parse(path.read_text())):
        assert LAYER[imported] <= LAYER[importer], (
            f"{importer} (layer {LAYER[importer]}) imports {imported} (layer {LAYER[imported]})"
        )


def _matplotlib_imports(tree: ast.AST) -> list[ast.AST]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        found += [node for name in names if name.split(".")[0] == "matplotlib"]
    return found


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_figure_tools_import_matplotlib_and_only_when_drawing(path):
    """matplotlib is an optional extra (``figures``): the library, and the reporting's modules themselves,
    import without it; only report/plot_run.py and report/figures.py use it, inside functions."""
    tree = ast.parse(path.read_text())
    imports = _matplotlib_imports(tree)
    if path.relative_to(PACKAGE).as_posix() not in ("report/plot_run.py", "report/figures.py"):
        assert not imports, f"{path.name} imports matplotlib"
    in_functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    assert all(id(node) in in_functions for node in imports), f"{path.name} imports matplotlib when it is imported"


def test_the_matplotlib_check_can_fail():
    assert _matplotlib_imports(ast.parse("import matplotlib.pyplot as plt\nfrom matplotlib import cm\n"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_library_never_imports_the_reporting(path):
    """``sparse_elbo/report/`` reads runs back and draws them; nothing outside it depends on it."""
    if _component(path) != "report":
        assert "report" not in _imported_components(ast.parse(path.read_text())), f"{path.name} imports sparse_elbo.report"


def test_the_layer_check_can_fail():
    tree = ast.parse("def f():\n    from sparse_elbo.runner import run\n")
    assert LAYER[next(iter(_imported_components(tree)))] > LAYER["trainers"]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_is_longer_than_80_lines(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= 80, f"{path.name}: {node.name} has {length} lines"


# ------------------------------------------------------------------------------------------------- trainers


def _trainer_classes():
    import sparse_elbo.trainers.adam
    import sparse_elbo.trainers.authors
    import sparse_elbo.trainers.em
    import sparse_elbo.trainers.fixed_point
    import sparse_elbo.trainers.lbfgs
    import sparse_elbo.trainers.profile  # noqa: F401

    def subclasses(cls):
        return [c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))]

    return sorted({c for c in subclasses(Trainer) if c.__module__.startswith("sparse_elbo.")}, key=lambda c: c.__name__)


@pytest.mark.parametrize("trainer", _trainer_classes(), ids=lambda c: c.__name__)
def test_every_trainer_declares_its_capabilities_as_data_and_follows_the_contract(trainer):
    assert isinstance(trainer.capabilities, Capabilities)
    assert set(trainer.capabilities.families) <= set(FAMILIES) and set(trainer.capabilities.objectives) <= set(OBJECTIVES)
    assert not inspect.isabstract(trainer)
    instance = trainer()  # every setting has a default
    assert instance.max_epochs >= 1
    assert "fit" not in vars(trainer)  # the epoch loop is the shared one


def test_the_runner_rejects_what_a_trainer_does_not_declare():
    """Capabilities are the only place a combination is allowed or refused."""
    from sparse_elbo.annealing import NoAnnealing, StepAnnealing
    from sparse_elbo.objectives import AnalyticELBO, EntropyELBO
    from sparse_elbo.runner.build import check_capabilities
    from sparse_elbo.trainers.lbfgs import LBFGSTrainer

    class OnlyDiagonal(LBFGSTrainer):
        capabilities = Capabilities(families=("diag",), objectives=("entropy",), annealing=False)

    trainer = OnlyDiagonal()
    check_capabilities(trainer, "diag", EntropyELBO(), NoAnnealing())  # declared: fine
    for family, objective, annealing, message in (
        ("full", EntropyELBO(), NoAnnealing(), "posterior=full is not supported by trainer OnlyDiagonal"),
        ("diag", AnalyticELBO(), NoAnnealing(), "objective=analytic is not supported by trainer OnlyDiagonal"),
        ("diag", EntropyELBO(), StepAnnealing(), "annealing .* is not supported by trainer OnlyDiagonal"),
    ):
        with pytest.raises(ValueError, match=message):
            check_capabilities(trainer, family, objective, annealing)


# ------------------------------------------------------------------------------------------------- configs

COMPONENT_GROUPS = [
    "dataset",
    "posterior",
    "objective",
    "annealing",
    "trainer",
    "prior",
    "trainer/initialisation",
    "trainer/e_step",
]
SIZES = {"n_data", "n_latents", "n_observed", "generator", "prior"}


def _options():
    return [(group, p.stem) for group in COMPONENT_GROUPS for p in sorted((config_dir() / group).glob("*.yaml"))]


def _node(group: str, option: str) -> DictConfig:
    base = {"trainer/initialisation": ["trainer=profile_lbfgs"], "trainer/e_step": ["trainer=em"]}.get(group, [])
    cfg = sparse_elbo.compose([*base, f"{group}={option}", *(["dataset.path=x.npy"] if option == "file" else [])])
    return OmegaConf.select(
        cfg,
        {"prior": "model.prior", "trainer/initialisation": "trainer.initialisation", "trainer/e_step": "trainer.e_step"}.get(
            group, group
        ),
    )


def _state(obj):
    """An object's settings, recursively: what its constructor made of its arguments."""
    if isinstance(obj, (list, tuple)):
        return tuple(_state(v) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        return type(obj).__name__, {k: _state(v) for k, v in vars(obj).items()}
    return obj


@pytest.mark.parametrize("group,option", _options())
def test_shipped_yaml_lists_every_setting_with_the_constructor_default(group, option):
    node = _node(group, option)
    target = get_object(node._target_)
    sizes = SIZES if "_partial_" in node else set()  # passed at the instantiate call, not in the YAML
    parameters = {
        k: p for k, p in inspect.signature(target).parameters.items() if k not in sizes and p.kind is p.POSITIONAL_OR_KEYWORD
    }
    keys = set(node) - {"_target_", "_partial_"}
    assert keys == set(parameters), f"{group}={option}: YAML keys {sorted(keys)} != arguments {sorted(parameters)}"
    if isinstance(target, type) and all(p.default is not p.empty for p in parameters.values()) and "_partial_" not in node:
        assert _state(instantiate(node)) == _state(target()), f"{group}={option} differs from {target.__name__}()"
        return
    for key in keys:  # functions and partially built components: argument by argument
        if OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
            continue
        value, default = node[key], parameters[key].default
        if default is inspect.Parameter.empty:  # a required argument (the YAML says ???)
            continue
        value = OmegaConf.to_container(value) if isinstance(value, DictConfig | type(OmegaConf.create([]))) else value
        assert value == (list(default) if isinstance(default, tuple) else default), f"{group}={option}: {key}"


def test_the_defaults_check_can_fail():
    from sparse_elbo.initialisation import SparseCodingDictionary

    node = _node("trainer/initialisation", "sparse_coding")
    assert _state(instantiate(node)) == _state(SparseCodingDictionary())
    node.sparsity = 0.6
    assert _state(instantiate(node)) != _state(SparseCodingDictionary())


# ------------------------------------------------------------------------------------------------- results


def test_a_results_file_written_before_the_redesign_can_still_be_read():
    """tests/data/results_v0.1.h5: a 3x3 bars run of version 0.1 (commit cebe455), read with today's reader
    and summarised with today's tools."""
    from sparse_elbo.report.sweeps import load_runs, run_quantities

    path = Path(__file__).parent / "data" / "results_v0.1.h5"
    results = sparse_elbo.read_results(path)
    assert results.status == "finished" and "sparse_elbo=0.1.0" in results.attrs["versions"]
    assert results.config["trainer"]["_target_"].endswith("ProfileLBFGSTrainer")
    epochs = len(results.metrics["epoch"])
    assert epochs >= 1 and results.metrics["elbo"].shape == (epochs,) and results.snapshots["W"].shape == (epochs, 9, 6)
    assert results.final["W"].shape == (9, 6) and np.isfinite(float(results.final["elbo"]))
    (run,) = load_runs(path)
    quantities = run_quantities(run.results)
    assert quantities["elbo"] == pytest.approx(float(results.final["elbo"])) and "recovered" in quantities
