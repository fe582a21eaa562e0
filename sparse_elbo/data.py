"""Data sets (docs/design.md §9). Each builder returns a ``Dataset``: ``x (N,D)`` float64 numpy plus what is known
about how it was made. Data are validated here, before any compute.
"""

from __future__ import annotations

import contextlib
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sparse_elbo.errors import ConfigError, ConfigKeyError, MissingFileError, UserError, reason
from sparse_elbo.validation import require_one_of

SOURCES = ("laplace", "bernoulli")
FILE_SUFFIXES = (".npy", ".npz", ".h5", ".hdf5", ".mat")

# What each reader raises for a file that is not what its name says, or that is cut short or damaged;
# anything else is a bug and keeps its traceback.
NUMPY_UNREADABLE = (ValueError, EOFError, OSError)  # numpy's format checks (a truncated .npy), or no access
NPZ_UNREADABLE = (*NUMPY_UNREADABLE, zipfile.BadZipFile, zlib.error)  # a damaged zip archive
HDF5_UNREADABLE = (OSError, RuntimeError)  # h5py: no HDF5 signature, a truncated file, damaged metadata
# How a .npy file and a .npz archive (a zip file) start: without it numpy would speak of pickled data, or
# hand back an array for a .npz.
NPY_HEADER, ZIP_HEADER = b"\x93NUMPY", b"PK\x03\x04"


def mat_unreadable() -> tuple[type[BaseException], ...]:
    """What ``scipy.io.loadmat`` raises for a file that is not a MATLAB file, or is cut short or damaged
    (IndexError: a foreign file shorter than MATLAB's 128-byte header, as of scipy 1.17)."""
    from scipy.io.matlab import MatReadError

    return (MatReadError, ValueError, OSError, EOFError, IndexError, zlib.error)


@contextlib.contextmanager
def reading(path: Path, argument: str, unreadable: tuple[type[BaseException], ...], what: str = "the file"):
    """Reading a user's file: the library's ``unreadable`` exceptions become one-line user errors naming the
    ``argument`` the user set; anything else (a bug) propagates."""
    try:
        yield
    except UserError:
        raise
    except unreadable as error:
        raise ConfigError(f"{argument}={str(path)!r}: could not read {what} ({reason(error)})") from error


def require_header(path: str | Path, argument: str, header: bytes, what: str) -> None:
    """A file of a format that starts with ``header`` (a .npy array, a zip archive) must start with it."""
    with open(path, "rb") as handle:
        if handle.read(len(header)) != header:
            raise ConfigError(f"{argument}={str(path)!r}: could not read {what} (it does not start as one)")


def load_npy(path: str | Path, argument: str) -> np.ndarray:
    """The array in a user's .npy file; a file that is not one is a one-line user error naming ``argument``."""
    with reading(path, argument, NUMPY_UNREADABLE, "the file as a .npy array"):
        require_header(path, argument, NPY_HEADER, "the file as a .npy array")
        return np.load(path, allow_pickle=False)


@dataclass
class Dataset:
    """x (N,D); W_true (D,H) when the generator is known; sources (N,H) likewise;
    image_shape: how one data vector reshapes into an image (for figures), or None."""

    name: str
    x: np.ndarray
    W_true: np.ndarray | None = None
    sources: np.ndarray | None = None
    noise: float | None = None
    image_shape: tuple[int, int] | None = None
    info: dict = field(default_factory=dict)

    @property
    def n_data(self) -> int:
        return self.x.shape[0]

    @property
    def n_observed(self) -> int:
        return self.x.shape[1]


def validate_layout(x, origin: str) -> None:
    """Check what a data matrix's header says (read nothing else): numeric, rank 2, non-empty."""
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ConfigError(f"{origin}: data must be a real numeric array, got dtype {x.dtype}")
    if len(x.shape) != 2:
        raise ConfigError(f"{origin}: data must have shape (N, D) (rank 2), got shape {x.shape}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ConfigError(f"{origin}: data is empty, shape {x.shape}")


def validate_data(x: np.ndarray, origin: str) -> np.ndarray:
    """Check a data matrix: numeric, rank 2, non-empty, finite.  Returns float64 (N,D)."""
    x = np.asarray(x)
    validate_layout(x, origin)
    finite = np.isfinite(x)
    if not finite.all():
        rows = np.unique(np.nonzero(~finite)[0])
        raise ConfigError(f"{origin}: data holds {int((~finite).sum())} NaN/Inf values (first bad rows: {rows[:5].tolist()})")
    return x.astype(np.float64, copy=False)


def bars_dictionary(grid: int) -> np.ndarray:
    """The ``2g`` bars of a ``g×g`` image: g vertical then g horizontal, amplitude 1.  -> (g², 2g)"""
    W = np.zeros((grid, grid, 2 * grid))
    for i in range(grid):
        W[:, i, i] = 1.0  # vertical bar: column i
        W[i, :, grid + i] = 1.0  # horizontal bar: row i
    return W.reshape(grid * grid, 2 * grid)


def make_bars(
    grid: int = 5,
    n_data: int = 1000,
    sources: str = "laplace",
    noise: float = 0.1,
    bernoulli_probability: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """``x_n = W_bars z_n + σ_gen ε_n`` with ``z_nh ~ Laplace(0,1)`` or ``Bernoulli(π)``, ``ε ~ N(0, I)``."""
    if int(grid) < 2:
        raise ConfigError(f"dataset.grid must be >= 2, got {grid}")
    if int(n_data) < 1:
        raise ConfigError(f"dataset.n_data must be >= 1, got {n_data}")
    require_one_of("sources", sources, SOURCES)
    if not noise > 0:
        raise ConfigError(f"dataset.noise must be > 0, got {noise}")
    if not 0 < bernoulli_probability <= 1:
        raise ConfigError(f"dataset.bernoulli_probability must be in (0, 1], got {bernoulli_probability}")
    rng = np.random.default_rng(seed)
    W = bars_dictionary(int(grid))
    shape = (int(n_data), W.shape[1])
    if sources == "laplace":
        z = rng.laplace(0.0, 1.0, size=shape)
    else:
        z = (rng.random(shape) < bernoulli_probability).astype(np.float64)
    x = z @ W.T + noise * rng.standard_normal((int(n_data), W.shape[0]))
    return Dataset(
        name="bars",
        x=x,
        W_true=W,
        sources=z,
        noise=float(noise),
        image_shape=(int(grid), int(grid)),
        info={"sources": sources},
    )


def _read_array(path: Path, key: str | None, argument: str, key_argument: str) -> np.ndarray:
    import h5py

    suffix = path.suffix.lower()
    if suffix == ".npy":
        return load_npy(path, argument)
    if suffix == ".npz":
        with reading(path, argument, NPZ_UNREADABLE, "the file as a .npz archive"):
            require_header(path, argument, ZIP_HEADER, "the file as a .npz archive")
            with np.load(path, allow_pickle=False) as archive:
                arrays = dict(archive)
        return _pick(arrays, key, path, key_argument)
    if suffix in (".h5", ".hdf5") or h5py.is_hdf5(path):  # a MATLAB v7.3 .mat file is HDF5
        with reading(path, argument, HDF5_UNREADABLE, "the file as HDF5"):
            with h5py.File(path, "r") as f:
                names: list[str] = []
                f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
                names = [name for name in names if not name.startswith("#")]  # MATLAB's #refs#, #subsystem#
                array = f[_pick_name(names, key, path, key_argument)][()]
        return array.T if suffix == ".mat" else array  # h5py sees MATLAB's arrays transposed
    import scipy.io

    with reading(path, argument, mat_unreadable(), "the file as a MATLAB .mat file"):
        variables = scipy.io.loadmat(path)
    return _pick({k: v for k, v in variables.items() if not k.startswith("__")}, key, path, key_argument)


def _pick_name(names: list[str], key: str | None, path: Path, key_argument: str = "dataset.key") -> str:
    if key is not None:
        if key not in names:
            raise ConfigKeyError(f"{key_argument}={key!r} not found in {path}; available keys: {sorted(names)}")
        return key
    if len(names) != 1:
        raise ConfigKeyError(f"{path} holds {len(names)} arrays {sorted(names)}: set {key_argument} to one of them")
    return names[0]


def _pick(arrays: dict, key: str | None, path: Path, key_argument: str = "dataset.key") -> np.ndarray:
    return np.asarray(arrays[_pick_name(list(arrays), key, path, key_argument)])


class HDF5Rows:
    """Rows ``start:stop`` of a 2-D dataset ``name`` in an HDF5 file, read only when converted (``np.asarray``);
    a slice of rows is another ``HDF5Rows``. What a run holds of a ``.h5`` data set: each rank reads its shard."""

    def __init__(self, path: Path, name: str, start: int = 0, stop: int | None = None):
        import h5py

        with h5py.File(path, "r") as f:
            self.dtype, full, self.attrs = f[name].dtype, f[name].shape, dict(f[name].attrs)
        self.path, self.name, self.start = path, name, start
        self.stop = full[0] if stop is None else stop
        self.shape = (self.stop - self.start, *full[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows):
        if isinstance(rows, slice) and rows.step in (None, 1):
            start, stop, _ = rows.indices(len(self))
            return HDF5Rows(self.path, self.name, self.start + start, self.start + max(start, stop))
        return np.asarray(self)[rows]

    def __array__(self, dtype=None, copy=None):
        import h5py

        with h5py.File(self.path, "r") as f:
            rows = f[self.name][self.start : self.stop]
        return rows if dtype is None else rows.astype(dtype)

    def take(self, positions: np.ndarray) -> np.ndarray:
        """The rows at increasing ``positions`` (of these rows), read from the file alone."""
        import h5py

        with h5py.File(self.path, "r") as f:
            return f[self.name][self.start + positions]


class StreamedRows:
    """A rank's training rows left in their file (``dataset.stream=true``, docs/scaling.md): ``x[index]`` (a slice,
    or a tensor of positions) reads those rows and returns them as a tensor of the run's dtype on its device —
    what a trainer that works in minibatches and blocks asks of ``problem.x`` — so that a run holds one block
    of its data at a time. ``source``: a memory-mapped ``.npy`` or an ``HDF5Rows`` (the rank's shard); its
    values are checked in blocks when it is made, before any compute."""

    ndim = 2

    def __init__(self, source, dtype: torch.dtype, device: torch.device, origin: str, block_rows: int = 65536):
        self.source, self.dtype, self.device = source, dtype, torch.device(device)
        self.shape = torch.Size(source.shape)
        for start in range(0, len(source), block_rows):
            rows = slice(start, min(start + block_rows, len(source)))
            validate_data(np.asarray(source[rows]), f"{origin}, rows {start}–{rows.stop - 1}")

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        if not isinstance(index, slice):
            positions = torch.as_tensor(index).cpu().numpy()
            if len(positions) and positions[-1] - positions[0] == len(positions) - 1 and (np.diff(positions) == 1).all():
                index = slice(int(positions[0]), int(positions[-1]) + 1)  # consecutive rows: one read
        if isinstance(index, slice):
            rows = np.array(self.source[index])  # a copy: a memory-mapped file is read-only
        else:
            order = np.argsort(positions, kind="stable")
            rows = np.empty((len(positions), self.shape[1]), dtype=self.source.dtype)
            rows[order] = self._take(positions[order])
        return torch.from_numpy(rows).to(device=self.device, dtype=self.dtype)

    def _take(self, increasing: np.ndarray) -> np.ndarray:
        """Rows at ``increasing`` positions (repeats allowed: read once each)."""
        unique, inverse = np.unique(increasing, return_inverse=True)
        take = self.source.take if isinstance(self.source, HDF5Rows) else self.source.__getitem__
        return np.asarray(take(unique))[inverse]

    def new_zeros(self, *size) -> torch.Tensor:
        return torch.zeros(*size, dtype=self.dtype, device=self.device)

    def blocks(self, block_rows: int = 16384):
        """``(rows, x[rows])`` block after block: slices of at most ``block_rows`` rows and their data."""
        for start in range(0, len(self), block_rows):
            rows = slice(start, min(start + block_rows, len(self)))
            yield rows, self[rows]


def products(x, M: torch.Tensor) -> torch.Tensor:
    """``x M`` (N,k) of data ``x (N,D)`` and ``M (D,k)``: one product in memory, block by block for rows left in
    their file (``StreamedRows``)."""
    if torch.is_tensor(x):
        return x @ M
    return torch.cat([block @ M for _, block in x.blocks()])


def cross_products(x, Y: torch.Tensor) -> torch.Tensor:
    """``xᵀ Y`` (D,k) of data ``x (N,D)`` and per-point ``Y (N,k)``, likewise."""
    if torch.is_tensor(x):
        return x.T @ Y
    return sum(block.T @ Y[rows] for rows, block in x.blocks())


def squared_residual(x, codes: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_n ||x_n - W c_n||²`` and ``Σ_n ||x_n||²`` (scalars) of data ``x (N,D)``, codes ``c (N,H)``, ``W (D,H)``,
    likewise."""
    if torch.is_tensor(x):
        return (x - codes @ W.T).pow(2).sum(), x.pow(2).sum()
    return sum((block - codes[rows] @ W.T).pow(2).sum() for rows, block in x.blocks()), energy(x)


def energy(x) -> torch.Tensor:
    """``Σ_n ||x_n||²`` (scalar), likewise."""
    if torch.is_tensor(x):
        return x.pow(2).sum()
    return sum(block.pow(2).sum() for _, block in x.blocks())


def row_energies(x) -> torch.Tensor:
    """``||x_n||²`` (N,), likewise."""
    if torch.is_tensor(x):
        return x.pow(2).sum(-1)
    return torch.cat([block.pow(2).sum(-1) for _, block in x.blocks()])


def load_file(path: str, key: str | None = None, max_data: int | None = None, stream: bool = False) -> Dataset:
    """A user's ``(N, D)`` array (``dataset=file``) from ``.npy``, ``.npz``, ``.h5``/``.hdf5`` (dataset name) or
    ``.mat`` (variable; MATLAB v7.3 files too). A ``.npy`` file is memory-mapped and a ``.h5`` dataset read when
    sliced: only the header is checked here, and the values of the rows a run keeps when it takes them
    (``rows_of``: a rank of a data-parallel run reads its shard alone). ``stream``: the run reads its rows from
    the file as its trainer needs them (``StreamedRows``; ``.npy`` and ``.h5`` only)."""
    file, named = _data_path(path, "dataset.path")
    suffix = file.suffix.lower()
    if suffix == ".npy":
        with reading(file, "dataset.path", NUMPY_UNREADABLE, "the file as a .npy array"):
            require_header(file, "dataset.path", NPY_HEADER, "the file as a .npy array")
            x = np.load(file, mmap_mode="r", allow_pickle=False)
        validate_layout(x, named)
    elif suffix in (".h5", ".hdf5"):
        x = _hdf5_rows(file, key, named)
    else:
        x = read_data_file(path, key)
    if stream and not isinstance(x, (np.memmap, HDF5Rows)):
        raise ConfigError(f"dataset.stream=true reads rows from .npy and .h5/.hdf5 files, not from {file.suffix!r} ones")
    shape = getattr(x, "attrs", {}).get("image_shape")  # patches written by ``python -m sparse_elbo.patches``
    if shape is not None and int(np.prod(shape)) != x.shape[1]:
        raise ConfigError(f"{named}: its image_shape attribute {list(shape)} does not hold the {x.shape[1]} numbers of a row")
    if max_data is not None:
        x = x[: int(max_data)]
    info = {"path": str(file.resolve()), "key": key, "stream": bool(stream)}
    return Dataset(name="file", x=x, image_shape=None if shape is None else tuple(int(v) for v in shape), info=info)


def _hdf5_rows(file: Path, key: str | None, named: str) -> HDF5Rows:
    import h5py

    with reading(file, "dataset.path", HDF5_UNREADABLE, "the file as HDF5"):
        with h5py.File(file, "r") as f:
            names: list[str] = []
            f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        x = HDF5Rows(file, _pick_name(names, key, file))
    validate_layout(x, named)
    return x


def rows_of(x, rows: slice, origin: str) -> np.ndarray:
    """The rows ``rows`` of a data set's ``x``, in memory and validated (finite, float64): read from the file
    where ``x`` is a memory-mapped ``.npy`` or an ``HDF5Rows``; an array already in memory is only sliced."""
    part = x[rows]
    if isinstance(part, (np.memmap, HDF5Rows)):
        return validate_data(np.array(part, dtype=np.float64), f"{origin}, rows {rows.start}–{rows.stop - 1}")
    return part


def _data_path(path: str, argument: str) -> tuple[Path, str]:
    """The user's data file, checked to exist with a known suffix; and how errors name it."""
    if path is None or str(path) == "":
        raise ConfigError(f"{argument} must name a data file")
    named = f"{argument}={str(path)!r}"
    file = Path(str(path)).expanduser()
    if file.suffix.lower() not in FILE_SUFFIXES:
        raise ConfigError(f"{named}: unsupported file type {file.suffix!r}; allowed: {list(FILE_SUFFIXES)}")
    if not file.is_file():
        raise MissingFileError(f"{named}: no such file")
    if file.stat().st_size == 0:
        raise ConfigError(f"{named}: the file is empty")
    return file, named


def read_data_file(
    path: str, key: str | None = None, argument: str = "dataset.path", key_argument: str = "dataset.key"
) -> np.ndarray:
    """The validated ``(N, D)`` float64 array in a user's file, in memory. Every error is one line naming
    ``argument`` / ``key_argument``, the settings the user wrote (``dataset.path`` / ``dataset.key`` in a run,
    ``data`` / ``key`` for ``sparse_elbo.encode``)."""
    file, named = _data_path(path, argument)
    return validate_data(_read_array(file, key, argument, key_argument), named)


def split_held_out(dataset: Dataset, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Training and held-out data ``(x_train, x_held_out)``.

    The data set's own held-out points (``info["held_out"]``, e.g. ``dataset=image_patches
    dataset.held_out=M``) are used when it has them; otherwise ``evaluation.held_out_fraction`` of the data
    points, chosen at random with ``seed``, are held out (the training points keep their order; a file's data
    are then read whole). With neither, ``x_held_out`` is None.
    """
    if not 0 <= fraction < 1:
        raise ConfigError(f"evaluation.held_out_fraction must be in [0, 1), got {fraction}")
    own = dataset.info.get("held_out")
    if own is not None:
        if fraction > 0:
            raise ConfigError(
                "evaluation.held_out_fraction > 0 but the data set already holds out its own points "
                "(dataset.held_out): set one of them to 0"
            )
        return dataset.x, validate_data(own, "dataset held-out points")
    n_held = int(round(fraction * dataset.n_data))
    if n_held == 0:
        return dataset.x, None
    if n_held >= dataset.n_data:
        raise ConfigError(f"evaluation.held_out_fraction={fraction} leaves no training data (N={dataset.n_data})")
    held = np.zeros(dataset.n_data, dtype=bool)
    held[np.random.default_rng(seed).choice(dataset.n_data, size=n_held, replace=False)] = True
    x = rows_of(dataset.x, slice(0, dataset.n_data), f"dataset={dataset.name}")  # a file's rows: all of them, here
    return x[~held], x[held]
