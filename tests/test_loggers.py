"""Watching a run (``logger=``): what each backend logged, read back with the backend's own reader (a CSV
reader, TensorBoard's event accumulator, MLflow's client on a local store), equals the results file's
per-epoch ELBOs; the dictionary's image is there; a resumed run continues the same logged run without
duplicated epochs; a missing extra is a one-line error before any compute; a failing backend warns once and
never stops the run."""

from __future__ import annotations

import csv
import importlib.util
import socket
import warnings

import numpy as np
import pytest

import sparse_elbo
from sparse_elbo.cli import user_error_message
from sparse_elbo.results import read_results
from sparse_elbo.runner import run
from sparse_elbo.runner.loggers import CSVLogger, LoggerWarning

SMALL = [
    "debug=smoke",
    "dataset.grid=3",
    "dataset.n_data=60",
    "trainer=lbfgs",
    "trainer.iterations_per_epoch=10",
    "trainer.max_epochs=6",
]


def _csv_elbos(folder):
    with open(folder / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [int(r["epoch"]) for r in rows], [float(r["elbo"]) for r in rows]


def _tensorboard(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "histograms": 0})
    events.Reload()
    return events


def _mlflow_run(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "sparse_elbo"]
    (found,) = client.search_runs([experiment.experiment_id])
    return client, found


def _logged_elbos(backend, folder, tmp_path):
    """(epochs, ELBOs) as the backend holds them."""
    if backend == "csv":
        return _csv_elbos(folder)
    if backend == "tensorboard":
        scalars = _tensorboard(folder).Scalars("elbo")
        return [s.step for s in scalars], [s.value for s in scalars]
    client, found = _mlflow_run(tmp_path)
    history = sorted(client.get_metric_history(found.info.run_id, "elbo"), key=lambda m: m.step)
    return [m.step for m in history], [m.value for m in history]


@pytest.mark.parametrize("backend", ["csv", "tensorboard", "mlflow"])
def test_each_backend_logs_every_epochs_elbo_as_the_results_file_holds_it(backend, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default store: mlruns/ under the working directory
    summary = run(
        sparse_elbo.compose([*SMALL, f"logger={backend}"]), tmp_path / "run", overrides=["logger=" + backend], progress=False
    )
    results = read_results(summary.results_path)
    epochs, elbos = _logged_elbos(backend, tmp_path / "run", tmp_path)
    assert epochs == list(results.metrics["epoch"])
    np.testing.assert_allclose(elbos, results.metrics["elbo"], rtol=1e-6 if backend == "tensorboard" else 1e-12)  # TB: float32


def test_tensorboard_holds_the_dictionary_image_the_lambda_histogram_and_the_config(tmp_path):
    run(sparse_elbo.compose([*SMALL, "logger=tensorboard", "logger.image_every_s=0"]), tmp_path / "run", progress=False)
    events = _tensorboard(tmp_path / "run")
    tags = events.Tags()
    assert {"elbo", "sigma", "lambda_median", "gini_mean", "min_matched_cosine", "weight_prior", "wall_time"} <= set(
        tags["scalars"]
    )
    assert [i.step for i in events.Images("dictionary")] == [0, 1, 2, 3, 4, 5]  # every epoch (image_every_s=0)
    image = events.Images("dictionary")[0]
    assert (image.height, image.width) == (2 * 4 + 1, 3 * 4 + 1)  # 6 fields of 3x3 in 2 rows of 3, one-pixel borders
    assert len(events.Histograms("lambda")) == 6 and "config/text_summary" in tags["tensors"]


def test_mlflow_holds_the_config_as_params_the_images_and_the_results_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = run(sparse_elbo.compose([*SMALL, "logger=mlflow"]), tmp_path / "run", progress=False)
    client, found = _mlflow_run(tmp_path)
    assert found.info.status == "FINISHED"
    assert found.data.params["trainer._target_"] == "sparse_elbo.trainers.lbfgs.LBFGSTrainer"
    assert found.data.params["dataset.grid"] == "3" and float(found.data.metrics["elbo"]) == pytest.approx(summary.elbo, abs=1e-9)
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"results.h5", "dictionary_final.png"} <= artifacts
    local = client.download_artifacts(found.info.run_id, "results.h5", str(tmp_path / "copy"))
    assert read_results(local).status == "finished"


@pytest.mark.parametrize("backend", ["csv", "tensorboard", "mlflow"])
def test_a_resumed_run_continues_the_same_logged_run_without_duplicated_epochs(backend, tmp_path, monkeypatch):
    import sparse_elbo.runner.record as record

    monkeypatch.chdir(tmp_path)
    overrides = [*SMALL, f"logger={backend}", "results.checkpoint_every=3"]  # checkpoints after epochs 2 and 5
    original, calls = record.evaluate_problem, {"n": 0}

    def interrupting(problem, weights, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # epochs 0..3 logged, the last checkpoint after epoch 2: epoch 3 runs (and is logged) again
            raise KeyboardInterrupt("simulated Ctrl-C")
        return original(problem, weights, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(record, "evaluate_problem", interrupting)
        with pytest.raises(KeyboardInterrupt):
            run(sparse_elbo.compose(overrides), tmp_path / "run", progress=False)
    resumed = run(sparse_elbo.compose([f"resume={tmp_path / 'run' / 'results.h5'}"]), tmp_path / "unused", progress=False)
    results = read_results(resumed.results_path)
    epochs, elbos = _logged_elbos(backend, tmp_path / "run", tmp_path)
    assert epochs == list(range(6)) == list(results.metrics["epoch"])  # each epoch once, the same step numbers
    np.testing.assert_allclose(elbos, results.metrics["elbo"], rtol=1e-6)


@pytest.mark.parametrize("backend,extra", [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_a_backend_that_is_not_installed_is_a_one_line_error_naming_the_extra(backend, extra, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == backend else real(name, *a))
    with pytest.raises(Exception) as error:
        run(sparse_elbo.compose([*SMALL, f"logger={backend}"]), tmp_path / "run", progress=False)
    assert (
        user_error_message(error.value)
        == f'logger={backend} needs {backend}, which is not installed: pip install "sparse_elbo[{extra}]"'
    )
    assert not (tmp_path / "run" / "results.h5").exists()  # before any compute


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once the socket is closed


def test_an_unreachable_tracking_server_warns_once_and_the_run_finishes(tmp_path, recwarn):
    uri = f"http://127.0.0.1:{_closed_port()}"
    summary = run(sparse_elbo.compose([*SMALL, "logger=mlflow", f"logger.tracking_uri={uri}"]), tmp_path / "run", progress=False)
    assert (
        read_results(summary.results_path).status == "finished" and len(read_results(summary.results_path).metrics["epoch"]) == 6
    )
    said = [w for w in recwarn if issubclass(w.category, LoggerWarning)]
    assert len(said) == 1 and "logger=mlflow stopped at open" in str(said[0].message)


def test_a_full_disk_warns_once_and_never_stops_training(tmp_path, monkeypatch):
    def full(self, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CSVLogger, "epoch", full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run(sparse_elbo.compose([*SMALL, "logger=csv"]), tmp_path / "run", progress=False)
    said = [w for w in caught if issubclass(w.category, LoggerWarning)]
    assert len(said) == 1 and "No space left on device" in str(said[0].message)
    assert read_results(summary.results_path).status == "finished"


@pytest.mark.slow
def test_a_sweeps_jobs_are_logged_together(tmp_path):
    """A multirun: one MLflow experiment for the sweep with one run per job, named by its overrides, and one
    TensorBoard subfolder per job under the sweep's folder."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    sweep = tmp_path / "sweep"
    for backend in ("mlflow", "tensorboard"):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "sparse_elbo.train",
                "-m",
                "posterior=diag,full",
                *SMALL,
                f"logger={backend}",
                f"hydra.sweep.dir={sweep}_{backend}",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if str(sweep) in e.name]
    runs = client.search_runs([experiment.experiment_id])
    names = sorted(r.info.run_name for r in runs)  # each job's overrides
    assert [name.split(",")[0] for name in names] == ["posterior=diag", "posterior=full"]
    assert sorted(p.parent.parent.name for p in (tmp_path / "sweep_tensorboard").glob("*/tensorboard/events.*")) == ["0", "1"]


def test_dictionary_images_come_at_most_every_interval_the_first_and_the_last_epoch_included(tmp_path):
    """A run of short epochs is not slowed by an image per epoch: with a long interval, the first and the last."""
    run(sparse_elbo.compose([*SMALL, "logger=tensorboard", "logger.image_every_s=3600"]), tmp_path / "run", progress=False)
    assert [i.step for i in _tensorboard(tmp_path / "run").Images("dictionary")] == [0, 5]
