"""Reliability: crash-safe results (SIGKILL, SIGTERM), resume equal to an uninterrupted run,
bitwise determinism, the numerical guard, and finite closed forms at extreme inputs."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_elbo
from sparse_elbo import closed_forms
from sparse_elbo.results import HALF_WRITTEN, read_results
from sparse_elbo.runner import run

SMALL = ["debug=smoke", "dataset.grid=3", "dataset.n_data=60", "trainer.max_epochs=6"]  # configs/debug/smoke.yaml
ANNEALED = ["annealing=prior", "annealing.start=3", "annealing.step=1"]
LBFGS_SMALL = ["trainer=lbfgs", *SMALL, "trainer.iterations_per_epoch=10"]
PROFILE_SMALL = ["trainer=profile_lbfgs", *SMALL, "trainer.iterations_per_epoch=3", "trainer.relative_tolerance=0"]
EM_SMALL = ["trainer=em", *SMALL, "trainer.driver.iterations=10", "trainer.em_iterations_per_epoch=2", *ANNEALED]
EM_SUBSETS_SMALL = [  # epoch subsets, W averaged over the last 5 epochs
    "trainer=em_subsets",
    *SMALL,
    "trainer.driver.iterations=10",
    "trainer.em_iterations_per_epoch=2",
    "trainer.subset_size=25",
    "trainer.average_last_epochs=5",
    *ANNEALED,
]
AUTHORS_SMALL = ["trainer=authors_em", *SMALL, "trainer.driver.iterations=10", "trainer.driver.block_size=20", *ANNEALED]


def _interrupt_after(monkeypatch, epoch_to_fail: int):
    """Make the run raise KeyboardInterrupt right after evaluating ``epoch_to_fail`` (before its checkpoint)."""
    import sparse_elbo.runner.record as record

    original = record.evaluate_problem
    calls = {"n": 0}

    def interrupting(problem, weights, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == epoch_to_fail + 2:  # evaluations of epochs 0..epoch_to_fail, then interrupt
            raise KeyboardInterrupt("simulated Ctrl-C")
        return original(problem, weights, *args, **kwargs)

    monkeypatch.setattr(record, "evaluate_problem", interrupting)


@pytest.mark.parametrize(
    "overrides",
    [
        LBFGS_SMALL,
        [*LBFGS_SMALL, "objective=sampled", "posterior=diag"],
        EM_SMALL,
        [*EM_SMALL, "annealing.prior_scale=fixed"],
        EM_SUBSETS_SMALL,
        PROFILE_SMALL,
        AUTHORS_SMALL,
    ],
    ids=[
        "lbfgs-entropy-full",
        "lbfgs-sampled-diag",
        "em-annealed",
        "em-fixed-scale",
        "em-epoch-subsets",
        "profile-lbfgs",
        "authors-em",
    ],
)
def test_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch, overrides):
    reference = run(sparse_elbo.compose(overrides), tmp_path / "reference", progress=False)
    ref = read_results(reference.results_path)

    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            run(sparse_elbo.compose(overrides), tmp_path / "interrupted", progress=False)
    interrupted = read_results(tmp_path / "interrupted" / "results.h5")
    assert interrupted.status == "interrupted"
    assert len(interrupted.metrics["epoch"]) >= 3  # epochs 0..2 kept (2 evaluated before the interrupt)

    resumed = run(sparse_elbo.compose([f"resume={tmp_path / 'interrupted' / 'results.h5'}"]), tmp_path / "unused", progress=False)
    assert resumed.results_path == tmp_path / "interrupted" / "results.h5"
    res = read_results(resumed.results_path)
    assert res.status == "finished"
    # exactly: the checkpoint holds every state the computation reads (one process, one thread count)
    np.testing.assert_array_equal(res.metrics["epoch"], ref.metrics["epoch"])
    np.testing.assert_array_equal(res.metrics["elbo"], ref.metrics["elbo"])
    np.testing.assert_array_equal(res.final["W"], ref.final["W"])
    assert float(res.final["elbo"]) == float(ref.final["elbo"])
    np.testing.assert_array_equal(res.snapshots["W"], ref.snapshots["W"])


def test_checkpoints_are_at_least_the_interval_apart(tmp_path, monkeypatch):
    """With a clock that advances 1 s per reading (the run's start, then each checkpoint check and write),
    an interval of 2.5 s checkpoints after epochs 2 and 5 of 6; an interval of 0 after every epoch."""
    import types

    import sparse_elbo.runner.checkpoint as checkpoint
    from sparse_elbo.results import ResultsWriter

    written = []
    original = ResultsWriter.write_checkpoint
    monkeypatch.setattr(
        ResultsWriter, "write_checkpoint", lambda self, epoch, blob: (written.append(epoch), original(self, epoch, blob))
    )
    no_interval = LBFGS_SMALL  # its interval set below
    for interval, expected in ((2.5, [2, 5]), (0, [0, 1, 2, 3, 4, 5])):
        ticks = iter(range(1000))
        monkeypatch.setattr(checkpoint, "time", types.SimpleNamespace(monotonic=lambda: float(next(ticks))))
        written.clear()
        cfg = sparse_elbo.compose([*no_interval, "trainer.relative_tolerance=0", f"results.checkpoint_interval_s={interval}"])
        summary = run(cfg, tmp_path / f"interval{interval}", progress=False)
        assert summary.epochs == 6
        assert written == expected


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "results.h5"
    with h5py.File(path, "w") as f:
        f.attrs["config"] = "seed: 0\n"
    with pytest.raises(ValueError, match="no checkpoint beside this results file"):
        run(sparse_elbo.compose([f"resume={path}"]), tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="no such results file"):
        run(sparse_elbo.compose([f"resume={tmp_path / 'missing.h5'}"]), tmp_path, progress=False)


def test_same_seed_gives_bitwise_identical_results_and_records_provenance(tmp_path):
    overrides = [*LBFGS_SMALL, "objective=sampled", "trainer.max_epochs=3"]
    a = read_results(run(sparse_elbo.compose(overrides), tmp_path / "a", progress=False).results_path)
    b = read_results(run(sparse_elbo.compose(overrides), tmp_path / "b", progress=False).results_path)
    for key in ("elbo", "sigma2", "lambda", "gini_mean"):
        np.testing.assert_array_equal(a.metrics[key], b.metrics[key])
    np.testing.assert_array_equal(a.final["W"], b.final["W"])
    np.testing.assert_array_equal(a.final["posterior"]["scale_tril"], b.final["posterior"]["scale_tril"])
    c = read_results(run(sparse_elbo.compose([*overrides, "seed=1"]), tmp_path / "c", progress=False).results_path)
    assert not np.array_equal(a.final["W"], c.final["W"])
    for key in ("seed", "device", "dtype", "versions"):
        assert key in a.attrs
    assert "torch=" in a.attrs["versions"] and a.attrs["device"] == "cpu" and a.attrs["dtype"] == "float64"


def test_non_finite_parameters_stop_the_run_naming_epoch_and_parameter(tmp_path, monkeypatch):
    import sparse_elbo.runner.record as record

    original = record.evaluate_problem
    calls = {"n": 0}

    def poisoning(problem, weights, *args, **kwargs):
        calls["n"] += 1
        value = original(problem, weights, *args, **kwargs)
        if calls["n"] == 3:
            with torch.no_grad():
                problem.model.W_raw[0, 0] = float("inf")
        return value

    monkeypatch.setattr(record, "evaluate_problem", poisoning)
    with pytest.raises(FloatingPointError, match=r"epoch 2: parameter model.W_raw"):
        run(sparse_elbo.compose(LBFGS_SMALL), tmp_path, progress=False)
    res = read_results(tmp_path / "results.h5")
    assert res.status == "failed" and "model.W_raw" in res.attrs["reason"]
    np.testing.assert_array_equal(res.metrics["epoch"], [0, 1])  # the last good epochs are kept
    assert np.isfinite(res.snapshots["W"]).all() and res.snapshots["W"].shape[0] == 2


@contextlib.contextmanager
def _cli_process(args, cwd):
    """A command-line run in a child process, always ended when the block exits (also when a test fails)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sparse_elbo.train", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=60)  # reaps it and closes the pipes


def _wait_for_epochs(path: Path, n: int, process, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if path.exists():
            try:
                with h5py.File(path, "r") as f:
                    if "epoch" in f["metrics"] and f["metrics/epoch"].shape[0] >= n:
                        return
            except HALF_WRITTEN:  # caught between the writer's open and close; the process is polled again
                pass
        time.sleep(0.05)
    raise TimeoutError(f"{path} did not reach {n} epochs")


LONG_RUN = [
    "debug=smoke",
    "dataset.n_data=300",
    "trainer.iterations_per_epoch=5",
    "trainer.max_epochs=400",
    "trainer.relative_tolerance=0",
]


def _signal_a_long_run(tmp_path, after_epochs: int, signum: int):
    """Start a long CLI run, wait until ``after_epochs`` epochs are in its results file, send ``signum``;
    returns the exit status, stderr and the results path."""
    results = tmp_path / "run" / "results.h5"
    with _cli_process([*LONG_RUN, f"hydra.run.dir={tmp_path}/run"], tmp_path) as process:
        _wait_for_epochs(results, after_epochs, process)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr.decode(), results


@pytest.mark.slow
def test_sigkill_leaves_a_readable_file_with_every_completed_epoch(tmp_path):
    _, _, results = _signal_a_long_run(tmp_path, 3, signal.SIGKILL)
    res = read_results(results)
    assert res.status == "running"  # it never got to say otherwise
    n = len(res.metrics["epoch"])
    assert n >= 3
    np.testing.assert_array_equal(res.metrics["epoch"], np.arange(n))
    for name, values in res.metrics.items():
        assert values.shape[0] == n, name  # every quantity has every completed epoch
    assert res.snapshots["W"].shape[0] == n
    from sparse_elbo.results import read_checkpoint

    checkpoint_epoch, _ = read_checkpoint(results)  # and a checkpoint to continue from
    assert checkpoint_epoch >= n - 2


@pytest.mark.slow
def test_sigterm_marks_the_run_interrupted(tmp_path):
    returncode, stderr, results = _signal_a_long_run(tmp_path, 2, signal.SIGTERM)
    assert returncode == 128 + signal.SIGTERM  # as a shell reports a process SIGTERM ended
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"interrupted by SIGTERM: {results} is marked interrupted; continue it with resume={results}"
    )
    res = read_results(results)
    assert res.status == "interrupted" and "signal 15" in res.attrs["reason"]
    assert len(res.metrics["epoch"]) >= 2


@settings(max_examples=200, deadline=None)
@given(
    mean=st.floats(-1e4, 1e4, allow_nan=False),
    log_std=st.floats(np.log(1e-8), np.log(1e3)),
)
def test_folded_normal_mean_and_gradients_stay_finite(mean, log_std):
    m = torch.tensor([mean], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([np.exp(log_std)], dtype=torch.float64, requires_grad=True)
    value = closed_forms.folded_normal_mean(m, s)
    grad_m, grad_s = torch.autograd.grad(value.sum(), (m, s))
    assert torch.isfinite(value).all() and torch.isfinite(grad_m).all() and torch.isfinite(grad_s).all()
    assert float(value.detach()) >= abs(mean) - 1e-9 * max(1.0, abs(mean))  # E|z| ≥ |E z|
    assert abs(float(grad_m)) <= 1.0 and 0.0 <= float(grad_s) <= np.sqrt(2 / np.pi) + 1e-12


@settings(max_examples=100, deadline=None)
@given(
    log_sigma2=st.floats(np.log(1e-12), np.log(1e4)),
    log_std=st.floats(np.log(1e-8), np.log(10.0)),
    scale=st.floats(1e-3, 1e3),
)
def test_objectives_stay_finite_with_finite_gradients_for_extreme_inputs(log_sigma2, log_std, scale):
    from sparse_elbo.model import SparseCodingModel
    from sparse_elbo.objectives import AnalyticELBO, EntropyELBO
    from sparse_elbo.posteriors import FullCovariancePosterior

    generator = torch.Generator().manual_seed(0)
    model = SparseCodingModel(4, 3, generator=generator).double()
    posterior = FullCovariancePosterior(5, 3).double()
    with torch.no_grad():
        posterior.mean.copy_(scale * torch.randn(5, 3, generator=generator, dtype=torch.float64))
        posterior.log_diag.fill_(log_std)
        model.log_sigma2.fill_(log_sigma2)
    x = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    for objective in (AnalyticELBO(), EntropyELBO()):
        value = objective(x, posterior(), model)
        grads = torch.autograd.grad(value.elbo, [model.W_raw, model.log_sigma2, *posterior.parameters()], allow_unused=True)
        assert torch.isfinite(value.elbo)
        assert all(g is None or torch.isfinite(g).all() for g in grads)


_PAGE_FAULTS = """
import resource, sys, torch
import sparse_elbo
from sparse_elbo.train import main

def faults(n=6):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        array = torch.ones(16 << 20)  # 64 MiB, every page written
        del array
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

before = faults()
sys.argv = ["sparse-elbo", *sys.argv[1:]]
main()  # a run from the command line: python -m sparse_elbo.train OVERRIDES
faults(20)  # the heap grows to its working size
after = faults()
print(sparse_elbo.retain_freed_memory(), before, after)  # whether malloc takes the settings (not where the user set their own)
"""
TINY_RUN = ["trainer=lbfgs", "dataset.grid=3", "dataset.n_data=30", "trainer.max_epochs=1", "evaluation.ground_truth=false"]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("user_setting", [None, "MALLOC_TOP_PAD_"])
def test_a_command_line_run_keeps_freed_arrays_for_reuse_unless_the_user_tuned_malloc(tmp_path, user_setting):
    """``retain_freed_memory``, called by the command line (not by ``sparse_elbo.run``): after a run from
    ``sparse_elbo.train``'s entry point, freed 64 MiB arrays are reused instead of being faulted in again page
    by page (16,384 pages each of six times before); with a user's own malloc setting nothing changes."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_") and key != "HYDRA_FULL_ERROR"}
    if user_setting is not None:
        env[user_setting] = str(1 << 20)
    arguments = [*TINY_RUN, f"hydra.run.dir={tmp_path / 'run'}"]
    out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS, *arguments], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert read_results(tmp_path / "run" / "results.h5").status == "finished"
    changed, before, after = out.stdout.splitlines()[-1].split()
    assert int(before) >= 6 * 16384 * 0.9  # every allocation faulted in afresh
    if user_setting is None:
        assert changed == "True" and int(after) < 16384  # not one array's pages afresh
    else:
        assert changed == "False" and int(after) >= 6 * 16384 * 0.9


@pytest.fixture
def mallopt_calls(monkeypatch):
    """Every ``mallopt`` call made through ``runner/memory.py``, recorded instead of made."""
    from sparse_elbo.runner import memory

    for name in memory.USER_TUNABLES:
        monkeypatch.delenv(name, raising=False)
    calls = []

    def mallopt(parameter, value):
        calls.append((parameter, value))
        return 1

    monkeypatch.setattr(
        memory, "ctypes", types.SimpleNamespace(CDLL=lambda name: types.SimpleNamespace(mallopt=mallopt), c_int=ctypes.c_int)
    )
    return calls


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_run_and_resume_leave_malloc_and_the_signal_handlers_as_they_found_them(tmp_path, monkeypatch, mallopt_calls):
    """``sparse_elbo.run`` and ``resume`` are library calls: a setting of the whole process (malloc's) is the
    caller's to make, and the SIGTERM handler of a run is the caller's again afterwards."""
    handler = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            sparse_elbo.run(sparse_elbo.compose([*LBFGS_SMALL, "trainer.max_epochs=3"]), tmp_path / "run", progress=False)
    summary = sparse_elbo.resume(tmp_path / "run" / "results.h5", progress=False)
    assert read_results(summary.results_path).status == "finished"
    assert mallopt_calls == [] and signal.getsignal(signal.SIGTERM) is handler
    assert sparse_elbo.retain_freed_memory() is True and len(mallopt_calls) == 3  # what a script asks for, recorded


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("tool", ["encode", "denoise"])
def test_the_encode_and_denoise_commands_keep_freed_memory_for_reuse(tool, tmp_path, mallopt_calls):
    """The tools' mains tune malloc for their process, as ``sparse_elbo.train`` does, before their work."""
    import importlib

    from sparse_elbo.cli import run_tool

    module = importlib.import_module(f"sparse_elbo.{tool}")
    arguments = {"encode": ["results=r.h5", "data=x.npy"], "denoise": ["image=x.npy"]}[tool]
    with pytest.raises(SystemExit):  # the files do not exist: one line, after malloc was tuned
        run_tool(module.main, [*arguments, f"out={tmp_path / 'nowhere' / 'out.npy'}"])
    assert len(mallopt_calls) == 3
