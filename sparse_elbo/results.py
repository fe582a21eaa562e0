"""One self-contained ``results.h5`` per run (SPEC §9), written as training goes and read back as numpy.

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
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

STATUSES = ("running", "finished", "failed", "interrupted")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


class ResultsWriter:
    """Creates a new results file (never overwrites one) and appends to it as training goes."""

    def __init__(self, path: str | Path, attrs: dict):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = h5py.File(self.path, "w-")  # fails if the file exists: no run overwrites another
        for key, value in attrs.items():
            self.file.attrs[key] = value if value is not None else ""
        self.file.attrs["status"] = "running"
        self.file.attrs["start_time"] = _now()
        for group in ("metrics", "snapshots", "final", "data"):
            self.file.require_group(group)
        self.file.flush()

    def append_metrics(self, row: dict) -> None:
        """Append one evaluation: scalars, or arrays such as λ (H,) stored as (E,H)."""
        metrics = self.file["metrics"]
        for name, value in row.items():
            value = _as_numpy(value)
            if name not in metrics:
                metrics.create_dataset(
                    name, shape=(0, *value.shape), maxshape=(None, *value.shape), dtype=value.dtype, chunks=True
                )
            dataset = metrics[name]
            dataset.resize(dataset.shape[0] + 1, axis=0)
            dataset[-1] = value
        self.file.flush()

    def append_snapshot(self, epoch: int, W) -> None:
        W = _as_numpy(W)
        snapshots = self.file["snapshots"]
        if "W" not in snapshots:
            snapshots.create_dataset("W", shape=(0, *W.shape), maxshape=(None, *W.shape), dtype=W.dtype, chunks=True)
            snapshots.create_dataset("epoch", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=True)
        for name, value in (("W", W), ("epoch", epoch)):
            dataset = snapshots[name]
            dataset.resize(dataset.shape[0] + 1, axis=0)
            dataset[-1] = value
        self.file.flush()

    def write_group(self, group: str, values: dict) -> None:
        """Write (or replace) arrays under ``/group``; nested dicts become subgroups."""
        target = self.file.require_group(group)
        for name, value in values.items():
            if isinstance(value, dict):
                self.write_group(f"{group}/{name}", value)
                continue
            if name in target:
                del target[name]
            if isinstance(value, str):
                target.create_dataset(name, data=value, dtype=h5py.string_dtype())
            else:
                target.create_dataset(name, data=_as_numpy(value))
        self.file.flush()

    def set_attrs(self, **attrs) -> None:
        for key, value in attrs.items():
            self.file.attrs[key] = value
        self.file.flush()

    def close(self, status: str, reason: str = "") -> None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if not self.file.id.valid:
            return
        self.file.attrs["status"] = status
        self.file.attrs["reason"] = reason
        self.file.attrs["end_time"] = _now()
        self.file.close()


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


def read_results(path: str | Path) -> Results:
    """Read a results file (also one still being written, or left by a failed run)."""
    import yaml

    path = Path(path)
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
