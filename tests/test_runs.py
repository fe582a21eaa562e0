"""End-to-end: config composition, instantiation, seeded bars recovery, results round-trip, the CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from support import options, refusal

import sparse_elbo
from sparse_elbo.cli import user_error_message
from sparse_elbo.config import config_dir
from sparse_elbo.errors import UnreadableFileError
from sparse_elbo.results import read_results
from sparse_elbo.runner import build, run

CONFIGS = config_dir()
SMOKE = ["debug=smoke", "dataset.n_data=40"]  # any trainer, two cheap epochs on 40 bars (configs/debug/smoke.yaml)
# the component groups a run is made of, with every option configs/ ships
GROUPS = {group: options(group) for group in ("dataset", "posterior", "objective", "annealing", "trainer", "prior")}


def test_the_option_lists_come_from_configs():
    assert "temperature" in GROUPS["annealing"] and "em_subsets" in GROUPS["trainer"] and "file" in GROUPS["dataset"]


def _small(group: str, option: str) -> list[str]:
    """Overrides that make ``group=option`` build small: a trainer that takes it (joint L-BFGS takes every
    objective, family and schedule), a data file for ``dataset=file``."""
    if group == "dataset":
        return {"bars": SMOKE, "image_patches": ["debug=smoke", "dataset.n_patches=300", "n_latents=8"]}.get(option, [])
    return [*SMOKE, *([] if group == "trainer" else ["trainer=lbfgs"])]


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_and_instantiates(group, option, tmp_path):
    overrides = _small(group, option)
    if option == "file":
        np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(30, 6)))
        overrides = ["debug=smoke", f"dataset.path={tmp_path / 'x.npy'}", "n_latents=3"]
    if group == "trainer":  # what a trainer needs beyond the smoke run: an encoder, a tail within two epochs
        overrides += {"semi_amortized_adam": ["posterior=amortized"], "em_subsets": ["trainer.average_last_epochs=2"]}.get(
            option, []
        )
    cfg = sparse_elbo.compose([f"{group}={option}", *overrides])
    components = build(cfg)
    problem = components.problem
    assert problem.x.shape[0] in (30, 40, 300) and problem.model.W.shape[0] == problem.x.shape[1]
    component = {
        "objective": problem.objective,
        "annealing": problem.annealing,
        "trainer": components.trainer,
        "prior": problem.model.prior,
        "posterior": problem.posterior,
    }.get(group)
    if component is not None:
        node = cfg.model.prior if group == "prior" else cfg[group]  # the prior group's package is model.prior
        assert type(component).__name__ == node._target_.rsplit(".", 1)[1]


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")))
def test_every_shipped_experiment_builds_at_a_small_size(experiment, tmp_path):
    """Every experiment composes and validates (keys against their targets, capabilities, memory) with its
    data cut down; one whose data are a user's file gets a small one."""
    cfg = sparse_elbo.compose([f"experiment={experiment}"])
    small = [f"experiment={experiment}", "device=cpu"]
    if "n_patches" in cfg.dataset:
        small += ["dataset.n_patches=300", "dataset.held_out=0"]
        if cfg.dataset.source == "npy":
            image = tmp_path / "image.npy"
            np.save(image, np.random.default_rng(0).random((40, 40)))
            small += [f"dataset.path={image}"]
    else:
        small += ["dataset.n_data=60"]
    components = build(sparse_elbo.compose(small))
    assert components.problem.model.W.shape[1] == cfg.n_latents or cfg.n_latents is None


@pytest.mark.parametrize(
    "experiment,same_schedule",
    [("patches_em", "patches_em_prior_annealing"), ("patches_em_small", "patches_em_small_prior_annealing")],
)
def test_the_authors_procedure_on_an_experiments_data_is_its_sibling_experiment(experiment, same_schedule):
    """``experiment=<name>_authors`` runs the authors' procedure as configured (100 E-step iterations per
    batch, ...), not with the fast EM's settings merged in, on exactly the data of ``experiment=<name>``,
    with the annealing schedule of the fast EM's sibling that keeps the authors' prior annealing."""
    sibling = sparse_elbo.compose([f"experiment={experiment}_authors"])
    assert sibling.trainer == sparse_elbo.compose(["trainer=authors_em"]).trainer
    fast = sparse_elbo.compose([f"experiment={experiment}"])
    assert sibling.dataset == fast.dataset and sibling.n_latents == fast.n_latents
    assert sibling.posterior == fast.posterior and sibling.dtype == fast.dtype
    schedule = sparse_elbo.compose([f"experiment={same_schedule}"]).annealing
    # the same schedule; the authors' procedure weights the literal objective (it cannot hold λ at λ_0)
    assert {**sibling.annealing, "prior_scale": None} == {**schedule, "prior_scale": None}
    assert sibling.annealing.prior_scale == "optimal"


@pytest.mark.parametrize(
    "experiment,message",
    [
        (
            "patches_em_small_prior_annealing",
            r"trainer\.em_iterations_per_epoch is not a setting of AuthorsEMTrainer .*sibling experiment",
        ),
        # the experiment's choice of E-step (and of start) has no place there
        ("patches_em_prior_annealing", r"Could not override 'trainer/e_step'"),
        ("patches_em", r"Could not override 'trainer/initialisation'"),
    ],
)
def test_another_trainer_under_an_experiment_is_rejected_naming_the_setting_that_does_not_fit(experiment, message):
    """An experiment's trainer settings belong to its trainer: with another trainer chosen on the command line
    they are rejected before any compute, naming the key (the sibling experiment is the way to swap)."""
    from sparse_elbo.cli import user_error_message

    with pytest.raises(Exception) as error:
        build(sparse_elbo.compose([f"experiment={experiment}", "trainer=authors_em"]))
    assert re.search(message, user_error_message(error.value))


def test_file_dataset_composes(tmp_path):
    x = np.random.default_rng(0).normal(size=(30, 6))
    np.save(tmp_path / "x.npy", x)
    cfg = sparse_elbo.compose(["dataset=file", f"dataset.path={tmp_path / 'x.npy'}", "n_latents=3", "debug=smoke"])
    problem = build(cfg).problem
    assert problem.x.shape == (30, 6) and problem.model.W.shape == (6, 3)
    np.testing.assert_allclose(problem.x.cpu().numpy(), x)


def test_default_config_is_the_authors_bars_setting():
    cfg = sparse_elbo.compose([])
    assert cfg.dataset.grid == 5 and cfg.dataset.n_data == 1000 and cfg.dataset.noise == 0.1
    assert cfg.dataset.sources == "laplace" and cfg.n_latents is None
    assert cfg.posterior._target_.endswith("FullCovariancePosterior")
    assert cfg.objective._target_.endswith("EntropyELBO")
    assert cfg.trainer._target_.endswith("ProfileLBFGSTrainer")  # the authors' model and data; L-BFGS on the profile
    assert cfg.trainer.initialisation._target_.endswith("SparseCodingDictionary")
    assert cfg.annealing._target_.endswith("NoAnnealing")


def test_tiny_seeded_bars_run_recovers_every_bar_and_round_trips(tmp_path):
    """A 3x3 bars problem (H=6, N=300) learned with the default objective and posterior."""
    cfg = sparse_elbo.compose(["dataset.grid=3", "dataset.n_data=300", "seed=1", "trainer.max_epochs=40"])
    summary = run(cfg, tmp_path, overrides=["dataset.grid=3"], progress=False)
    assert summary.recovered, summary.min_cosine
    assert summary.elbo >= summary.ground_truth_elbo - 0.05
    res = read_results(summary.results_path)
    assert res.status == "finished"
    assert res.config["dataset"]["grid"] == 3 and res.attrs["overrides"] == "dataset.grid=3"
    E = len(res.metrics["epoch"])
    assert E == summary.epochs
    for key in (
        "elbo",
        "wall_time",
        "sigma2",
        "gini_mean",
        "posterior_entropy",
        "prior_entropy",
        "likelihood_entropy",
        "weight_prior",
    ):
        assert res.metrics[key].shape == (E,), key
    assert res.metrics["lambda"].shape == (E, 6)
    assert np.all(np.diff(res.metrics["wall_time"]) > 0)
    assert res.final["W"].shape == (9, 6) and res.final["lambda"].shape == (6,)
    assert res.final["posterior"]["mean"].shape == (300, 6)
    assert res.final["posterior"]["scale_tril"].shape == (300, 6, 6)
    assert res.data["W_true"].shape == (9, 6)
    assert res.snapshots["W"].shape == (E, 9, 6)
    assert float(res.final["elbo"]) == pytest.approx(summary.elbo)
    assert float(res.final["elbo"]) == pytest.approx(float(res.metrics["elbo"][-1]), abs=1e-9)
    # the stored posterior and dictionary reproduce the stored ELBO exactly (entropy objective)
    from sparse_elbo.gaussians import FullGaussian
    from sparse_elbo.model import SparseCodingModel
    from sparse_elbo.objectives import EntropyELBO

    model = SparseCodingModel(9, 6).double()
    model.set_dictionary(torch.as_tensor(res.final["W"]))
    q = FullGaussian(torch.as_tensor(res.final["posterior"]["mean"]), torch.as_tensor(res.final["posterior"]["scale_tril"]))
    with torch.no_grad():
        value = EntropyELBO()(torch.as_tensor(build(cfg).dataset.x), q, model)
    assert float(value.elbo) == pytest.approx(float(res.final["elbo"]), abs=1e-8)
    assert float(value.sigma2) == pytest.approx(float(res.final["sigma2"]), rel=1e-8)


def test_a_given_initial_dictionary_is_used_and_checked_against_the_data(tmp_path):
    W = np.random.default_rng(1).normal(size=(25, 10))
    np.save(tmp_path / "W.npy", W)
    problem = build(sparse_elbo.compose([f"model.init_dictionary={tmp_path / 'W.npy'}", *SMOKE])).problem
    np.testing.assert_allclose(problem.model.W.detach().numpy(), W / np.linalg.norm(W, axis=0), atol=1e-12)
    np.save(tmp_path / "W_bad.npy", W[:, :8])
    with pytest.raises(ValueError, match=r"has shape \(25, 8\), but the data have D=25 and n_latents=10"):
        build(sparse_elbo.compose([f"model.init_dictionary={tmp_path / 'W_bad.npy'}", *SMOKE]))
    np.save(tmp_path / "W_nan.npy", np.full((25, 10), np.nan))
    with pytest.raises(ValueError, match="model.init_dictionary: .*NaN/Inf"):
        build(sparse_elbo.compose([f"model.init_dictionary={tmp_path / 'W_nan.npy'}", *SMOKE]))


def test_diag_posterior_results_store_std(tmp_path):
    cfg = sparse_elbo.compose(["posterior=diag", *SMOKE])
    summary = run(cfg, tmp_path, progress=False)
    res = read_results(summary.results_path)
    assert res.final["posterior"]["std"].shape == (40, 10)
    assert "scale_tril" not in res.final["posterior"]


def test_a_run_never_overwrites_another_runs_file(tmp_path):
    cfg = sparse_elbo.compose(SMOKE)
    run(cfg, tmp_path, progress=False)
    with pytest.raises((FileExistsError, OSError)):
        run(cfg, tmp_path, progress=False)
    assert read_results(tmp_path / "results.h5").status == "finished"


def test_failing_run_leaves_a_readable_file_marked_failed(tmp_path, monkeypatch):
    cfg = sparse_elbo.compose([*SMOKE, "trainer.max_epochs=3"])
    from sparse_elbo import evaluation

    calls = {"n": 0}
    original = evaluation.evaluate_problem

    def failing(problem, weights, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                problem.posterior.mean.fill_(float("nan"))
        return original(problem, weights, **kwargs)

    monkeypatch.setattr("sparse_elbo.runner.record.evaluate_problem", failing)
    with pytest.raises(FloatingPointError, match="epoch 1"):
        run(cfg, tmp_path, progress=False)
    res = read_results(tmp_path / "results.h5")
    assert res.status == "failed" and "non-finite" in res.attrs["reason"]
    assert len(res.metrics["epoch"]) == 1  # the completed epoch is kept


def _cli(args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sparse_elbo.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_cli_runs_and_prints_a_summary(tmp_path):
    out = _cli([*SMOKE, f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for label in ("final ELBO", "min matched |cosine|", "sigma", "lambda range", "training time", "results"):
        assert label in out.stdout
    assert read_results(tmp_path / "run" / "results.h5").status == "finished"
    assert "epochs:" not in out.stderr  # no progress bar in logs (not a terminal)


@pytest.mark.parametrize(
    "override,message",
    [
        ("posterior=banana", "Available options in 'posterior': amortized, diag, full"),
        ("dataset.grid=1", "dataset.grid must be >= 2"),
        ("dataset.sources=gauss", "dataset.sources must be one of ['laplace', 'bernoulli']"),
        ("dataset.noise=0", "dataset.noise must be > 0"),
        ("dataset.noise=-1", "dataset.noise must be > 0, got -1"),
        ("device=tpu", "device must be one of ['cpu', 'cuda', 'auto']"),
        ("dtype=float16", "dtype must be one of ['float32', 'float64']"),
        ("n_latents=0", "n_latents must be >= 1"),
        ("objective=sampled objective.n_samples=0", "objective.n_samples must be >= 1"),
        ("trainer.max_epochs=0", "trainer.max_epochs must be >= 1"),
        ("results.checkpoint_interval_s=-1", "results.checkpoint_interval_s must be >= 0, got -1"),
        ("results.snapshot_every=-2", "results.snapshot_every must be >= 0, got -2"),
        ("trainer=lbfgs annealing=prior annealing.term=noise", "annealing.term must be one of"),
        ("model.gauge=unit_lambda", "needs model.gauge=unit_norm"),
        ("dataset.grdi=3", "grdi"),
        (
            "objective=analytic",
            "objective=analytic is not supported by trainer ProfileLBFGSTrainer; allowed objectives: ['entropy']",
        ),
        ("posterior=amortized", "posterior=amortized is not supported by trainer ProfileLBFGSTrainer"),
        ("annealing=prior", "is not supported by trainer ProfileLBFGSTrainer, which maximises the unweighted objective"),
        ("trainer/initialisation=banana", "Available options in 'trainer/initialisation'"),
        ("trainer.initialisation.sparsity=0", "trainer.initialisation.sparsity must be > 0"),
        ("trainer.inner_tolerance=-1", "trainer.inner_tolerance must be >= 0"),
        ("trainer.max_epochs=abc", "trainer.max_epochs must be an integer, got 'abc'"),
        ("seed=abc", "seed must be an integer, got 'abc'"),
        ("evaluation.importance_samples=1", "evaluation.importance_samples must be >= 2, got 1"),
        ("trainer=em trainer.driver.iterations=0", "trainer.driver.iterations must be >= 1, got 0"),
        ("trainer=em trainer.e_step=analytic", "trainer.e_step must be a component"),
        (
            "trainer=lbfgs annealing=prior annealing.prior_scale=fixed",
            "annealing.prior_scale=fixed is not supported by trainer LBFGSTrainer",
        ),
        ("trainer=max_epochs=3", "mismatched input"),
        (
            "trainer=em objective=analytic",
            "objective=analytic is not supported by trainer EMTrainer; allowed objectives: ['entropy']",
        ),
        ("trainer=adam trainer.statistics=mini", "trainer.statistics must be a component"),
        ("trainer=em trainer.statistics=batch", "Could not override 'trainer.statistics'"),
        ("dataset=file", "Missing mandatory value: dataset.path"),
        ("dataset=file dataset.path=/nowhere/x.npy n_latents=3", "dataset.path='/nowhere/x.npy': no such file"),
        ("resume=/nowhere/results.h5", "resume='/nowhere/results.h5': no such results file"),
        ("posterior=full n_latents=20000", "reduce n_latents or dataset.n_data"),
        (
            "experiment=patches_em_small_prior_annealing trainer=adam",
            "trainer.driver, trainer.em_iterations_per_epoch are not settings of AdamTrainer",
        ),
    ],
)
def test_bad_overrides_are_refused_before_compute_with_one_line(tmp_path, override, message):
    """In-process, what the command line prints after ``error:`` (``test_a_bad_override_on_the_command_line``
    checks the status and stream once)."""
    overrides = override.split()
    own_data = any(o.startswith(("dataset=", "experiment=")) for o in overrides)
    assert message in refusal([*overrides, *(["debug=smoke"] if own_data else SMOKE)], tmp_path / "run")


@pytest.mark.slow
def test_a_bad_override_on_the_command_line_is_one_line_on_stderr_and_status_2(tmp_path):
    out = _cli(["dataset.noise=-1", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == ["error: dataset.noise must be > 0, got -1"]
    assert not (tmp_path / "run" / "results.h5").exists()


@pytest.mark.slow
def test_hydra_full_error_shows_the_traceback_of_a_user_error(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "sparse_elbo.train", "dataset.noise=-1", f"hydra.run.dir={tmp_path}/run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 1 and "Traceback" in out.stderr and "dataset.noise must be > 0" in out.stderr


def test_an_existing_results_file_is_a_user_error_and_is_left_alone(tmp_path):
    run(sparse_elbo.compose(SMOKE), tmp_path / "run", progress=False)
    with pytest.raises(Exception) as error:
        run(sparse_elbo.compose(SMOKE), tmp_path / "run", progress=False)
    assert "already exists" in user_error_message(error.value)  # what the command line prints, exit status 2
    assert read_results(tmp_path / "run" / "results.h5").status == "finished"


@pytest.mark.parametrize(
    "tool,arguments,message",
    [
        ("train", ["resume={junk}"], "not a results file (not HDF5)"),
        ("train", ["resume={missing}"], "no such results file"),
        ("report.plot_run", ["{junk}"], "not a results file (not HDF5)"),
        ("report.plot_run", ["{missing}"], "no such results file"),
        ("encode", ["results={junk}", "data={data}"], "not a results file (not HDF5)"),
        ("report.plot_run", ["{truncated}"], "could not read the results file"),
    ],
)
def test_a_file_that_is_not_a_results_file_is_a_one_line_user_error(
    tmp_path, tool, arguments, message, one_line_error, monkeypatch
):
    """In-process through each tool's own entry point (``run_tool`` / ``report_user_errors``, as ``python -m``)."""
    import importlib

    from sparse_elbo import results

    monkeypatch.setattr(results, "READ_PAUSE_S", 0.0)  # the truncated file's repeated reads, without their pauses

    from sparse_elbo.cli import report_user_errors, run_tool

    junk, data, truncated = tmp_path / "results.h5", tmp_path / "x.npy", tmp_path / "truncated.h5"
    junk.write_text("not HDF5")
    np.save(data, np.zeros((3, 4)))
    with h5py.File(truncated, "w") as f:  # an HDF5 file cut short, as by a full disk
        f.attrs["config"] = "seed: 0"
        f.create_dataset("metrics/elbo", data=np.arange(10_000.0))
    os.truncate(truncated, truncated.stat().st_size // 2)
    names = {"junk": junk, "missing": tmp_path / "missing.h5", "data": data, "truncated": truncated}
    arguments = [a.format(**names) for a in arguments]
    if tool == "train":
        assert message in refusal(arguments, tmp_path / "run")
        return
    main = importlib.import_module(f"sparse_elbo.{tool}").main
    call = (
        (lambda: report_user_errors(lambda: main(arguments)))
        if tool.startswith("report.")
        else (lambda: run_tool(main, arguments))
    )
    assert message in one_line_error(call)


def test_reading_a_results_file_repeats_a_read_that_met_a_half_written_file(tmp_path, monkeypatch):
    """A run rewrites its file as it trains: a read that meets half-written metadata (h5py's RuntimeError
    "addr overflow", OSError, KeyError) is repeated, and only READ_ATTEMPTS failures in a row are an error."""
    from sparse_elbo import results

    path = tmp_path / "results.h5"
    with h5py.File(path, "w") as f:
        f.attrs["status"] = "running"
        f.create_dataset("metrics/elbo", data=np.arange(3.0))
    monkeypatch.setattr(results, "READ_PAUSE_S", 0.0)
    errors = [RuntimeError("addr overflow"), OSError("bad object header"), KeyError("metrics")]
    calls, read = [], results._read_file

    def flaky(p):
        calls.append(p)
        if errors:
            raise errors.pop(0)
        return read(p)

    monkeypatch.setattr(results, "_read_file", flaky)
    loaded = results.read_results(path)
    assert len(calls) == 4 and loaded.status == "running" and list(loaded.metrics["elbo"]) == [0.0, 1.0, 2.0]
    errors.extend([RuntimeError("addr overflow")] * results.READ_ATTEMPTS)
    with pytest.raises(UnreadableFileError, match="could not read the results file .*addr overflow"):
        results.read_results(path)


@pytest.mark.parametrize("tool,first_line", [("encode", "Encode new data"), ("denoise", "Image denoising")])
def test_key_value_tools_print_their_settings_for_help(tool, first_line, capsys):
    import importlib

    from sparse_elbo.cli import run_tool

    run_tool(importlib.import_module(f"sparse_elbo.{tool}").main, ["--help"])
    out = capsys.readouterr().out
    assert out.startswith(first_line) and "results" in out


def test_only_user_errors_are_reported_as_one_line():
    """A user error anywhere in an exception's cause chain is reported as one line; anything else is a bug and
    keeps its traceback."""
    from hydra.errors import InstantiationException

    from sparse_elbo.cli import user_error_message
    from sparse_elbo.errors import ConfigError

    try:
        try:
            raise ConfigError("dataset.grid must be >= 2, got 1")
        except ConfigError as cause:
            raise InstantiationException("Error in call to target 'sparse_elbo.data.make_bars':\nConfigError(...)") from cause
    except InstantiationException as error:
        assert user_error_message(error) == "dataset.grid must be >= 2, got 1"
    assert user_error_message(ZeroDivisionError("division by zero")) is None
    assert user_error_message(ValueError("a plain ValueError from a library")) is None


@pytest.mark.slow
def test_multirun_sweep_writes_one_file_per_job(tmp_path):
    out = _cli(["-m", "posterior=diag,full", *SMOKE, f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    files = sorted((tmp_path / "sweep").glob("*/results.h5"))
    assert len(files) == 2
    families = sorted(read_results(f).config["posterior"]["_target_"].rsplit(".", 1)[1] for f in files)
    assert families == ["DiagonalPosterior", "FullCovariancePosterior"]
