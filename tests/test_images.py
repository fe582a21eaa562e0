"""Natural-image patches: Olshausen whitening against its equation and a 1/f spectrum, patch extraction,
the builtin (offline) images, the .mat / folder / van Hateren loaders, and clear errors."""

from __future__ import annotations

import inspect
import re
import socket

import h5py
import numpy as np
import pytest
import scipy.io
import skimage.io
from hydra.utils import instantiate

import sparse_elbo
from sparse_elbo import images
from sparse_elbo.cli import user_error_message
from sparse_elbo.data import Dataset
from sparse_elbo.errors import ConfigError
from sparse_elbo.images import (
    BUILTIN_IMAGES,
    builtin_images,
    extract_patches,
    load_folder_images,
    load_mat_images,
    load_vanhateren,
    make_image_patches,
    whiten,
)


def one_over_f_image(shape, seed=0):
    """Isotropic random image with amplitude spectrum 1/|k| (k in cycles per pixel), random phases."""
    rng = np.random.default_rng(seed)
    k = np.hypot(np.fft.fftfreq(shape[0])[:, None], np.fft.fftfreq(shape[1])[None, :])
    amplitude = np.divide(1.0, k, out=np.zeros_like(k), where=k > 0)
    return np.fft.ifft2(np.fft.fft2(rng.standard_normal(shape)) * amplitude).real


def band_power(image, low, high, angle=None):
    """Mean power of the image's FFT over |k|·size in [low, high) cycles per image (size = smaller side),
    optionally only within 20 degrees of the vertical (angle='vertical') or horizontal frequency axis."""
    rows, cols = image.shape
    u, v = np.fft.fftfreq(rows)[:, None], np.fft.fftfreq(cols)[None, :]
    f = min(rows, cols) * np.hypot(u, v)
    mask = (f >= low) & (f < high)
    if angle is not None:
        theta = np.degrees(np.arctan2(np.abs(u), np.abs(v)))  # 0: horizontal frequency, 90: vertical
        mask &= theta > 70 if angle == "vertical" else theta < 20
    return (np.abs(np.fft.fft2(image)) ** 2)[mask].mean()


# ------------------------------------------------------------------------------------------ whitening


@pytest.mark.parametrize("target", [0.1, 2.5])
def test_whiten_gives_zero_mean_and_the_target_variance(target):
    image = 3.0 + 5.0 * np.random.default_rng(1).random((40, 56))
    white = whiten(image, target_variance=target)
    assert white.shape == image.shape and white.dtype == np.float64
    assert abs(white.mean()) < 1e-12
    assert white.var() == pytest.approx(target, rel=1e-12)


def test_whiten_default_variance_is_point_one_and_input_is_untouched():
    image = np.random.default_rng(2).random((32, 32))
    copy = image.copy()
    assert whiten(image).var() == pytest.approx(0.1, rel=1e-12)
    np.testing.assert_array_equal(image, copy)


@pytest.mark.parametrize("shape", [(32, 32), (48, 64), (64, 40)])
def test_whiten_applies_the_zero_phase_filter_f_exp_f_over_f0_to_the_4(shape):
    """An impulse has a flat spectrum, so the whitened impulse's spectrum is the filter itself (times a gain)."""
    size = min(shape)
    f = size * np.hypot(np.fft.fftfreq(shape[0])[:, None], np.fft.fftfreq(shape[1])[None, :])
    R = f * np.exp(-((f / (0.4 * size)) ** 4))
    impulse = np.zeros(shape)
    impulse[0, 0] = 1.0
    spectrum = np.fft.fft2(whiten(impulse))
    gain = spectrum[0, 1].real / R[0, 1]
    assert gain > 0
    np.testing.assert_allclose(spectrum, gain * R, atol=1e-10 * np.abs(spectrum).max())  # real: zero phase


def test_whitened_one_over_f_image_has_a_flat_spectrum():
    size = 256
    image = one_over_f_image((size, size))
    bands = np.linspace(0.05 * size, 0.25 * size, 6)
    before = [band_power(image, lo, hi) for lo, hi in zip(bands[:-1], bands[1:])]
    after = [band_power(whiten(image), lo, hi) for lo, hi in zip(bands[:-1], bands[1:])]
    assert max(before) / min(before) > 10  # 1/f^2 power: falls ~ (0.25/0.05)^2 = 25x across the range
    assert max(after) / min(after) < 2  # whitened: flat up to the gentle exp(-(f/f0)^4) roll-off


def test_whitening_a_non_square_image_favours_no_orientation():
    image = one_over_f_image((128, 256), seed=3)
    white = whiten(image)
    vertical = band_power(white, 4, 16, angle="vertical")
    horizontal = band_power(white, 4, 16, angle="horizontal")
    assert 0.67 < vertical / horizontal < 1.5


def test_whiten_rejects_constant_and_non_2d_images():
    with pytest.raises(ValueError, match="constant"):
        whiten(np.ones((16, 16)))
    with pytest.raises(ValueError, match="2-D"):
        whiten(np.ones((4, 4, 3)))


# ---------------------------------------------------------------------------------------- patches


@pytest.fixture
def stack():
    rng = np.random.default_rng(0)
    return [rng.standard_normal((30, 40)), rng.standard_normal((25, 25)), rng.standard_normal((60, 20))]


def test_extract_patches_shape_determinism_and_seed(stack):
    a = extract_patches(stack, 6, 300, seed=5)
    assert a.shape == (300, 36) and a.dtype == np.float64
    np.testing.assert_array_equal(a, extract_patches(stack, 6, 300, seed=5))
    assert not np.array_equal(a, extract_patches(stack, 6, 300, seed=6))


def test_patches_are_the_image_crops_at_their_positions(stack):
    p = 7
    patches, positions = extract_patches(stack, p, 200, seed=1, return_positions=True)
    assert positions.shape == (200, 3)
    assert len({tuple(row) for row in positions}) == 200  # distinct positions
    for patch, (i, r, c) in zip(patches, positions):
        assert 0 <= r <= stack[i].shape[0] - p and 0 <= c <= stack[i].shape[1] - p
        np.testing.assert_array_equal(patch.reshape(p, p), stack[i][r : r + p, c : c + p])
    np.testing.assert_array_equal(patches, extract_patches(stack, p, 200, seed=1))


def test_patch_positions_are_uniform_over_all_images(stack):
    p = 5
    _, positions = extract_patches(stack, p, 1000, seed=2, return_positions=True)
    counts = np.array([(r - p + 1) * (c - p + 1) for r, c in (im.shape for im in stack)])
    share = np.bincount(positions[:, 0], minlength=3) / 1000
    np.testing.assert_allclose(share, counts / counts.sum(), atol=0.03)
    assert positions[:, 1].max() == max(im.shape[0] for im in stack) - p  # reaches the last rows and columns
    assert positions[:, 2].max() == max(im.shape[1] for im in stack) - p


def test_remove_dc_gives_zero_mean_patches(stack):
    raw = extract_patches(stack, 4, 100, seed=0)
    centred = extract_patches(stack, 4, 100, seed=0, remove_dc=True)
    assert np.abs(raw.mean(axis=1)).max() > 0.1
    np.testing.assert_allclose(centred.mean(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(centred, raw - raw.mean(axis=1, keepdims=True))


def test_image_smaller_than_the_patch_names_patch_size(stack):
    with pytest.raises(ValueError, match=r"dataset\.patch_size=26.*image 1 of shape \(25, 25\)"):
        extract_patches(stack, 26, 10, seed=0)
    with pytest.raises(ValueError, match=r"dataset\.n_patches"):
        extract_patches([np.zeros((8, 8))], 4, 26, seed=0)  # only 25 positions


# ------------------------------------------------------------------------------------------- builtin


def test_builtin_images_load_offline_as_grey_floats(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    images._builtin_raw.cache_clear()
    images._whitened_builtin.cache_clear()
    try:
        loaded = builtin_images()
    except pytest.skip.Exception as error:  # skimage turns a failed download into a skip under pytest
        pytest.fail(f"a builtin image is not stored in the scikit-image wheel: {error}")
    assert len(loaded) == len(BUILTIN_IMAGES) >= 6
    for image in loaded:
        assert image.ndim == 2 and image.dtype == np.float64 and min(image.shape) >= 256
        assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05
    data = make_image_patches(patch_size=8, n_patches=500, held_out=20, seed=0)
    assert isinstance(data, Dataset) and data.name == "image_patches"
    assert data.x.shape == (500, 64) and data.image_shape == (8, 8)
    assert data.info["held_out"].shape == (20, 64)
    assert data.info["images"] == list(BUILTIN_IMAGES) and data.info["whitened"] is True
    assert data.x.var() == pytest.approx(0.1, rel=0.3)  # patches of images whitened to variance 0.1


def test_builtin_whitening_is_cached_and_read_only():
    first = images._whitened_builtin()
    assert images._whitened_builtin() is first
    assert all(not image.flags.writeable for image in first)
    for image in first:
        assert image.var() == pytest.approx(0.1, rel=1e-9) and abs(image.mean()) < 1e-9
    fresh = builtin_images()
    fresh[0][:] = 0  # callers get copies: the cache is untouched
    assert images._builtin_raw()[0].std() > 0


def test_builtin_unwhitened_patches_come_from_the_raw_images():
    data = make_image_patches(patch_size=5, n_patches=50, whiten_images=False, seed=3)
    _, positions = extract_patches(builtin_images(), 5, 50, seed=3, return_positions=True)
    raw = builtin_images()
    for patch, (i, r, c) in zip(data.x, positions):
        np.testing.assert_array_equal(patch.reshape(5, 5), raw[i][r : r + 5, c : c + 5])


def test_builtin_images_can_be_chosen_by_name():
    chosen = ["grass", "rocket"]
    data = make_image_patches(patch_size=5, n_patches=50, whiten_images=False, seed=3, images=chosen)
    raw = {name: image for name, image in zip(BUILTIN_IMAGES, builtin_images())}
    _, positions = extract_patches([raw[name] for name in chosen], 5, 50, seed=3, return_positions=True)
    for patch, (i, r, c) in zip(data.x, positions):
        np.testing.assert_array_equal(patch.reshape(5, 5), raw[chosen[i]][r : r + 5, c : c + 5])
    assert data.info["images"] == chosen
    for wrong in (["camera", "lena"], [], ["grass", "grass"]):
        with pytest.raises(ConfigError, match=r"dataset\.images must name distinct bundled photographs among \["):
            make_image_patches(patch_size=5, n_patches=10, images=wrong)
    with pytest.raises(ConfigError, match=r"dataset\.images .* needs dataset\.source=builtin, not mat"):
        make_image_patches(source="mat", path="x.mat", images=["camera"])


def test_held_out_patches_are_separate_from_the_training_patches():
    data = make_image_patches(patch_size=6, n_patches=400, held_out=100, seed=4)
    everything = extract_patches(images._whitened_builtin(), 6, 500, seed=4)
    np.testing.assert_array_equal(data.x, everything[:400])
    np.testing.assert_array_equal(data.info["held_out"], everything[400:])
    train_rows = {row.tobytes() for row in data.x}
    assert not any(row.tobytes() in train_rows for row in data.info["held_out"])
    assert make_image_patches(patch_size=6, n_patches=10, seed=4).info["held_out"] is None


# -------------------------------------------------------------------------------------------- loaders


@pytest.fixture
def cube():
    return np.random.default_rng(7).random((64, 64, 3))  # MATLAB layout: rows × cols × images


def test_mat_loader_reads_images_along_the_given_axis(tmp_path, cube):
    path = tmp_path / "IMAGES.mat"
    scipy.io.savemat(path, {"IMAGES": cube, "other": np.ones(3)})
    loaded = load_mat_images(path)
    assert len(loaded) == 3
    for i, image in enumerate(loaded):
        np.testing.assert_array_equal(image, cube[:, :, i])
    scipy.io.savemat(path, {"IMAGES": np.moveaxis(cube, -1, 0)})
    for i, image in enumerate(load_mat_images(path, axis=0)):
        np.testing.assert_array_equal(image, cube[:, :, i])


def test_mat_v73_hdf5_file_is_read_in_matlab_axis_order(tmp_path, cube):
    path = tmp_path / "IMAGES73.mat"
    with h5py.File(path, "w") as f:
        f["IMAGES"] = cube.T  # what MATLAB's -v7.3 writes: column-major, seen transposed by HDF5
    for i, image in enumerate(load_mat_images(path)):
        np.testing.assert_array_equal(image, cube[:, :, i])


def test_mat_source_patches_come_from_the_file_unwhitened(tmp_path, cube):
    path = tmp_path / "IMAGES.mat"
    scipy.io.savemat(path, {"IMAGES": cube})
    data = make_image_patches(source="mat", path=str(path), patch_size=8, n_patches=100, whiten_images=False, seed=1)
    _, positions = extract_patches([cube[:, :, i] for i in range(3)], 8, 100, seed=1, return_positions=True)
    for patch, (i, r, c) in zip(data.x, positions):
        np.testing.assert_array_equal(patch.reshape(8, 8), cube[r : r + 8, c : c + 8, i])
    assert data.info["key"] == "IMAGES" and data.info["images"] == ["IMAGES[0]", "IMAGES[1]", "IMAGES[2]"]
    whitened = make_image_patches(source="mat", path=str(path), patch_size=8, n_patches=100, seed=1)
    white = [whiten(cube[:, :, i]) for i in range(3)]
    for patch, (i, r, c) in zip(whitened.x, positions):
        np.testing.assert_allclose(patch.reshape(8, 8), white[i][r : r + 8, c : c + 8], atol=1e-12)


def test_folder_loader_reads_grey_and_rgb_images_and_skips_other_files(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    rgb = rng.integers(0, 256, (30, 36, 3), dtype=np.uint8)
    skimage.io.imsave(tmp_path / "a.png", grey, check_contrast=False)
    skimage.io.imsave(tmp_path / "b.png", rgb, check_contrast=False)
    (tmp_path / "notes.txt").write_text("not an image")
    loaded = load_folder_images(tmp_path)
    assert [im.shape for im in loaded] == [(40, 50), (30, 36)]
    np.testing.assert_allclose(loaded[0], grey / 255.0)
    expected = (0.2125 * rgb[..., 0] + 0.7154 * rgb[..., 1] + 0.0721 * rgb[..., 2]) / 255.0  # rgb2gray weights
    np.testing.assert_allclose(loaded[1], expected, atol=1e-12)
    assert len(load_folder_images(tmp_path, pattern="b*")) == 1
    data = make_image_patches(source="folder", path=str(tmp_path), patch_size=10, n_patches=30, seed=0)
    assert data.x.shape == (30, 100) and data.info["images"] == ["a.png", "b.png"]
    with pytest.raises(ValueError, match=r"dataset\.pattern='\*\.jpg' matched no image files"):
        load_folder_images(tmp_path, pattern="*.jpg")
    with pytest.raises(ValueError, match="matched no image files.*other types"):
        load_folder_images(tmp_path, pattern="*.txt")


def test_vanhateren_loader_reads_big_endian_uint16(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 60000, (12, 20)).astype(np.uint16) for _ in range(2)]
    for i, picture in enumerate(pictures):
        picture.astype(">u2").tofile(tmp_path / f"imk0000{i}.iml")
    loaded = load_vanhateren(tmp_path, shape=(12, 20))
    assert len(loaded) == 2
    for image, picture in zip(loaded, pictures):
        assert image.dtype == np.float64
        np.testing.assert_array_equal(image, picture.astype(np.float64))
    with pytest.raises(ValueError, match=r"imk00000\.iml holds 480 bytes.*24×20.*holds 960 bytes"):
        load_vanhateren(tmp_path / "imk00000.iml", shape=(24, 20))
    with pytest.raises(ValueError, match=r"imk00000\.iml holds 480 bytes.*1024×1536"):
        load_vanhateren(tmp_path)  # the real shape does not fit the tiny files
    monkeypatch.setattr(images, "VANHATEREN_SHAPE", (12, 20))
    data = make_image_patches(source="vanhateren", path=str(tmp_path), patch_size=4, n_patches=40, seed=0)
    assert data.x.shape == (40, 16) and data.info["images"] == ["imk00000.iml", "imk00001.iml"]
    assert data.x.var() == pytest.approx(0.1, rel=0.5)  # whitened by default


# --------------------------------------------------------------------------------------------- errors


def test_missing_file_or_folder_names_the_path(tmp_path):
    for source in ("mat", "folder", "vanhateren"):
        with pytest.raises(FileNotFoundError, match=r"dataset\.path=.*nowhere.*no such file"):
            make_image_patches(source=source, path=str(tmp_path / "nowhere"), n_patches=10)
    with pytest.raises(ValueError, match=r"dataset\.path must name"):
        make_image_patches(source="mat", path=None)


def test_wrong_mat_key_lists_the_available_keys(tmp_path, cube):
    path = tmp_path / "IMAGES.mat"
    scipy.io.savemat(path, {"IMAGESW": cube, "labels": np.arange(3)})
    with pytest.raises(KeyError, match=r"dataset\.key='IMAGES' not found.*available keys: \['IMAGESW', 'labels'\]"):
        make_image_patches(source="mat", path=str(path), n_patches=10)


def test_npy_source_reads_one_image_or_a_stack_along_the_given_axis(tmp_path, cube):
    """``source=npy``: a 2-D array is one image, a 3-D one a stack with the images along ``image_axis``."""
    np.save(tmp_path / "one.npy", cube[..., 0])
    np.save(tmp_path / "stack.npy", cube)
    assert len(images.load_npy_images(tmp_path / "one.npy")) == 1
    stack = images.load_npy_images(tmp_path / "stack.npy", axis=-1)
    assert len(stack) == cube.shape[-1]
    np.testing.assert_array_equal(stack[1], cube[..., 1])
    data = make_image_patches(
        source="npy", path=str(tmp_path / "stack.npy"), patch_size=4, n_patches=30, whiten_images=False, seed=2
    )
    reference = extract_patches(list(np.moveaxis(cube, -1, 0)), 4, 30, 2)
    np.testing.assert_array_equal(data.x, reference)
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match=r"expected a real 2-D image or a 3-D stack of images"):
        images.load_npy_images(tmp_path / "bad.npy")


def test_unknown_source_lists_the_allowed_values():
    allowed = r"\['builtin', 'mat', 'npy', 'folder', 'vanhateren'\]"
    with pytest.raises(ValueError, match=rf"dataset\.source must be one of {allowed}, got 'olshausen'"):
        make_image_patches(source="olshausen")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"patch_size": 0}, r"dataset\.patch_size must be an integer >= 1, got 0"),
        ({"n_patches": 0}, r"dataset\.n_patches must be an integer >= 1, got 0"),
        ({"held_out": -1}, r"dataset\.held_out must be an integer >= 0, got -1"),
        ({"patch_size": 8.5}, r"dataset\.patch_size must be an integer"),
        ({"whiten_images": "false"}, r"dataset\.whiten_images must be true or false"),
        ({"path": "IMAGES.mat"}, r"dataset\.path='IMAGES\.mat' is set but dataset\.source=builtin"),
        ({"patch_size": 600, "n_patches": 1}, r"dataset\.patch_size=600 is larger than image"),
    ],
)
def test_bad_settings_name_their_config_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_image_patches(**kwargs)


# ---------------------------------------------------------------------------------------------- config


def test_config_lists_every_argument_with_the_function_defaults():
    cfg = sparse_elbo.compose(["dataset=image_patches", "dataset.n_patches=64", "dataset.patch_size=4", "seed=3"])
    defaults = {k: p.default for k, p in inspect.signature(make_image_patches).parameters.items()}
    node = {k: v for k, v in cfg.dataset.items() if k != "_target_"}
    assert set(node) == set(defaults)
    for name in set(defaults) - {"n_patches", "patch_size", "seed"}:
        assert node[name] == defaults[name], name
    data = instantiate(cfg.dataset)
    assert data.x.shape == (64, 16) and cfg.dataset.seed == 3
    np.testing.assert_array_equal(data.x, make_image_patches(patch_size=4, n_patches=64, seed=3).x)


# ------------------------------------------------------------------ files that are not what their name says


def _broken(*args, **kwargs):
    raise ZeroDivisionError("a bug in the reader")


def test_a_mat_file_that_is_not_one_is_a_one_line_user_error_but_a_bug_is_not_swallowed(tmp_path, cube, monkeypatch):
    text = tmp_path / "notes.mat"
    text.write_text("notes, not a MATLAB file\n" * 20)
    cut = tmp_path / "IMAGES73.mat"
    with h5py.File(cut, "w") as f:  # a v7.3 (HDF5) file cut short, as by a full disk
        f["IMAGES"] = np.random.default_rng(0).random((3, 256, 256))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    for path in (text, cut):
        with pytest.raises(
            ConfigError, match=rf"^dataset\.path='{re.escape(str(path))}': could not read the \.mat file \("
        ) as caught:
            load_mat_images(path)
        assert user_error_message(caught.value) == str(caught.value) and "\n" not in str(caught.value)
    scipy.io.savemat(tmp_path / "IMAGES.mat", {"IMAGES": cube})
    monkeypatch.setattr(scipy.io, "loadmat", _broken)
    with pytest.raises(ZeroDivisionError, match="a bug in the reader"):
        load_mat_images(tmp_path / "IMAGES.mat")


@pytest.mark.filterwarnings("ignore:The legacy `DICOM` plugin:DeprecationWarning")  # imageio trying its plugins
def test_an_image_file_that_is_not_an_image_is_a_one_line_user_error_but_a_bug_is_not_swallowed(tmp_path, monkeypatch):
    skimage.io.imsave(tmp_path / "a.png", np.zeros((20, 20), dtype=np.uint8), check_contrast=False)
    for name, content in (("notes.png", b"notes, not an image\n"), ("tiny.png", b"x"), ("notes.tif", b"notes")):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        (folder / name).write_bytes(content)
        with pytest.raises(ConfigError, match=rf"^dataset\.path='.*{re.escape(name)}': could not read the image \(") as caught:
            load_folder_images(folder)
        assert user_error_message(caught.value) == str(caught.value) and "\n" not in str(caught.value)
    monkeypatch.setattr(skimage.io, "imread", _broken)
    with pytest.raises(ZeroDivisionError, match="a bug in the reader"):
        load_folder_images(tmp_path / "a.png")


def test_a_npy_file_that_is_not_an_array_is_a_one_line_user_error_but_a_bug_is_not_swallowed(tmp_path, monkeypatch):
    path = tmp_path / "images.npy"
    path.write_text("notes, not an array\n")
    with pytest.raises(
        ConfigError, match=rf"^dataset\.path='{re.escape(str(path))}': could not read the file as a \.npy array \("
    ):
        images.load_npy_images(path)
    np.save(path, np.zeros((20, 20)))
    monkeypatch.setattr(np, "load", _broken)
    with pytest.raises(ZeroDivisionError, match="a bug in the reader"):
        images.load_npy_images(path)
