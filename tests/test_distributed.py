"""Data-parallel runs under torchrun with the gloo backend on 2 CPU processes (one thread each), against the
same run in one process (docs/scaling.md): the identities where the algorithm separates across data points,
the quality of the E-step variant where it does not, one results file, refusals before compute, resuming.
The sharding arithmetic itself is checked in-process."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import hydra.utils
import numpy as np
import pytest
import torch

import sparse_elbo
from sparse_elbo.data import load_file
from sparse_elbo.errors import ConfigError, ExistingFileError, InsufficientMemoryError
from sparse_elbo.parallel import Ranks, held
from sparse_elbo.patches import main as patches_main
from sparse_elbo.patches import write_patches
from sparse_elbo.runner import build

SMALL_EM = [
    "trainer=em",
    "posterior=diag",
    "dtype=float64",
    "dataset.n_data=1000",
    "trainer.max_epochs=4",
    "trainer.driver.block_size=250",  # blocks of one rank are blocks of one process: the same L-BFGS problems
    "trainer/initialisation=sparse_coding",
]

# minibatches of 96 over 2 shards of 500: most hold points of both ranks, some not evenly
SMALL_ADAM = ["trainer=adam", "dtype=float64", "dataset.n_data=1000", "trainer.max_epochs=3", "trainer.batch_size=96"]


def test_shards_cover_the_data_in_rank_order_and_indices_map_to_them():
    for n, size in [(10, 3), (7, 7), (1000, 2)]:
        parts = [Ranks(rank, size).shard(n) for rank in range(size)]
        assert [p.start for p in parts] == [0, *[p.stop for p in parts[:-1]]] and parts[-1].stop == n
        assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1
    index = torch.tensor([7, 2, 9, 4])
    places, local = held(index, 10)  # one process holds everything
    assert places.tolist() == [0, 1, 2, 3] and local.tolist() == [7, 2, 9, 4]
    with pytest.raises(ConfigError, match="cannot be shared"):
        Ranks(0, 4).shard(3)


def test_a_run_too_large_for_the_device_names_how_many_ranks_would_hold_it():
    """The memory check is per rank; for a data-parallel trainer the refusal names the ranks that would fit
    (the GiB are printed to one decimal: the bounds allow for it)."""
    too_large = ["posterior=full", "n_latents=3000", "dataset.n_data=1000"]
    with pytest.raises(InsufficientMemoryError, match=r"or run it on at least (\d+) ranks \(docs/scaling.md\)$") as raised:
        build(sparse_elbo.compose(["trainer=em", *too_large]))
    needed, available = (float(v) for v in re.findall(r"([0-9.]+) GiB", str(raised.value))[:2])
    ranks = int(re.search(r"at least (\d+) ranks", str(raised.value)).group(1))
    assert ranks >= 2 and (ranks - 1) * (available - 0.05) < needed + 0.05 <= ranks * (available + 0.05) + 0.1
    with pytest.raises(InsufficientMemoryError, match=r"dtype=float32$"):  # joint L-BFGS: not data-parallel
        build(sparse_elbo.compose(["trainer=lbfgs", *too_large]))


def test_patches_written_once_to_hdf5_are_the_image_patches_and_a_rank_reads_its_rows(tmp_path, capsys):
    settings = ["seed=3", "dataset.patch_size=8", "dataset.n_patches=3000", "dataset.images=[camera,grass]"]
    patches_main([f"out={tmp_path / 'p.h5'}", *settings])
    assert capsys.readouterr().out.strip() == str(tmp_path / "p.h5")
    expected = hydra.utils.instantiate(sparse_elbo.compose(["dataset=image_patches", *settings]).dataset)
    with h5py.File(tmp_path / "p.h5", "r") as f:
        np.testing.assert_array_equal(f["x"][()], expected.x.astype(np.float32))
        np.testing.assert_array_equal(f["positions"][()], expected.info["positions"])
    with h5py.File(write_patches(tmp_path / "blocks.h5", settings, block_rows=700), "r") as f:  # cut 700 at a time
        np.testing.assert_array_equal(f["x"][()], expected.x.astype(np.float32))
    cfg = sparse_elbo.compose(["dataset=file", f"dataset.path={tmp_path / 'p.h5'}", "dataset.key=x", "n_latents=16"])
    assert load_file(str(tmp_path / "p.h5"), "x").image_shape == (8, 8)  # a run draws its fields, measures localisation
    second = build(cfg, Ranks(1, 2)).problem.x  # rows 1500–2999, read from the file alone
    np.testing.assert_array_equal(second.numpy(), expected.x[1500:].astype(np.float32).astype(np.float64))
    with pytest.raises(ExistingFileError, match=r"out=.* already exists"):
        patches_main([f"out={tmp_path / 'p.h5'}", *settings])
    with pytest.raises(ConfigError, match=r"'n_patches=5': the settings are out=, seed= and dataset.KEY=VALUE"):
        patches_main([f"out={tmp_path / 'q.h5'}", "n_patches=5"])


def test_per_point_posteriors_written_in_blocks_of_rows_are_the_whole_arrays(tmp_path, monkeypatch):
    """The results file's per-data-point posteriors written a row at a time equal them written in one block."""
    overrides = ["posterior=full", "dataset.n_data=60", "trainer.max_epochs=2", "dtype=float64"]
    whole = one_process(overrides, tmp_path / "whole").final["posterior"]
    monkeypatch.setattr(sparse_elbo.runner.final, "POSTERIOR_BLOCK_NUMBERS", 1)  # one row per block
    rows = one_process(overrides, tmp_path / "rows").final["posterior"]
    assert set(whole) == {"mean", "scale_tril"} and whole["scale_tril"].shape == (60, 10, 10)
    for name in whole:
        np.testing.assert_array_equal(rows[name], whole[name])


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sparse_elbo.train"]


@contextlib.contextmanager
def launched(command: list[str]):
    """The command started in a session of its own, each process with one thread; the whole process group is
    ended however the test ends."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def torchrun(arguments: list[str], folder: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 -m sparse_elbo.train ARGUMENTS`` into ``folder``, to its end."""
    command = [*TORCHRUN, *arguments, f"hydra.run.dir={folder}"]
    with launched(command) as process:
        out, _ = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, process.returncode, out, "")


def one_process(overrides: list[str], folder: Path, threads: int = 1):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        summary = sparse_elbo.run(sparse_elbo.compose(overrides), folder, progress=False)
    finally:
        torch.set_num_threads(previous)
    return sparse_elbo.read_results(summary.results_path)


def gaps(a, b) -> np.ndarray:
    """The largest differences of two runs: per-epoch ELBO, final W, σ², the posterior's arrays (per-point
    parameters, or an encoder's weights)."""
    posterior = [np.abs(a.final["posterior"][name] - b.final["posterior"][name]).max() for name in a.final["posterior"]]
    return np.array(
        [
            np.abs(a.metrics["elbo"] - b.metrics["elbo"]).max(),
            np.abs(a.final["W"] - b.final["W"]).max(),
            abs(float(a.final["sigma2"]) - float(b.final["sigma2"])),
            max(posterior),
        ]
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        [*SMALL_EM, "trainer/e_step=analytic"],
        ["trainer=profile_lbfgs", "posterior=full", "dtype=float64", "dataset.n_data=400", "trainer.max_epochs=3"],
        [*SMALL_ADAM, "posterior=diag", "annealing=prior", "annealing.prior_scale=fixed"],
        [*SMALL_ADAM, "posterior=amortized", "trainer.fused_objective=false"],
        [*SMALL_ADAM, "posterior=full", "objective=sampled"],
    ],
    ids=[
        "em_analytic",
        "profile_lbfgs_full",
        "adam_diag_annealed",
        "adam_amortized",
        "adam_full_sampled",
    ],
)
def test_two_ranks_give_the_one_process_run_where_the_algorithm_separates(overrides, tmp_path, monkeypatch):
    assert_two_ranks_give_the_one_process_run(overrides, tmp_path, monkeypatch)


def assert_two_ranks_give_the_one_process_run(overrides: list[str], tmp_path: Path, monkeypatch) -> None:
    """The analytic E-step at fixed σ², λ, the M-step, the MAP start, the profile objective's fit and Adam's
    steps over the same global minibatches (with the same noise, for the sampled objective) are sums over
    points: 2 ranks give the 1-process run up to the order of summation (float64) — no further from it than
    the same run on 1 and on 2 threads (which changes that order alone), with a margin of 10. Where the
    schedule holds the prior's scale at λ_0 (a sum over every point, whose order the ranks change: its last
    bit), the reference also counts the 1-process run with λ_0 one ulp up."""
    done = torchrun(overrides, tmp_path / "two")
    assert done.returncode == 0, done.stdout[-3000:]
    two = sparse_elbo.read_results(tmp_path / "two" / "results.h5")
    assert two.status == "finished" and int(two.attrs["ranks"]) == 2
    one, one_two_threads = one_process(overrides, tmp_path / "one"), one_process(overrides, tmp_path / "one2", 2)
    rounding = gaps(one, one_two_threads)
    if "annealing.prior_scale=fixed" in overrides:
        scale = sparse_elbo.trainers.base.initial_prior_scale
        monkeypatch.setattr(sparse_elbo.trainers.base, "initial_prior_scale", lambda *a: np.nextafter(scale(*a), np.inf))
        rounding = np.maximum(rounding, gaps(one, one_process(overrides, tmp_path / "one_ulp")))
    assert (gaps(two, one) <= 10 * rounding + 1e-11).all(), (gaps(two, one), rounding)
    x = one_process_data(overrides)[:5]
    codes = sparse_elbo.load(tmp_path / "two" / "results.h5").encode(x)  # the file serves load and encode
    assert codes.mean.shape == (5, one.final["W"].shape[1])


def _random_file(path: Path, n: int, d: int) -> Path:
    """``n`` rows of ``d`` standard normal float32 numbers in an HDF5 file (dataset ``x``), written in blocks."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        rows = f.create_dataset("x", (n, d), dtype="float32")
        for start in range(0, n, 100_000):
            rows[start : start + 100_000] = rng.standard_normal((min(100_000, n - start), d), dtype=np.float32)
    return path


@pytest.mark.slow
def test_two_ranks_streaming_their_shards_from_the_file_give_the_one_process_run(tmp_path, monkeypatch):
    path = _random_file(tmp_path / "x.h5", 1000, 16)
    overrides = ["trainer=adam", "dtype=float64", "trainer.max_epochs=3", "trainer.batch_size=96", "posterior=amortized"]
    overrides += ["dataset=file", f"dataset.path={path}", "n_latents=6", "dataset.stream=true"]
    assert_two_ranks_give_the_one_process_run(overrides, tmp_path, monkeypatch)


@pytest.mark.slow
def test_a_streamed_shard_is_read_in_blocks_and_its_memory_does_not_grow_with_the_data(tmp_path):
    """``dataset.stream=true`` (amortised Adam, minibatch statistics: no per-point state): a file four times as
    large (128 MB against 32 MB of float32) raises the run's peak memory by less than a quarter of the extra
    data — it is never held — where the same run with the data in memory rises by more than the extra data."""
    settings = ["n_latents=8", "trainer=adam", "posterior=amortized", "trainer.max_epochs=1", "trainer.batch_size=8192"]
    settings += ["trainer/statistics=batch", "dataset=file"]
    script = str(Path(__file__).parent / "scripts" / "peak_memory.py")

    def peak_rise(n: int, *extra: str) -> int:
        path = tmp_path / f"x{n}.h5"
        if not path.exists():
            _random_file(path, n, 32)
        with launched(
            [sys.executable, script, str(tmp_path / f"run{n}{len(extra)}"), *settings, f"dataset.path={path}", *extra]
        ) as process:
            out, _ = process.communicate(timeout=600)
        assert process.returncode == 0, out[-3000:]
        return int(out.strip().splitlines()[-1])

    small, large = peak_rise(250_000, "dataset.stream=true"), peak_rise(1_000_000, "dataset.stream=true")
    extra_data = 750_000 * 32 * 4
    assert large - small < extra_data / 4, (small, large)
    assert peak_rise(1_000_000) - large > extra_data


def one_process_data(overrides: list[str]) -> np.ndarray:
    import hydra.utils

    return hydra.utils.instantiate(sparse_elbo.compose(overrides).dataset).x


@pytest.mark.slow
def test_each_ranks_rows_reach_rank_0_in_bounded_blocks_in_the_data_sets_order(tmp_path):
    """How per-data-point posteriors reach the results file: rank 1's rows arrive at rank 0 in blocks of at most
    7 (of 26 or 27), each at its place in the whole data set."""
    script = Path(__file__).parent / "scripts" / "stream_rows.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    with launched([*command, str(tmp_path / "rows.npz")]) as process:
        out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out[-3000:]
    written = np.load(tmp_path / "rows.npz")
    np.testing.assert_array_equal(written["received"], np.arange(53 * 3, dtype=np.float64).reshape(53, 3))
    assert int(written["largest"]) == 7


@pytest.mark.slow
def test_the_entropy_e_step_on_two_ranks_reaches_the_one_process_result(tmp_path):
    """Sequential across blocks in one process; on 2 ranks each rank's blocks follow the other rank's sums of
    the sweep's start (docs/scaling.md): the same ELBO within 0.01 nats and the same bars here."""
    overrides = [*SMALL_EM, "trainer/e_step=entropy", "trainer.max_epochs=8"]
    done = torchrun(overrides, tmp_path / "two")
    assert done.returncode == 0, done.stdout[-3000:]
    two = sparse_elbo.read_results(tmp_path / "two" / "results.h5")
    one = one_process(overrides, tmp_path / "one")
    assert abs(float(two.final["elbo"]) - float(one.final["elbo"])) < 0.01
    assert float(two.final["min_matched_cosine"]) > 0.95 and float(one.final["min_matched_cosine"]) > 0.95


@pytest.mark.slow
def test_a_trainer_that_is_not_data_parallel_is_refused_in_one_line_before_compute(tmp_path):
    done = torchrun(["trainer=lbfgs", "dataset.n_data=100"], tmp_path / "two")
    assert done.returncode != 0
    assert "error: trainer LBFGSTrainer is not data-parallel and cannot run on 2 ranks" in done.stdout
    assert "Traceback" not in done.stdout.split("error: trainer")[0]
    assert not (tmp_path / "two" / "results.h5").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("trainer", "epochs"),
    [
        ([*SMALL_EM, "trainer/e_step=analytic"], 100),
        # Adam's state per rank: its rows' moments; the shared order and noise generators; the statistics store
        (["trainer=adam", "posterior=diag", "objective=sampled", "dataset.n_data=2000", "trainer.batch_size=64"], 40),
    ],
    ids=["em", "adam"],
)
def test_sigterm_ends_every_rank_and_the_run_resumes_on_two_ranks_as_if_uninterrupted(trainer, epochs, tmp_path):
    """SIGTERM to torchrun: every rank ends, the file is marked interrupted with its completed epochs; each
    rank's shard of the checkpoint is there; resuming on one process is refused in one line, on 2 ranks it
    gives the uninterrupted 2-rank run exactly."""
    overrides = [*trainer, f"trainer.max_epochs={epochs}", "results.checkpoint_interval_s=0"]
    folder = tmp_path / "two"
    path = folder / "results.h5"
    with launched([*TORCHRUN, *overrides, f"hydra.run.dir={folder}"]) as process:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and _checkpointed_epochs(path) < 2:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=120)
    stopped = sparse_elbo.read_results(path)
    assert stopped.status == "interrupted", out[-3000:]
    assert 2 <= len(stopped.metrics["elbo"]) < epochs and (folder / "checkpoint.rank1.pt").is_file()
    with pytest.raises(ConfigError, match=r"trained on 2 rank\(s\) and continues only on as many"):
        sparse_elbo.resume(path)
    again = torchrun([f"resume={path}"], tmp_path / "again")
    assert again.returncode == 0, again.stdout[-3000:]
    uninterrupted = torchrun(overrides, tmp_path / "uninterrupted")
    assert uninterrupted.returncode == 0, uninterrupted.stdout[-3000:]
    resumed = sparse_elbo.read_results(path)
    assert resumed.status == "finished" and len(resumed.metrics["elbo"]) == epochs
    assert (gaps(resumed, sparse_elbo.read_results(tmp_path / "uninterrupted" / "results.h5")) == 0).all()


def _checkpointed_epochs(path: Path) -> int:
    import h5py

    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f.attrs.get("checkpoint_epoch", -1)) + 1
    except (OSError, KeyError):
        return 0


@pytest.mark.slow
def test_when_one_rank_dies_every_rank_ends_and_the_file_is_readable_and_marked(tmp_path):
    overrides = [*SMALL_EM, "trainer/e_step=analytic", "trainer.max_epochs=400"]
    folder = tmp_path / "two"
    with launched([*TORCHRUN, *overrides, f"hydra.run.dir={folder}"]) as process:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and _epochs(folder / "results.h5") < 2:
            time.sleep(0.05)
        os.kill(_rank_process(process.pid, 1), signal.SIGKILL)
        started = time.monotonic()
        out, _ = process.communicate(timeout=120)
        ended_after = time.monotonic() - started
    assert process.returncode != 0 and ended_after < 60
    results = sparse_elbo.read_results(folder / "results.h5")
    assert results.status in ("failed", "interrupted"), out[-3000:]
    assert len(results.metrics["elbo"]) >= 2


def _epochs(path: Path) -> int:
    try:
        return len(sparse_elbo.read_results(path).metrics.get("elbo", []))
    except Exception:  # not yet there, or being written
        return 0


def _rank_process(parent: int, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (from each child's environment)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    for child in children:
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no worker of rank {rank} among {children}")


@pytest.mark.slow
def test_the_submitit_launcher_runs_one_job_as_two_ranks(tmp_path):
    """Hydra's submitit launcher (hydra/launcher=local_ranks: Slurm's path, run by submitit's local
    executor): one job of 2 tasks is one 2-rank run, equal to the torchrun one."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    overrides = [*SMALL_EM, "trainer/e_step=analytic", "trainer.max_epochs=2"]
    command = [sys.executable, "-m", "sparse_elbo.train", "-m", "hydra/launcher=local_ranks", *overrides]
    with launched([*command, f"hydra.sweep.dir={tmp_path / 'sweep'}"]) as process:
        out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-3000:]
    submitted = sparse_elbo.read_results(tmp_path / "sweep" / "0" / "results.h5")
    assert submitted.status == "finished" and int(submitted.attrs["ranks"]) == 2
    done = torchrun(overrides, tmp_path / "two")
    assert done.returncode == 0, done.stdout[-3000:]
    assert (gaps(submitted, sparse_elbo.read_results(tmp_path / "two" / "results.h5")) == 0).all()
