"""Data sets: bars generation, file loading in every format, and clear errors for bad files."""

from __future__ import annotations

import re

import h5py
import hydra.utils
import numpy as np
import pytest
import scipy.io
import torch

import sparse_elbo
from sparse_elbo.cli import user_error_message
from sparse_elbo.data import HDF5Rows, StreamedRows, bars_dictionary, load_file, make_bars, read_data_file, rows_of
from sparse_elbo.errors import ConfigError
from sparse_elbo.parallel import Ranks
from sparse_elbo.posteriors import DiagonalPosterior
from sparse_elbo.runner import build
from sparse_elbo.runner.checks import check_capabilities


def test_bars_dictionary_has_g_vertical_and_g_horizontal_bars():
    W = bars_dictionary(4).reshape(4, 4, 8)
    for i in range(4):
        assert W[:, i, i].sum() == 4 and W[:, :, i].sum() == 4  # vertical: column i
        assert W[i, :, 4 + i].sum() == 4 and W[:, :, 4 + i].sum() == 4  # horizontal: row i
    assert np.linalg.matrix_rank(W.reshape(16, 8)) == 7  # sum of verticals = sum of horizontals


def test_bars_data_follow_the_generative_model():
    data = make_bars(grid=5, n_data=20000, sources="laplace", noise=0.1, seed=3)
    assert data.x.shape == (20000, 25) and data.W_true.shape == (25, 10) and data.image_shape == (5, 5)
    residual = data.x - data.sources @ data.W_true.T
    assert residual.std() == pytest.approx(0.1, rel=0.02)
    assert np.abs(data.sources).mean() == pytest.approx(1.0, rel=0.03)  # Laplace(0,1): E|z| = 1
    again = make_bars(grid=5, n_data=20000, sources="laplace", noise=0.1, seed=3)
    np.testing.assert_array_equal(data.x, again.x)
    assert not np.array_equal(data.x, make_bars(grid=5, n_data=20000, seed=4).x)


def test_bernoulli_bars_sources_are_binary_with_the_given_probability():
    data = make_bars(grid=3, n_data=20000, sources="bernoulli", bernoulli_probability=0.3, seed=0)
    assert set(np.unique(data.sources)) == {0.0, 1.0}
    assert data.sources.mean() == pytest.approx(0.3, abs=0.01)


@pytest.fixture
def array():
    return np.random.default_rng(0).normal(size=(12, 5))


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".h5", ".mat"])
def test_load_file_every_format(tmp_path, array, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".npy":
        np.save(path, array)
    elif suffix == ".npz":
        np.savez(path, patches=array)
    elif suffix == ".h5":
        with h5py.File(path, "w") as f:
            f.create_dataset("group/patches", data=array)
    else:
        scipy.io.savemat(path, {"patches": array})
    data = load_file(str(path))
    np.testing.assert_allclose(data.x, array)
    key = "group/patches" if suffix == ".h5" else "patches"
    if suffix != ".npy":
        np.testing.assert_allclose(load_file(str(path), key=key).x, array)


@pytest.mark.parametrize(
    "maker,key,error,message",
    [
        (lambda p: None, None, FileNotFoundError, "no such file"),
        (lambda p: p.write_bytes(b""), None, ValueError, "the file is empty"),
        (lambda p: np.save(p, np.zeros(5)), None, ValueError, "rank 2"),
        (lambda p: np.save(p, np.zeros((0, 4))), None, ValueError, "empty"),
        (lambda p: np.save(p, np.array([[1.0, np.nan], [0.0, 1.0]])), None, ValueError, "NaN/Inf"),
        (lambda p: np.save(p, np.array([[1.0, np.inf]])), None, ValueError, "NaN/Inf"),
        (lambda p: np.save(p, np.array([["a", "b"]])), None, ValueError, "real numeric array"),
        (lambda p: p.write_bytes(b"not a numpy file at all"), None, ValueError, "could not read"),
    ],
)
def test_bad_npy_files_are_rejected_with_a_clear_message(tmp_path, maker, key, error, message):
    """The header when the file is opened (memory-mapped), the values when a run takes its rows."""
    path = tmp_path / "x.npy"
    maker(path)
    with pytest.raises(error, match=message):
        dataset = load_file(str(path), key=key)
        rows_of(dataset.x, slice(0, dataset.n_data), "dataset=file")


@pytest.mark.parametrize("suffix", [".npy", ".h5"])
def test_a_rank_reads_and_checks_only_its_shard_of_a_file(tmp_path, suffix):
    """A .npy file is memory-mapped and a .h5 dataset read by slices: each rank of a data-parallel run takes
    its rows alone, so a bad value in the second half stops rank 1 (named by its rows), not rank 0."""
    x = np.random.default_rng(0).normal(size=(1000, 25)).astype(np.float32)
    x[900, 3] = np.nan
    path = tmp_path / f"x{suffix}"
    if suffix == ".npy":
        np.save(path, x)
    else:
        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=x)
    overrides = ["dataset=file", f"dataset.path={path}", "n_latents=10", "trainer=em", "posterior=diag", "dtype=float64"]
    cfg = sparse_elbo.compose(overrides)
    dataset = load_file(str(path))
    assert isinstance(dataset.x, (np.memmap, HDF5Rows)) and dataset.x.shape == (1000, 25)
    first = build(cfg, Ranks(0, 2)).problem.x  # (500, 25): rows 0–499 only
    np.testing.assert_array_equal(first.numpy(), x[:500].astype(np.float64))
    with pytest.raises(ValueError, match=r"dataset=file, rows 500–999: data holds 1 NaN/Inf values \(first bad rows: \[400\]\)"):
        build(cfg, Ranks(1, 2))


def test_wrong_or_missing_keys_are_named(tmp_path, array):
    path = tmp_path / "two.npz"
    np.savez(path, a=array, b=array)
    with pytest.raises(KeyError, match=r"set dataset.key to one of them"):
        load_file(str(path))
    with pytest.raises(KeyError, match=r"dataset.key='c' not found .* available keys: \['a', 'b'\]"):
        load_file(str(path), key="c")
    mat = tmp_path / "x.mat"
    scipy.io.savemat(mat, {"IMAGES": array})
    with pytest.raises(KeyError, match="available keys: \\['IMAGES'\\]"):
        load_file(str(mat), key="images")


def test_unsupported_suffix_is_rejected(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("1,2\n")
    with pytest.raises(ValueError, match=r"unsupported file type '.csv'; allowed: \['.npy'"):
        load_file(str(path))


# ------------------------------------------------------------------ files that are not what their name says


def _cut_short(path, write):
    write(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _h5(path):
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.ones((500, 40)))


FOREIGN = {  # per reader: a file that is not what its suffix says, and one cut short (as by a full disk)
    ".npy": [lambda p: p.write_text("notes\n" * 20), lambda p: _cut_short(p, lambda q: np.save(q, np.ones((50, 40))))],
    ".npz": [lambda p: p.write_text("notes\n"), lambda p: _cut_short(p, lambda q: np.savez(q, x=np.ones((50, 40))))],
    ".h5": [lambda p: p.write_text("notes\n"), lambda p: _cut_short(p, _h5)],
    ".mat": [
        lambda p: p.write_text("notes\n" * 20),
        lambda p: _cut_short(p, lambda q: scipy.io.savemat(q, {"x": np.ones((50, 40))})),
    ],
}
READERS = {".npy": (np, "load"), ".npz": (np, "load"), ".h5": (h5py, "File"), ".mat": (scipy.io, "loadmat")}


@pytest.mark.parametrize("suffix,kind", [(s, k) for s in FOREIGN for k in (0, 1)], ids=lambda v: str(v))
def test_a_file_that_is_not_what_its_suffix_says_is_a_one_line_user_error_naming_the_setting(tmp_path, suffix, kind):
    path = tmp_path / f"x{suffix}"
    FOREIGN[suffix][kind](path)
    with pytest.raises(ConfigError, match=rf"^dataset\.path='{re.escape(str(path))}': could not read the file as ") as caught:
        load_file(str(path))
    assert user_error_message(caught.value) == str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match=rf"^data='{re.escape(str(path))}': could not read"):  # as sparse_elbo.encode names it
        read_data_file(str(path), argument="data", key_argument="key")


@pytest.mark.parametrize("suffix", list(READERS))
def test_a_bug_while_reading_a_data_file_is_not_turned_into_a_user_error(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"x{suffix}"
    FOREIGN[suffix][1](path)  # a file the reader would refuse

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug in the reader")

    module, name = READERS[suffix]
    monkeypatch.setattr(module, name, broken)
    with pytest.raises(ZeroDivisionError, match="a bug in the reader"):
        load_file(str(path))


def test_a_matlab_v73_file_is_read_in_matlab_axis_order(tmp_path, array):
    path = tmp_path / "x.mat"
    with h5py.File(path, "w") as f:
        f["patches"] = array.T  # what MATLAB's -v7.3 writes: column-major, seen transposed by HDF5
        f.create_group("#refs#").create_dataset("a", data=np.ones(2))  # MATLAB's bookkeeping is not a variable
    np.testing.assert_array_equal(load_file(str(path)).x, array)


def _write(path, x) -> None:
    if path.suffix == ".npy":
        np.save(path, x)
    else:
        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=x)


@pytest.mark.parametrize("suffix", [".npy", ".h5"])
def test_streamed_rows_are_the_files_rows_in_any_order_and_bad_values_stop_the_build(tmp_path, suffix):
    """``dataset.stream=true``: a rank's rows stay in the file and ``x[index]`` reads them (in any order, with
    repeats; a slice too); the values are checked in blocks when the run is built, before any compute."""
    x = np.random.default_rng(1).normal(size=(700, 9)).astype(np.float32)
    path = tmp_path / f"x{suffix}"
    _write(path, x)
    rows = StreamedRows(load_file(str(path), stream=True).x[100:600], torch.float64, torch.device("cpu"), "f", block_rows=64)
    assert rows.shape == (500, 9) and len(rows) == 500 and not rows.is_cuda
    index = torch.tensor([499, 3, 3, 250, 0, 17])
    np.testing.assert_array_equal(rows[index].numpy(), x[100:600][index.numpy()].astype(np.float64))
    np.testing.assert_array_equal(rows[10:20].numpy(), x[110:120].astype(np.float64))
    assert rows[index].dtype == torch.float64 and rows.new_zeros(2, 3).dtype == torch.float64
    x[650, 2] = np.inf
    _write(path, x)
    overrides = ["dataset=file", f"dataset.path={path}", "dataset.stream=true", "n_latents=4", "trainer=adam"]
    with pytest.raises(ValueError, match=r"dataset=file, rows 0–699: data holds 1 NaN/Inf values \(first bad rows: \[650\]\)"):
        build(sparse_elbo.compose([*overrides, "posterior=amortized"]))


def _streamed_and_in_memory(tmp_path, name: str, setting: list[str]):
    """The same run on a 600×16 file with its rows in memory and left in the file (``dataset.stream``)."""
    x = np.random.default_rng(2).normal(size=(600, 16)).astype(np.float32)
    _write(tmp_path / "x.h5", x)
    base = ["dataset=file", f"dataset.path={tmp_path / 'x.h5'}", "n_latents=6", "dtype=float64", *setting]
    return tuple(
        sparse_elbo.read_results(sparse_elbo.run(sparse_elbo.compose([*base, *extra]), tmp_path / f"{name}{i}").results_path)
        for i, extra in enumerate([["dataset.stream=true"], []])
    )


ADAM_STREAMED = ["trainer=adam", "trainer.max_epochs=2", "trainer.batch_size=100"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "setting",
    [
        [*ADAM_STREAMED, "posterior=amortized"],
        ["trainer=em_subsets", "trainer.subset_size=200", "trainer.max_epochs=3", "trainer.average_last_epochs=2"],
        ["trainer=profile_lbfgs", "posterior=full", "trainer.max_epochs=2", "trainer.initialisation.n_points=300"],
    ],
    ids=["adam_amortized", "em_subsets", "profile_lbfgs"],
)
def test_each_streaming_trainer_gives_its_in_memory_run(tmp_path, setting):
    """Adam and EM read the same rows by minibatch and block: bitwise equal. The fits' products over all rows
    (profile_lbfgs) go block by block from the file: equal up to float64 summation order."""
    streamed, in_memory = _streamed_and_in_memory(tmp_path, "run", setting)
    rounding = 1e-10 if "trainer=profile_lbfgs" in setting else 0.0
    np.testing.assert_allclose(streamed.metrics["elbo"], in_memory.metrics["elbo"], rtol=rounding, atol=0)
    np.testing.assert_allclose(streamed.final["W"], in_memory.final["W"], rtol=0, atol=rounding)


def test_a_streamed_run_is_the_in_memory_run_and_what_cannot_stream_is_refused_before_reading(tmp_path):
    """Adam on per-point posteriors with its rows left in the file: bit for bit the run in memory (the other
    streaming trainers: the slow test above). What cannot stream is refused in one line before reading."""
    streamed, in_memory = _streamed_and_in_memory(tmp_path, "adam", [*ADAM_STREAMED, "posterior=diag"])
    np.testing.assert_array_equal(streamed.metrics["elbo"], in_memory.metrics["elbo"])
    np.testing.assert_array_equal(streamed.final["W"], in_memory.final["W"])
    np.savez(tmp_path / "x.npz", x=np.ones((5, 16)))
    stream = ["dataset=file", f"dataset.path={tmp_path / 'x.h5'}", "n_latents=6", "dataset.stream=true", "posterior=diag"]
    refusals = {
        "trainer=lbfgs": r"dataset.stream=true: trainer LBFGSTrainer holds its data in memory; trainers that read them by "
        r"rows: \['adam', 'em', 'em_subsets', 'profile_lbfgs'\]",
        "evaluation.held_out_fraction=0.1": r"dataset.stream=true leaves the data in their file: evaluation.held_out_fraction must be 0",
        "trainer/initialisation=sparse_coding": r"set trainer.initialisation.n_points to the rows it may hold$",
        f"dataset.path={tmp_path / 'x.npz'}": r"dataset.stream=true reads rows from .npy and .h5/.hdf5 files, not from '.npz' ones",
    }
    for override, message in refusals.items():
        trainer = [] if override.startswith("trainer=") else ["trainer=adam"]
        with pytest.raises(ConfigError, match=message):
            build(sparse_elbo.compose([*stream, *trainer, override]))
    em = sparse_elbo.compose(["trainer=em", "posterior=diag"])  # on a GPU a null block size is the whole data set
    components = [hydra.utils.instantiate(em[group]) for group in ("trainer", "objective", "annealing")]
    with pytest.raises(ConfigError, match=r"^dataset.stream=true on CUDA: set trainer.driver.block_size \(null takes"):
        check_capabilities(components[0], DiagonalPosterior, *components[1:], streamed=True, device_type="cuda")
