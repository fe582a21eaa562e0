"""One self-contained ``results.h5`` per run (docs/results.md), written as training goes and read back as numpy.

Layout::

    /             attrs: config (resolved YAML), overrides, versions, seed, device, dtype,
                         status = running | finished | failed | interrupted, reason, start/end times
    /metrics/<q>  resizable datasets, one row per evaluation, flushed after every row
    /snapshots/W  (S,D,H) with /snapshots/epoch (S,)
    /final/...    W, sigma2, lambda, elbo, posterior/...
    /data/...     W_true for data with ground truth
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from sparse_elbo.errors import ConfigError, ExistingFileError, MissingFileError, UnreadableFileError

STATUSES = ("running", "finished", "failed", "interrupted")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def require_new_results_file(path: str | Path) -> None:
    """A run never overwrites another run's results file."""
    if Path(path).exists():
        raise ExistingFileError(
            f"{path} already exists: a run never overwrites another; set hydra.run.dir (or the output directory) elsewhere"
        )


class ResultsWriter:
    """Creates a new results file (never overwrites one), or reopens one to resume, and appends to it
    as training goes. The file is opened for each write and closed again, so that at any moment outside
    a write (a few milliseconds per epoch) it is complete and consistent on disk: a run killed with
    SIGKILL leaves a readable file with every completed epoch, and other processes can read it while
    the run goes on."""

    def __init__(self, path: str | Path, attrs: dict | None = None, resume: bool = False):
        self.path = Path(path)
        if resume:
            if not self.path.is_file():
                raise MissingFileError(f"resume={str(path)!r}: no such results file")
            with self._open() as f:
                f.attrs["status"] = "running"
                f.attrs["resumed_time"] = _now()
            return
        require_new_results_file(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(self.path, "w-", locking=False) as f:  # fails if the file exists: no run overwrites another
            for key, value in (attrs or {}).items():
                f.attrs[key] = value if value is not None else ""
            f.attrs["status"] = "running"
            f.attrs["start_time"] = _now()
            for group in ("metrics", "snapshots", "final", "data"):
                f.require_group(group)

    def _open(self):
        # No HDF5 file lock: a reader in another process (a user watching the run, a summary script)
        # must never make the run's next write fail.
        return h5py.File(self.path, "a", locking=False)

    def append_epoch(self, row: dict, W=None) -> None:
        """Append one evaluation, and with it a snapshot of the dictionary W (D,H) when given, in one
        write: a run killed at any moment leaves metrics and snapshots that agree epoch for epoch.
        ``row`` holds scalars, or arrays such as λ (H,) stored as (E,H); it must contain ``epoch``."""
        with self._open() as f:
            for name, value in row.items():
                self._append(f["metrics"], name, _as_numpy(value))
            if W is not None:
                self._append(f["snapshots"], "W", _as_numpy(W))
                self._append(f["snapshots"], "epoch", np.asarray(row["epoch"], dtype=np.int64))

    @staticmethod
    def _append(group: h5py.Group, name: str, value: np.ndarray) -> None:
        if name not in group:
            group.create_dataset(name, shape=(0, *value.shape), maxshape=(None, *value.shape), dtype=value.dtype, chunks=True)
        dataset = group[name]
        dataset.resize(dataset.shape[0] + 1, axis=0)
        dataset[-1] = value

    def write_group(self, group: str, values: dict) -> None:
        """Write (or replace) arrays under ``/group``; nested dicts become subgroups."""
        with self._open() as f:
            self._write_group(f, group, values)

    def _write_group(self, f: h5py.File, group: str, values: dict) -> None:
        target = f.require_group(group)
        for name, value in values.items():
            if isinstance(value, dict):
                self._write_group(f, f"{group}/{name}", value)
                continue
            if name in target:
                del target[name]
            if isinstance(value, str):
                target.create_dataset(name, data=value, dtype=h5py.string_dtype())
            else:
                target.create_dataset(name, data=_as_numpy(value))

    def create_rows(self, group: str, arrays: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        """Make (or replace) the datasets ``/group/<name>`` of ``{name: (shape, dtype)}``, to be filled in blocks of
        rows by ``write_rows``."""
        with self._open() as f:
            target = f.require_group(group)
            for name, (shape, dtype) in arrays.items():
                if name in target:
                    del target[name]
                target.create_dataset(name, shape=shape, dtype=dtype)

    def write_rows(self, group: str, start: int, arrays: dict) -> None:
        """Write each of ``arrays`` (R, ...) into rows ``start .. start+R`` of ``/group/<name>``."""
        with self._open() as f:
            for name, value in arrays.items():
                value = _as_numpy(value)
                f[group][name][start : start + value.shape[0]] = value

    @property
    def checkpoint_path(self) -> Path:
        return checkpoint_path(self.path)

    def write_checkpoint(self, epoch: int, blob: bytes) -> None:
        """Atomically replace ``checkpoint.pt`` beside the results file (a serialised training state
        after a completed epoch) and record its epoch in the results file."""
        write_atomically(self.checkpoint_path, blob)
        self.set_attrs(checkpoint_epoch=epoch)

    def truncate_to_epoch(self, epoch: int) -> None:
        """Drop metric rows and snapshots after ``epoch`` (written after the last checkpoint)."""
        with self._open() as f:
            for group_name in ("metrics", "snapshots"):
                group = f[group_name]
                if "epoch" not in group:
                    continue
                keep = int((group["epoch"][()] <= epoch).sum())
                for dataset in group.values():
                    dataset.resize(keep, axis=0)

    def set_attrs(self, **attrs) -> None:
        with self._open() as f:
            for key, value in attrs.items():
                f.attrs[key] = value

    def close(self, status: str, reason: str = "") -> None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        self.set_attrs(status=status, reason=reason, end_time=_now())


class ShardWriter:
    """The writer of a data-parallel run's rank other than 0 (docs/scaling.md): rank 0 writes the results
    file; this rank writes only its shard of each checkpoint, ``checkpoint.rank<r>.pt`` beside it (before rank 0
    records the checkpoint's epoch). Every other write is rank 0's and a no-op here."""

    def __init__(self, path: str | Path, rank: int):
        self.path, self.rank = Path(path), int(rank)

    def write_checkpoint(self, epoch: int, blob: bytes) -> None:
        write_atomically(checkpoint_path(self.path, self.rank), blob)

    def write_group(self, *args, **kwargs) -> None: ...

    def create_rows(self, *args, **kwargs) -> None: ...

    def write_rows(self, *args, **kwargs) -> None: ...

    def append_epoch(self, *args, **kwargs) -> None: ...

    def truncate_to_epoch(self, epoch: int) -> None: ...

    def set_attrs(self, **attrs) -> None: ...

    def close(self, status: str, reason: str = "") -> None: ...


def write_atomically(file: Path, blob: bytes) -> None:
    """Replace ``file`` by ``blob`` at once (a temporary file, synced, renamed over it)."""
    temporary = file.with_suffix(".pt.tmp")
    with open(temporary, "wb") as handle:
        handle.write(blob)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, file)


def checkpoint_path(results_path: str | Path, rank: int = 0) -> Path:
    """``checkpoint.pt`` beside the results file; a data-parallel run's rank r > 0: ``checkpoint.rank<r>.pt``."""
    return Path(results_path).with_name("checkpoint.pt" if rank == 0 else f"checkpoint.rank{rank}.pt")


def read_checkpoint(path: str | Path, rank: int = 0) -> tuple[int, bytes]:
    """The last completed epoch and the serialised training state saved beside a results file (of
    ``rank``'s shard, for a data-parallel run)."""
    with h5py.File(path, "r") as f:
        epoch = f.attrs.get("checkpoint_epoch")
    file = checkpoint_path(path, rank)
    if epoch is None or not file.is_file():
        raise ConfigError(f"resume={str(path)!r}: no checkpoint beside this results file (no epoch completed)")
    return int(epoch), file.read_bytes()


@dataclass
class Results:
    """Everything in one results file as numpy arrays; config is the resolved config as a dict."""

    path: Path
    attrs: dict
    config: dict
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    snapshots: dict[str, np.ndarray] = field(default_factory=dict)
    final: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        return self.attrs.get("status", "")


def _read_group(group: h5py.Group) -> dict:
    out = {}
    for name, item in group.items():
        if isinstance(item, h5py.Group):
            out[name] = _read_group(item)
        else:
            value = item[()]
            out[name] = value.decode() if isinstance(value, bytes) else value
    return out


# A run rewrites its results file while it trains, and HDF5 has no consistent view of a file being written
# (without SWMR, which forbids the groups a run adds as it goes): a reader can meet half-written metadata and
# get h5py's OSError, RuntimeError ("addr overflow") or KeyError. Such a read is repeated after a pause.
READ_ATTEMPTS = 5
READ_PAUSE_S = 0.2  # seconds before the second attempt, doubled before each later one
HALF_WRITTEN = (OSError, RuntimeError, KeyError)


def read_results(path: str | Path) -> Results:
    """Read a results file (also one still being written, or left by a failed run). A missing path or a
    file that is not HDF5 is a user error naming the path; a read that fails READ_ATTEMPTS times (a file
    being written, or a damaged one) too."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{str(path)!r}: no such results file")
    if not h5py.is_hdf5(path):
        raise ConfigError(f"{str(path)!r}: not a results file (not HDF5)")
    for attempt in range(READ_ATTEMPTS):
        try:
            return _read_file(path)
        except HALF_WRITTEN as error:
            if attempt == READ_ATTEMPTS - 1:
                message = f"{str(path)!r}: could not read the results file ({error}); if a run is writing it, try again"
                raise UnreadableFileError(message) from error
            time.sleep(READ_PAUSE_S * 2**attempt)


def _read_file(path: Path) -> Results:
    import yaml

    with h5py.File(path, "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        config = yaml.safe_load(attrs.get("config", "")) or {}
        return Results(
            path=path,
            attrs=attrs,
            config=config,
            metrics=_read_group(f["metrics"]) if "metrics" in f else {},
            snapshots=_read_group(f["snapshots"]) if "snapshots" in f else {},
            final=_read_group(f["final"]) if "final" in f else {},
            data=_read_group(f["data"]) if "data" in f else {},
        )
