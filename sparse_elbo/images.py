"""Natural-image patches (docs/design.md §9): whitening, image loaders and random patch extraction.

The authors train on Olshausen's ``IMAGES.mat`` (ten whitened 512×512 photographs, 16×16 patches,
N = 204,800).  That file cannot be downloaded here, so the embedded default (``source="builtin"``)
whitens the natural photographs that ship inside the scikit-image wheel the same way Olshausen did.
A user's own ``IMAGES.mat`` (``source="mat"``), a folder of image files (``source="folder"``) or van
Hateren ``.iml`` files (``source="vanhateren"``) load through the same ``make_image_patches``.

Every loader returns a list of 2-D float64 images (they may differ in size).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from sparse_elbo.data import HDF5_UNREADABLE, Dataset, load_npy, mat_unreadable, reading, validate_data
from sparse_elbo.errors import ConfigError, ConfigKeyError, MissingFileError

SOURCES = ("builtin", "mat", "npy", "folder", "vanhateren")

# Natural photographs stored inside the scikit-image wheel: each loads offline (no pooch download).
# Left out: synthetic or diagrammatic images (checkerboard, logo, text, page, phantom, ...), microscopy
# and astronomy (immunohistochemistry, cells, moon, hubble), and the man-made regular brick texture.
BUILTIN_IMAGES = ("camera", "astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "grass", "gravel")

# File types read by ``load_folder_images`` (through ``skimage.io.imread``).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".pgm", ".ppm", ".pnm", ".webp")
# What ``skimage.io.imread`` (imageio, with Pillow and tifffile) raises for a file that is not an image of its
# type, or is cut short: OSError (no plugin can read it, Pillow's UnidentifiedImageError, "image file is
# truncated"), ValueError (tifffile's TiffFileError), struct.error (a file of a few bytes), and Pillow's
# SyntaxError and EOFError for a broken file. Anything else is a bug.
IMAGE_UNREADABLE = (OSError, ValueError, struct.error, SyntaxError, EOFError)

# van Hateren & van der Schaaf (1998) natural images: 1536 wide × 1024 high, big-endian uint16.
VANHATEREN_SHAPE = (1024, 1536)


# --------------------------------------------------------------------------------------------- whitening


def whiten(image: np.ndarray, f0_fraction: float = 0.4, target_variance: float = 0.1) -> np.ndarray:
    """Olshausen & Field's zero-phase whitening of one 2-D image.

        X̂(k)  = FFT2(image)(k)
        R(f)  = f · exp(-(f / f0)^4),     f = |k| in cycles per image,   f0 = f0_fraction · size
        out   = Re IFFT2(X̂ · R),   then   out ← (out - mean(out)) · sqrt(target_variance / var(out))

    ``f·`` flattens the ~1/f amplitude spectrum of natural images; ``exp(-(f/f0)^4)`` rolls off the
    highest frequencies (noise, aliasing, the rectangular sampling lattice).  ``R`` is real and
    symmetric, so the filter is zero-phase: edges stay where they are.

    ``size`` is the image's smaller side, and ``f`` is measured isotropically in cycles per that side:
    ``f = size · sqrt(u² + v²)`` with ``u, v`` the FFT frequencies in cycles per pixel along each axis.
    For Olshausen's square 512×512 images this is exactly his filter (``f0 = 0.4·512`` cycles per
    image).  For non-square images it keeps the filter circular in physical frequency (``f0 =
    f0_fraction`` cycles per pixel whatever the shape), so it does not favour one orientation, as a
    filter built from each axis' own cycles-per-image would.

    image (R, C) real -> (R, C) float64 with mean 0 and variance ``target_variance``.
    """
    image = np.asarray(image)
    if image.ndim != 2 or min(image.shape) < 2:
        raise ConfigError(f"whiten needs a 2-D image of at least 2×2 pixels, got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
        raise ConfigError(f"whiten needs a real numeric image, got dtype {image.dtype}")
    if not np.isfinite(image).all():
        raise ConfigError("whiten: the image holds NaN/Inf values")
    if not f0_fraction > 0:
        raise ConfigError(f"f0_fraction must be > 0, got {f0_fraction}")
    if not target_variance > 0:
        raise ConfigError(f"target_variance must be > 0, got {target_variance}")
    rows, cols = image.shape
    size = min(rows, cols)
    u = np.fft.fftfreq(rows)[:, None]  # (R, 1) cycles per pixel, vertical
    v = np.fft.rfftfreq(cols)[None, :]  # (1, C//2+1) cycles per pixel, horizontal
    f = size * np.hypot(u, v)  # (R, C//2+1) cycles per image (smaller side)
    f0 = f0_fraction * size
    R = f * np.exp(-((f / f0) ** 4))  # zero-phase filter; R(0) = 0 removes the mean
    out = np.fft.irfft2(np.fft.rfft2(image.astype(np.float64)) * R, s=image.shape)
    out -= out.mean()
    variance = out.var()
    if not variance > 0:
        raise ConfigError("whiten: the image is constant (nothing is left after whitening)")
    out *= np.sqrt(target_variance / variance)
    return out


# ------------------------------------------------------------------------------------------------ loaders


def to_grey_float(image: np.ndarray, origin: str) -> np.ndarray:
    """Grey float64 (R, C) from a grey, grey+alpha, RGB or RGBA array; integer pixels are scaled to [0, 1]."""
    from skimage.color import rgb2gray, rgba2rgb
    from skimage.util import img_as_float64

    a = np.asarray(image)
    if a.dtype == bool:
        a = a.astype(np.float64)
    if a.ndim == 3 and a.shape[-1] == 4:
        a = rgba2rgb(a)
    if a.ndim == 3 and a.shape[-1] == 3:
        a = rgb2gray(a)
    elif a.ndim == 3 and a.shape[-1] == 2:  # grey + alpha
        a = a[..., 0]
    if a.ndim != 2:
        raise ConfigError(f"{origin}: expected a grey or RGB(A) image, got an array of shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise ConfigError(f"{origin}: image must be real numeric, got dtype {a.dtype}")
    a = img_as_float64(a) if np.issubdtype(a.dtype, np.integer) else a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ConfigError(f"{origin}: image holds NaN/Inf values")
    return a


@functools.lru_cache(maxsize=1)
def _builtin_raw() -> tuple[np.ndarray, ...]:
    import skimage.data

    loaders = {name: getattr(skimage.data, name, None) for name in BUILTIN_IMAGES}
    loaders["motorcycle_left"] = lambda: skimage.data.stereo_motorcycle()[0]
    images = []
    for name in BUILTIN_IMAGES:
        image = to_grey_float(loaders[name](), f"skimage.data.{name}")
        image.setflags(write=False)  # shared by the cache
        images.append(image)
    return tuple(images)


def photograph(name: str, downsample: int = 2) -> np.ndarray:
    """A photograph of ``skimage.data`` (e.g. ``camera``, ``astronaut``) as grey float64 in [0, 1], averaged
    down ``downsample``× in each direction (the denoising and inpainting benchmarks' images)."""
    import skimage.data

    loader = getattr(skimage.data, name, None)
    if loader is None or not callable(loader):
        raise ConfigError(f"image {name!r} is not a photograph of skimage.data")
    image = to_grey_float(loader(), f"skimage.data.{name}")
    if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 1:
        raise ConfigError(f"downsample must be an integer >= 1, got {downsample!r}")
    k = downsample
    rows, cols = (s // k * k for s in image.shape)
    return image[:rows, :cols].reshape(rows // k, k, cols // k, k).mean(axis=(1, 3))


def builtin_images() -> list[np.ndarray]:
    """The grey natural photographs in the scikit-image wheel, in ``BUILTIN_IMAGES`` order, float64 in [0, 1].

    No network access: every one is stored inside the wheel.  Returns fresh (writable) copies.
    """
    return [image.copy() for image in _builtin_raw()]


@functools.lru_cache(maxsize=4)
def _whitened_builtin(f0_fraction: float = 0.4, target_variance: float = 0.1) -> tuple[np.ndarray, ...]:
    out = []
    for image in _builtin_raw():
        white = whiten(image, f0_fraction, target_variance)
        white.setflags(write=False)  # shared by the cache
        out.append(white)
    return tuple(out)


def _require_path(path, what: str) -> Path:
    if path is None or str(path) == "":
        raise ConfigError(f"dataset.path must name {what}")
    file = Path(str(path)).expanduser()
    if not file.exists():
        raise MissingFileError(f"dataset.path={str(path)!r}: no such file or folder")
    return file


def _match_files(path, pattern: str, suffixes: tuple[str, ...] | None, what: str) -> list[Path]:
    """``path`` itself when it is a file; else the files in folder ``path`` matching ``pattern``, sorted."""
    root = _require_path(path, f"a file or a folder of {what}")
    if root.is_file():
        return [root]
    if not pattern:
        raise ConfigError(f"dataset.pattern must be a glob pattern such as '*', got {pattern!r}")
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    kept = [p for p in files if suffixes is None or p.suffix.lower() in suffixes]
    if not kept:
        skipped = f" ({len(files)} matched files had other types; allowed: {list(suffixes)})" if files else ""
        raise ConfigError(f"dataset.pattern={pattern!r} matched no {what} in dataset.path={str(path)!r}{skipped}")
    return kept


def load_mat_images(path, key: str = "IMAGES", axis: int = -1) -> list[np.ndarray]:
    """Images stacked in one MATLAB variable, e.g. Olshausen's ``IMAGES.mat`` (``IMAGES``: 512×512×10).

    ``axis`` is the axis that indexes the images (MATLAB's layout: the last).  A 2-D variable is one image.
    MATLAB v7.3 files (HDF5) are read with h5py, transposed back to MATLAB's axis order.
    Values are returned unscaled (Olshausen's file is already whitened, variance ≈ 0.1).
    """
    file = _require_path(path, "a .mat file")
    if not file.is_file():
        raise ConfigError(f"dataset.path={str(path)!r} is a folder; dataset.source=mat needs a .mat file")
    import h5py

    if h5py.is_hdf5(file):
        with reading(path, "dataset.path", HDF5_UNREADABLE, "the .mat file"):
            with h5py.File(file, "r") as f:
                names = [n for n, obj in f.items() if isinstance(obj, h5py.Dataset) and not n.startswith("#")]
                array = f[key][()].T if key in names else None  # h5py sees MATLAB arrays transposed
    else:
        import scipy.io

        with reading(path, "dataset.path", mat_unreadable(), "the .mat file"):
            variables = scipy.io.loadmat(file)
        variables = {k: v for k, v in variables.items() if not k.startswith("__")}
        names = list(variables)
        array = variables.get(key)
    if key not in names:
        raise ConfigKeyError(f"dataset.key={key!r} not found in {file}; available keys: {sorted(names)}")
    array = np.asarray(array)
    origin = f"dataset.path={str(path)!r}, dataset.key={key!r}"
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ConfigError(f"{origin}: images must be a real numeric array, got dtype {array.dtype}")
    if array.ndim == 2:
        stack = array[None]
    elif array.ndim == 3:
        if not -3 <= int(axis) <= 2:
            raise ConfigError(f"dataset.image_axis={axis} is out of range for an array of shape {array.shape}")
        stack = np.moveaxis(array, int(axis), 0)
    else:
        raise ConfigError(f"{origin}: expected a 2-D image or a 3-D stack of images, got shape {array.shape}")
    stack = stack.astype(np.float64)
    if not np.isfinite(stack).all():
        raise ConfigError(f"{origin}: images hold NaN/Inf values")
    return list(stack)


def load_folder_images(path, pattern: str = "*") -> list[np.ndarray]:
    """Every image file (``IMAGE_SUFFIXES``) in folder ``path`` matching ``pattern``, in sorted name order,
    read with ``skimage.io.imread`` and converted to grey float64 (integer pixels scaled to [0, 1]).
    ``path`` may also name a single image file."""
    import skimage.io

    images = []
    for file in _match_files(path, pattern, IMAGE_SUFFIXES, "image files"):
        with reading(file, "dataset.path", IMAGE_UNREADABLE, "the image"):
            raw = skimage.io.imread(file)
        images.append(to_grey_float(raw, f"dataset.path: image {file}"))
    return images


def load_vanhateren(path, pattern: str = "*.iml", shape: tuple[int, int] = VANHATEREN_SHAPE) -> list[np.ndarray]:
    """van Hateren natural images: raw big-endian uint16, ``shape = (rows, cols) = (1024, 1536)``, no header.

    ``path`` is a folder (files matching ``pattern``, sorted) or one file.  Pixel values are returned as
    float64 raw intensities (not scaled).  The calibrated ``.imc`` files share the format (``pattern='*.imc'``).
    """
    rows, cols = (int(s) for s in shape)
    expected = rows * cols * 2
    images = []
    for file in _match_files(path, pattern, None, "van Hateren files"):
        size = file.stat().st_size
        if size != expected:
            raise ConfigError(
                f"dataset.path: {file} holds {size} bytes; a van Hateren image of {rows}×{cols} big-endian "
                f"uint16 pixels holds {expected} bytes"
            )
        images.append(np.fromfile(file, dtype=">u2").reshape(rows, cols).astype(np.float64))
    return images


# --------------------------------------------------------------------------------------------- patches


def _check_int(value, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ConfigError(f"dataset.{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def extract_patches(
    images,
    patch_size: int,
    n_patches: int,
    seed: int | np.random.Generator,
    remove_dc: bool = False,
    return_positions: bool = False,
):
    """``n_patches`` square patches at random positions, uniform over every valid position in every image.

    Positions are drawn without replacement (no patch appears twice; a larger image gives proportionally
    more patches), so ``n_patches`` may not exceed the number of positions.  ``remove_dc`` subtracts each
    patch's mean.  images: a list of 2-D arrays or an (I, R, C) stack.
    -> patches (n_patches, patch_size²) float64, rows in raster order of the patch;
       with ``return_positions`` also positions (n_patches, 3) int: image index, top row, left column.
    """
    images = [np.asarray(image) for image in images]
    positions = patch_positions(images, patch_size, n_patches, seed)
    patches = cut_patches(images, positions, int(patch_size), remove_dc)
    return (patches, positions) if return_positions else patches


def patch_positions(images: list[np.ndarray], patch_size: int, n_patches: int, seed: int | np.random.Generator) -> np.ndarray:
    """The positions ``extract_patches`` draws (its docstring)  ->  (n_patches, 3) int: image index, top row,
    left column."""
    p = _check_int(patch_size, "patch_size", 1)
    n = _check_int(n_patches, "n_patches", 1)
    if not images:
        raise ConfigError("dataset: no images to cut patches from")
    for i, image in enumerate(images):
        if image.ndim != 2:
            raise ConfigError(f"dataset: image {i} must be 2-D, got shape {image.shape}")
        if min(image.shape) < p:
            raise ConfigError(f"dataset.patch_size={p} is larger than image {i} of shape {image.shape}")
    counts = np.array([(r - p + 1) * (c - p + 1) for r, c in (im.shape for im in images)], dtype=np.int64)
    total = int(counts.sum())
    if n > total:
        raise ConfigError(
            f"dataset.n_patches (+ dataset.held_out) = {n} exceeds the {total} distinct {p}×{p} patch positions "
            f"in the {len(images)} images"
        )
    rng = np.random.default_rng(seed)
    flat = rng.choice(total, size=n, replace=False)  # (n,) uniform over all positions, random order
    starts = np.concatenate([[0], np.cumsum(counts)])
    which = np.searchsorted(starts, flat, side="right") - 1  # (n,) image index
    widths = np.array([im.shape[1] - p + 1 for im in images])[which]
    top, left = np.divmod(flat - starts[which], widths)
    return np.stack([which, top, left], axis=1)


def cut_patches(images: list[np.ndarray], positions: np.ndarray, p: int, remove_dc: bool = False) -> np.ndarray:
    """The ``p×p`` patches at ``positions`` (n, 3) of ``images``, each its mean removed with ``remove_dc``
    ->  (n, p²) float64, rows in raster order of the patch."""
    which, top, left = positions.T
    patches = np.empty((len(positions), p, p))
    for i, image in enumerate(images):
        rows = np.nonzero(which == i)[0]
        if rows.size:
            windows = sliding_window_view(image, (p, p))  # (R-p+1, C-p+1, p, p) view
            patches[rows] = windows[top[rows], left[rows]]
    patches = patches.reshape(len(positions), p * p)
    if remove_dc:
        patches -= patches.mean(axis=1, keepdims=True)
    return patches


def load_npy_images(path, axis: int = -1) -> list[np.ndarray]:
    """Images from a ``.npy`` file: one 2-D image (R, C), or a 3-D stack with the images along ``axis``."""
    file = _require_path(path, "a .npy file")
    array = load_npy(file, "dataset.path")
    origin = f"dataset.path={str(path)!r}"
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array) or array.ndim not in (2, 3):
        raise ConfigError(
            f"{origin}: expected a real 2-D image or a 3-D stack of images, got dtype {array.dtype}, shape {array.shape}"
        )
    if array.ndim == 3 and not -3 <= int(axis) <= 2:
        raise ConfigError(f"dataset.image_axis={axis} is out of range for an array of shape {array.shape}")
    stack = array[None] if array.ndim == 2 else np.moveaxis(array, int(axis), 0)
    if not np.isfinite(stack).all():
        raise ConfigError(f"{origin}: images hold NaN/Inf values")
    return list(stack.astype(np.float64))


def _mat_source(path, key, axis, pattern):
    images = load_mat_images(path, key=key, axis=axis)
    return images, [f"{key}[{i}]" for i in range(len(images))], {"key": key}


def _npy_source(path, key, axis, pattern):
    images = load_npy_images(path, axis=axis)
    return images, [f"image[{i}]" for i in range(len(images))], {}


def _folder_source(path, key, axis, pattern):
    pattern = pattern or "*"
    names = [f.name for f in _match_files(path, pattern, IMAGE_SUFFIXES, "files")]
    return load_folder_images(path, pattern), names, {"pattern": pattern}


def _vanhateren_source(path, key, axis, pattern):
    pattern = pattern or "*.iml"
    names = [f.name for f in _match_files(path, pattern, None, "files")]
    return load_vanhateren(path, pattern, shape=VANHATEREN_SHAPE), names, {"pattern": pattern}


# source -> loader(path, key, axis, pattern) -> (images, names, info)
_FILE_SOURCES = {"mat": _mat_source, "npy": _npy_source, "folder": _folder_source, "vanhateren": _vanhateren_source}


def _builtin_source(path, images, whiten_images: bool):
    if path is not None and str(path) != "":
        raise ConfigError(
            f"dataset.path={str(path)!r} is set but dataset.source=builtin uses no files; "
            f"set dataset.source to one of {list(SOURCES[1:])}"
        )
    chosen = _builtin_choice(images)
    pool = _whitened_builtin() if whiten_images else _builtin_raw()
    return [pool[i] for i in chosen], [BUILTIN_IMAGES[i] for i in chosen], {}


def _file_source(source: str, path, key, axis, pattern, whiten_images: bool, images):
    if images is not None:
        raise ConfigError(f"dataset.images chooses among the bundled photographs; it needs dataset.source=builtin, not {source}")
    if path is None or str(path) == "":
        raise ConfigError(f"dataset.path must name the images to read with dataset.source={source}")
    pictures, names, info = _FILE_SOURCES[source](path, key=key, axis=axis, pattern=pattern)
    info["path"] = str(Path(str(path)).expanduser().resolve())
    return (_whiten_all(pictures, names) if whiten_images else pictures), names, info


def _builtin_choice(images) -> list[int]:
    """The indices in ``BUILTIN_IMAGES`` of the photographs ``dataset.images`` names (all when None)."""
    if images is None:
        return list(range(len(BUILTIN_IMAGES)))
    names = [images] if isinstance(images, str) else list(images)
    unknown = [name for name in names if name not in BUILTIN_IMAGES]
    if unknown or not names or len(set(names)) < len(names):
        raise ConfigError(f"dataset.images must name distinct bundled photographs among {list(BUILTIN_IMAGES)}, got {names}")
    return [BUILTIN_IMAGES.index(name) for name in names]


def _whiten_all(images: list[np.ndarray], names: list[str]) -> list[np.ndarray]:
    white = []
    for name, image in zip(names, images):
        try:
            white.append(whiten(image))
        except ValueError as error:
            raise ConfigError(f"dataset.path: image {name}: {error}") from error
    return white


@dataclass
class PatchPlan:
    """What ``make_image_patches`` cuts, before cutting: the (whitened) images, the drawn positions (training
    patches first, then the held-out ones), and the data set's ``info``; ``cut(rows)`` cuts a block of them."""

    images: list[np.ndarray]
    positions: np.ndarray  # (n_patches + held_out, 3): image index, top row, left column
    n_patches: int
    patch_size: int
    remove_dc: bool
    info: dict

    def cut(self, rows: slice) -> np.ndarray:
        """The patches at ``positions[rows]``  ->  (R, p²) float64, checked finite."""
        patches = cut_patches(self.images, self.positions[rows], self.patch_size, self.remove_dc)
        return validate_data(patches, "dataset=image_patches")


def plan_image_patches(
    source: str = "builtin",
    path: str | None = None,
    key: str = "IMAGES",
    image_axis: int = -1,
    pattern: str | None = None,
    patch_size: int = 16,
    n_patches: int = 204800,
    held_out: int = 0,
    whiten_images: bool = True,
    remove_dc: bool = False,
    seed: int = 0,
    images: list[str] | None = None,
) -> PatchPlan:
    """The images and the drawn positions of ``make_image_patches``, nothing cut yet (``python -m
    sparse_elbo.patches`` cuts them block by block).

    source: ``builtin`` (the scikit-image photographs ``BUILTIN_IMAGES``, or the ones ``images`` names;
    needs no path), ``mat`` (``path``
    to a .mat file, variable ``key``, images along ``image_axis``), ``npy`` (``path`` to a .npy file with one
    image, or a stack with the images along ``image_axis``), ``folder`` (image files in ``path``
    matching ``pattern``, default ``*``) or ``vanhateren`` (``.iml`` files in ``path`` matching ``pattern``,
    default ``*.iml``).
    whiten_images: apply ``whiten`` (f0 = 0.4·size, variance 0.1) to every image before cutting patches.
    Set it to false for Olshausen's ``IMAGES.mat``, which is already whitened: whitening twice multiplies
    the spectrum by ``f²`` and leaves mostly high-frequency noise.
    held_out: extra patches at positions distinct from every training patch, returned in
    ``info["held_out"]`` as ``(held_out, p²)`` (None when 0).  They are drawn with the training patches
    (``n_patches + held_out`` distinct positions, then split), so they may overlap training patches
    partially (shifted by a few pixels) but never coincide with one.
    """
    if source not in SOURCES:
        raise ConfigError(f"dataset.source must be one of {list(SOURCES)}, got {source!r}")
    p = _check_int(patch_size, "patch_size", 1)
    n = _check_int(n_patches, "n_patches", 1)
    n_held = _check_int(held_out, "held_out", 0)
    for name, flag in (("whiten_images", whiten_images), ("remove_dc", remove_dc)):
        if not isinstance(flag, (bool, np.bool_)):
            raise ConfigError(f"dataset.{name} must be true or false, got {flag!r}")
    if source == "builtin":
        pictures, names, info = _builtin_source(path, images, whiten_images)
    else:
        pictures, names, info = _file_source(source, path, key, image_axis, pattern, whiten_images, images)
    pictures = [np.asarray(picture) for picture in pictures]
    positions = patch_positions(pictures, p, n + n_held, seed)
    info.update(
        source=source,
        positions=positions[:n],  # (n, 3): image index, top row, left column
        images=names,
        image_shapes=[tuple(int(s) for s in image.shape) for image in pictures],
        whitened=bool(whiten_images),
        remove_dc=bool(remove_dc),
    )
    return PatchPlan(pictures, positions, n, p, bool(remove_dc), info)


# its settings (``__wrapped__``: what configs and checks read, so ``inspect.signature`` shows plan's return type too)
@functools.wraps(plan_image_patches, assigned=())
def make_image_patches(*args, **settings) -> Dataset:
    """Random ``p×p`` patches of (whitened) natural images -> ``Dataset`` with ``x (n_patches, p²)`` and
    ``info["held_out"]`` ``(held_out, p²)`` (None when 0); the settings are ``plan_image_patches``'s."""
    plan = plan_image_patches(*args, **settings)
    n, p = plan.n_patches, plan.patch_size
    patches = plan.cut(slice(None))  # (n + held_out, p²)
    info = {**plan.info, "held_out": patches[n:].copy() if len(patches) > n else None}
    return Dataset(name="image_patches", x=patches[:n], image_shape=(p, p), info=info)
