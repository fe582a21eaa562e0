"""Sweeps: paper sweep configs, a multirun with a failing job read back by ``python -m sparse_elbo.report.summarize``,
figures from a sweep, and the joblib, submitit_local and Optuna plugins driving sparse_elbo.train."""

from __future__ import annotations

import csv
import itertools
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate

import sparse_elbo
from sparse_elbo.config import config_dir
from sparse_elbo.report.sweeps import group_runs, load_runs
from sparse_elbo.results import read_results
from sparse_elbo.runner import run

CONFIGS = config_dir()
PAPER = sorted(p.stem for p in (CONFIGS / "paper").glob("*.yaml"))
TINY = [
    "trainer=lbfgs",
    "dataset.n_data=40",
    "trainer.max_epochs=2",
    "trainer.iterations_per_epoch=5",
    "evaluation.ground_truth=false",
]


def _cli(args, cwd, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sparse_elbo.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _tool(name, *args, cwd):
    """``python -m sparse_elbo.<name> ARGS``: the user-facing tools are package modules."""
    return subprocess.run(
        [sys.executable, "-m", f"sparse_elbo.{name}", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def _compose(overrides, hydra=False):
    return sparse_elbo.compose(overrides, return_hydra_config=hydra)


def test_every_figure_has_a_full_and_a_quick_paper_sweep():
    for name in ("bars_recovery", "patches_annealing", "objectives", "amortized_vs_not"):
        assert name in PAPER and f"{name}_quick" in PAPER, name


@pytest.mark.parametrize("name", PAPER)
def test_paper_sweep_is_a_multirun_into_its_own_directory_and_every_job_composes(name):
    cfg = _compose([f"paper={name}"], hydra=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweep.dir == f"outputs/paper/{name}"
    params = dict(cfg.hydra.sweeper.params)
    assert params, "a paper sweep sets hydra.sweeper.params"
    parser = OverridesParser.create()
    choices = {}
    for k, v in params.items():
        override = parser.parse_override(f"{k}={v}")
        choices[k] = [str(x) for x in override.sweep_iterator()] if override.is_sweep_override() else [str(override.value())]
    # every combination of the swept values (one seed) composes, and its components validate
    seedless = {k: (v[:1] if k == "seed" else v) for k, v in choices.items()}
    for combo in itertools.product(*seedless.values()):
        overrides = [f"paper={name}", *(f"{k}={v}" for k, v in zip(seedless, combo))]
        job = _compose(overrides)
        for group in ("objective", "annealing", "trainer"):
            instantiate(job[group])


def test_user_overrides_redirect_a_paper_sweep():
    cfg = _compose(["paper=bars_recovery_quick", "hydra.sweep.dir=/tmp/elsewhere", "dataset.n_data=77"], hydra=True)
    assert cfg.hydra.sweep.dir == "/tmp/elsewhere" and cfg.dataset.n_data == 77


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """8 tiny bars jobs: posterior (diag, full) x init_std (1e200: diverges at the first evaluation, 0.1)
    x 2 seeds; the failing jobs come first and must not stop the others."""
    root = tmp_path_factory.mktemp("sweep")
    out = _cli(
        ["-m", "posterior=diag,full", "posterior.init_std=1e200,0.1", "seed=0,1", *TINY, f"hydra.sweep.dir={root}/sweep"],
        cwd=root,
    )
    return root, out


@pytest.mark.slow
def test_a_failing_job_is_marked_failed_and_the_others_finish(sweep):
    root, out = sweep
    assert out.returncode != 0  # Hydra reports the failed jobs ...
    assert "non-finite values at epoch 0" in out.stderr
    files = sorted((root / "sweep").glob("*/results.h5"))
    assert len(files) == 8  # ... after every job has run
    by_status = {}
    for f in files:
        r = read_results(f)
        by_status.setdefault(r.status, []).append(r)
    assert len(by_status["finished"]) == 4 and len(by_status["failed"]) == 4
    assert all(float(r.config["posterior"]["init_std"]) == 1e200 for r in by_status["failed"])
    assert all("non-finite values at epoch 0" in r.attrs["reason"] for r in by_status["failed"])


@pytest.mark.slow  # the sweep fixture: eight jobs through the command line
def test_summary_has_one_row_per_configuration_with_counts_and_lists_failures(sweep):
    root, _ = sweep
    (root / "sweep" / "junk").mkdir()
    (root / "sweep" / "junk" / "results.h5").write_bytes(b"not an HDF5 file")  # reported, not a crash
    out = _tool("report.summarize", root / "sweep", cwd=root)
    assert out.returncode == 0, out.stderr
    with open(root / "sweep" / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4  # posterior x init_std; seeds pooled
    counts = {(r["posterior"], r["posterior.init_std"]): (int(r["n_finished"]), int(r["n_failed"])) for r in rows}
    assert counts == {
        ("DiagonalPosterior", "1e+200"): (0, 2),
        ("DiagonalPosterior", "0.1"): (2, 0),
        ("FullCovariancePosterior", "1e+200"): (0, 2),
        ("FullCovariancePosterior", "0.1"): (2, 0),
    }
    finished = [r for r in rows if r["n_finished"] == "2"]
    for r in finished:
        assert r["elbo_n"] == "2" and np.isfinite(float(r["elbo_mean"])) and float(r["elbo_std"]) >= 0
        assert r["recovered_n"] == "2" and r["sigma_n"] == "2" and r["train_time_n"] == "2"
    with open(root / "sweep" / "runs.csv") as handle:
        per_run = list(csv.DictReader(handle))
    assert len(per_run) == 9 and sum(r["status"] == "unreadable" for r in per_run) == 1
    md = (root / "sweep" / "summary.md").read_text()
    assert md in out.stdout
    table, failures = md.split("## Runs that did not finish")
    assert table.count("\n| ") == 1 + 4  # header and one row per configuration
    assert failures.count("| failed |") == 4 and failures.count("| unreadable |") == 1
    assert "non-finite values at epoch 0" in failures and "junk/results.h5" in failures


@pytest.mark.slow
def test_figures_are_written_from_a_sweep(sweep, tmp_path):
    root, _ = sweep
    directory = tmp_path / "sweep"
    shutil.copytree(root / "sweep", directory)  # the shared sweep stays as it is for the other tests
    # one tiny image-patches run beside the bars runs: the dictionary and annealing figures too
    cfg = _compose(
        [
            "dataset=image_patches",
            "dataset.patch_size=6",
            "dataset.n_patches=300",
            "n_latents=8",
            "posterior=diag",
            "trainer=em",
            "trainer.max_epochs=2",
            "trainer.driver.iterations=5",
            "annealing=prior",
            "evaluation.ground_truth=false",
        ]
    )
    run(cfg, directory / "patches", progress=False)
    (tmp_path / "figures").mkdir()  # --out names an existing folder
    out = _tool("report.figures", directory, "--out", tmp_path / "figures", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for name in ("bars_fields", "recovery", "elbo", "entropies", "gini", "annealing", "dictionary_0"):
        for suffix in ("png", "pdf"):
            assert (tmp_path / "figures" / f"{name}.{suffix}").stat().st_size > 1000, (name, suffix)


@pytest.mark.slow  # the sweep fixture: eight jobs through the command line
def test_one_results_file_is_summarised_beside_it(sweep, tmp_path):
    root, _ = sweep
    finished = next(f for f in sorted((root / "sweep").glob("*/results.h5")) if read_results(f).status == "finished")
    copy = tmp_path / "one" / "results.h5"
    copy.parent.mkdir()
    shutil.copy(finished, copy)
    out = _tool("report.summarize", copy, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "one" / "runs.csv") as handle:
        (row,) = csv.DictReader(handle)
    assert (
        row["path"] == "results.h5"
        and row["status"] == "finished"
        and float(row["elbo"]) == pytest.approx(float(read_results(copy).final["elbo"]))
    )


@pytest.mark.slow  # the sweep fixture: eight jobs through the command line
def test_groups_follow_the_stored_config_not_the_directories(sweep, tmp_path):
    root, _ = sweep
    groups = group_runs([r for r in load_runs(root / "sweep") if r.results is not None and "W_true" in r.results.data])
    assert sorted(len(g.runs) for g in groups) == [2, 2, 2, 2]
    assert all(len({r.results.config["seed"] for r in g.runs}) == 2 for g in groups)


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path):
    out = _cli(
        ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", *TINY, f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    files = sorted((tmp_path / "sweep").glob("*/results.h5"))
    assert len(files) == 2
    runs = [read_results(f) for f in files]
    assert all(r.status == "finished" for r in runs) and sorted(r.config["seed"] for r in runs) == [0, 1]


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path):
    """The Slurm path (hydra/launcher=submitit_slurm) with submitit's local executor: each job in its own
    process, pickled task function, its own directory and results file."""
    out = _cli(
        [
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=10",
            "hydra.launcher.cpus_per_task=1",
            "posterior=diag,full",
            *TINY,
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr + out.stdout
    files = sorted((tmp_path / "sweep").glob("*/results.h5"))
    assert len(files) == 2
    runs = [read_results(f) for f in files]
    assert all(r.status == "finished" for r in runs)
    assert sorted(r.config["posterior"]["_target_"].rsplit(".", 1)[1] for r in runs) == [
        "DiagonalPosterior",
        "FullCovariancePosterior",
    ]
    assert (tmp_path / "sweep" / ".submitit").is_dir()  # submitit's job folders: the jobs went through submitit


@pytest.mark.slow
def test_optuna_sweeper_maximises_the_final_elbo_returned_by_the_entry_point(tmp_path):
    out = _cli(["+search=optuna_bars", "hydra.sweeper.n_trials=2", *TINY, f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    elbos = [float(read_results(f).final["elbo"]) for f in sorted((tmp_path / "sweep").glob("*/results.h5"))]
    assert len(elbos) == 2
    assert best["best_value"] == pytest.approx(max(elbos), abs=1e-9)


@pytest.mark.slow  # the sweep fixture: eight jobs through the command line
def test_reproduce_table_reports_each_sweeps_headline_and_time(sweep):
    root, _ = sweep
    paper = root / "outputs" / "paper"
    paper.mkdir(parents=True, exist_ok=True)
    if not (paper / "bars_recovery_quick").exists():
        (paper / "bars_recovery_quick").symlink_to(root / "sweep")
    out = _tool("report.reproduce", "quick", "report.md", 42, 2, 1, "bars_recovery_quick|40|2", cwd=root)
    assert out.returncode == 0, out.stderr
    report = (root / "report.md").read_text()
    row = next(line for line in report.splitlines() if "paper=bars_recovery_quick" in line)
    assert "**posterior=DiagonalPosterior, posterior.init_std=0.1**: recovered 0/2" in row  # 2 epochs: no bars yet
    assert "| 40 s | 2 s |" in row and "2 failed" in row
    assert "Total 42 s" in report
