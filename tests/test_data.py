"""Data sets: bars generation, file loading in every format, and clear errors for bad files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.io

from sparse_elbo.data import bars_dictionary, load_file, make_bars


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
    path = tmp_path / "x.npy"
    maker(path)
    with pytest.raises(error, match=message):
        load_file(str(path), key=key)


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
