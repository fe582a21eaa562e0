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
from sparse_elbo.trainers.base import KINDS, OBJECTIVES, Capabilities, Trainer

PACKAGE = Path(sparse_elbo.__file__).resolve().parent
# closed forms -> distributions -> model -> objectives -> problem -> inference -> trainers -> evaluation ->
# runner, trained models and the bundles -> the API, the tools and the reporting (report/). A module imports only from its
# own layer or the layers before it.
LAYERS = [
    {
        "version",
        "errors",
        "validation",
        "config",
        "parallel",
        "closed_forms",
        "annealing",
        "data",
        "images",
        "results",
        "metrics",
    },
    {"gaussians", "priors"},
    {"model", "posteriors", "encoders"},
    {"objectives"},
    {"problem"},
    {"inference"},
    {"trainers", "initialisation"},
    {"evaluation", "held_out", "gradients"},
    {"runner", "trained", "bundles"},
    {"__init__", "cli", "train", "encode", "denoise", "inpaint", "patches", "report"},
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
def test_no_function_is_longer_than_61_lines(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= 61, f"{path.name}: {node.name} has {length} lines"


# ------------------------------------------------------------------------------------------------- trainers


def _trainer_classes():
    import sparse_elbo.trainers.adam
    import sparse_elbo.trainers.authors
    import sparse_elbo.trainers.em
    import sparse_elbo.trainers.lbfgs
    import sparse_elbo.trainers.profile
    import sparse_elbo.trainers.semi_amortized
    import sparse_elbo.trainers.subsets  # noqa: F401

    def subclasses(cls):
        return [c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))]

    return sorted({c for c in subclasses(Trainer) if c.__module__.startswith("sparse_elbo.")}, key=lambda c: c.__name__)


@pytest.mark.parametrize("trainer", _trainer_classes(), ids=lambda c: c.__name__)
def test_every_trainer_declares_its_capabilities_as_data_and_follows_the_contract(trainer):
    assert isinstance(trainer.capabilities, Capabilities)
    assert set(trainer.capabilities.posteriors) <= set(KINDS) and set(trainer.capabilities.objectives) <= set(OBJECTIVES)
    assert set(trainer.capabilities.prior_scales) <= {"optimal", "fixed"}
    assert not inspect.isabstract(trainer)
    assert "capabilities" not in inspect.getsource(trainer.__init__)  # declared by the class, never set by a setting
    instance = trainer()  # every setting has a default
    assert instance.max_epochs >= 1 and instance.capabilities is trainer.capabilities
    assert "fit" not in vars(trainer)  # the epoch loop is the shared one


@pytest.mark.parametrize("trainer", _trainer_classes(), ids=lambda c: c.__name__)
def test_trainers_stay_small(trainer):
    """A variant is a new class, not a flag: a trainer's module stays short and its constructor takes few arguments."""
    source = inspect.getsource(trainer)
    arguments = [p for p in inspect.signature(trainer).parameters if p != "self"]
    assert len(source.splitlines()) <= 150 and len(arguments) <= 10, (trainer.__name__, len(source.splitlines()), arguments)


def test_the_runner_rejects_what_a_trainer_does_not_declare():
    """Capabilities are the only place a combination is allowed or refused."""
    from sparse_elbo.annealing import NoAnnealing, StepAnnealing
    from sparse_elbo.encoders import AmortizedPosterior
    from sparse_elbo.objectives import AnalyticELBO, EntropyELBO
    from sparse_elbo.posteriors import DiagonalPosterior
    from sparse_elbo.runner.checks import check_capabilities
    from sparse_elbo.trainers.lbfgs import LBFGSTrainer

    class OnlyPerPoint(LBFGSTrainer):
        capabilities = Capabilities(posteriors=("per_data_point",), objectives=("entropy",), annealing=False)

    trainer = OnlyPerPoint()
    check_capabilities(trainer, DiagonalPosterior, EntropyELBO(), NoAnnealing())  # declared: fine
    fixed = StepAnnealing(prior_scale="fixed")
    for family, objective, annealing, message in (
        (
            AmortizedPosterior,
            EntropyELBO(),
            NoAnnealing(),
            r"posterior=amortized is not supported by trainer OnlyPerPoint; allowed posteriors: \['diag', 'full'\]",
        ),
        (DiagonalPosterior, AnalyticELBO(), NoAnnealing(), "objective=analytic is not supported by trainer OnlyPerPoint"),
        (DiagonalPosterior, EntropyELBO(), StepAnnealing(), "annealing .* is not supported by trainer OnlyPerPoint"),
    ):
        with pytest.raises(ValueError, match=message):
            check_capabilities(trainer, family, objective, annealing)
    annealing_trainer = type("Annealing", (LBFGSTrainer,), {})()  # anneals, but holds no prior scale
    with pytest.raises(ValueError, match="annealing.prior_scale=fixed is not supported by trainer Annealing"):
        check_capabilities(annealing_trainer, DiagonalPosterior, EntropyELBO(), fixed)
    from sparse_elbo.trainers.adam import AdamTrainer

    with pytest.raises(ValueError, match="annealing.prior_scale=fixed is not supported by objective=analytic"):
        check_capabilities(AdamTrainer(), DiagonalPosterior, AnalyticELBO(), fixed)


# ------------------------------------------------------------------------------------------------- configs

SIZES = {"n_data", "n_latents", "n_observed", "generator", "prior"}


def _component_groups() -> list[str]:
    """Every config group of components (each YAML with a ``_target_``), read from configs/."""
    directories = sorted(p for p in config_dir().rglob("*") if p.is_dir())
    return [
        str(d.relative_to(config_dir()))
        for d in directories
        if list(d.glob("*.yaml")) and all("_target_" in OmegaConf.load(f) for f in d.glob("*.yaml"))
    ]


def _options():
    return [(group, p.stem) for group in _component_groups() for p in sorted((config_dir() / group).glob("*.yaml"))]


def _owner(group: str) -> list[str]:
    """For a trainer's own group (``trainer/driver``), a trainer whose defaults list holds it and whose body
    leaves its values alone."""
    if not group.startswith("trainer/"):
        return []
    name = group.split("/", 1)[1]
    texts = {p.stem: p.read_text() for p in sorted((config_dir() / "trainer").glob("*.yaml"))}
    owner = next(stem for stem, text in texts.items() if f"- {name}:" in text and f"\n{name}:" not in text)
    return [f"trainer={owner}"]


def _node(group: str, option: str) -> DictConfig:
    cfg = sparse_elbo.compose([*_owner(group), f"{group}={option}", *(["dataset.path=x.npy"] if option == "file" else [])])
    return OmegaConf.select(cfg, "model.prior" if group == "prior" else group.replace("/", "."))


def test_every_component_group_is_checked():
    assert {"dataset", "posterior", "trainer", "trainer/driver", "trainer/restarts", "trainer/statistics"} <= set(
        _component_groups()
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


def test_checking_a_config_leaves_the_runs_random_numbers_alone(monkeypatch):
    """The checks build a tiny posterior to validate its settings before the data are read; an encoder's
    initial weights come from the global RNG, so that probe must not draw from it (the run's encoder is the one
    it would have been without the probe)."""
    import importlib

    build_module = importlib.import_module("sparse_elbo.runner.build")  # (the package exports a function ``build``)
    states = []
    original = build_module.call_at

    def recording(factory, path, **sizes):
        states.append((path, sizes.get("n_data"), torch.get_rng_state()))
        return original(factory, path, **sizes)

    monkeypatch.setattr(build_module, "call_at", recording)
    build_module.build(sparse_elbo.compose(["posterior=amortized", "trainer=adam", "debug=smoke", "dataset.n_data=40"]))
    probe, real = [state for path, n, state in states if path == "posterior"]
    assert torch.equal(probe, real)  # nothing between the probe and the real posterior drew a random number
