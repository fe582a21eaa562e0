"""Watching a run as it learns: the ``logger`` config group (``none``, ``csv``, ``tensorboard``, ``mlflow``).

After every epoch the runner hands the epoch's record — the numbers of its ``/metrics`` row (the full-data ELBO
and its terms, σ, λ's quantiles, Gini, localisation or recovery, the annealing weights, wall time), λ, and the
dictionary — to the chosen backend; at the end it closes the backend with the run's status. The results file
stays the record: a backend is a view of it, driven from a worker thread (``RunLogger``), so that a slow or
unreachable tracking server or a full disk never stops or slows training — its first failure is a warning
(``LoggerWarning``), after which that backend is left alone. A resumed run continues the same logged run: a
backend is opened with the first epoch the run trains, and records of later epochs logged before the
interruption are replaced, never duplicated.

A backend is a class with ``open(context)``, ``epoch(record)`` and ``close(status, last)``; one whose
library is an optional extra names it (``extra``) and checks it when built, before any compute.
"""

from __future__ import annotations

import csv
import importlib.util
import queue
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sparse_elbo.errors import MissingExtraError
from sparse_elbo.metrics import field_grid


class LoggerWarning(UserWarning):
    """A logging backend stopped (its server unreachable, its disk full, ...); training went on."""


@dataclass
class LogContext:
    """What a backend needs to open: the results file (its folder holds the backends' files), the resolved
    config, the command line's overrides, the sweep the run is a job of (its folder, or None), the first epoch
    this process trains (0 for a new run) and a field's image shape (None: square fields)."""

    results_path: Path
    config: dict
    overrides: list[str] = field(default_factory=list)
    group: str | None = None
    first_epoch: int = 0
    image_shape: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        """The run's name: its overrides, or its folder."""
        return ",".join(self.overrides) or self.results_path.parent.name


@dataclass
class EpochRecord:
    """One epoch: its scalars (``metrics``), λ (H,) and the dictionary W (D,H), on the host."""

    epoch: int
    metrics: dict[str, float]
    lam: np.ndarray
    W: np.ndarray

    def image(self, image_shape) -> np.ndarray:
        """The dictionary ordered by λ as a grey image in [0, 1] (``metrics.field_grid``)."""
        return field_grid(self.W, self.lam, image_shape)


def epoch_record(row: dict, W: np.ndarray) -> EpochRecord:
    """The record of a ``/metrics`` row: every scalar, σ, and λ's minimum, quartiles and maximum."""
    metrics, lam = {}, None
    for key, value in row.items():
        array = np.asarray(value.detach().cpu() if torch.is_tensor(value) else value, dtype=np.float64)
        if key == "lambda":
            lam = array
        elif array.ndim == 0 and key != "epoch":
            metrics[key] = float(array)
    metrics["sigma"] = float(np.sqrt(metrics["sigma2"]))
    for name, q in (("min", 0.0), ("q25", 0.25), ("median", 0.5), ("q75", 0.75), ("max", 1.0)):
        metrics[f"lambda_{name}"] = float(np.quantile(lam, q))
    return EpochRecord(int(row["epoch"]), metrics, lam, np.asarray(W, dtype=np.float64))


def require_extra(module: str, extra: str, logger: str) -> None:
    """A one-line user error, before any compute, when the backend's library is not installed."""
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(f'logger={logger} needs {module}, which is not installed: pip install "sparse_elbo[{extra}]"')


class NoLogger:
    """``logger=none``: the results file alone."""

    option, active = "none", False


class CSVLogger:
    """``logger=csv``: one row per epoch (its scalars, σ and λ's quantiles) in ``metrics.csv`` beside
    ``results.h5``."""

    option, active = "csv", True

    def open(self, context: LogContext) -> None:
        self.path = context.results_path.parent / "metrics.csv"
        kept = []
        if context.first_epoch > 0 and self.path.exists():  # a resumed run: the epochs before it, as logged
            with open(self.path, newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["epoch"]) < context.first_epoch]
        self.fields = list(kept[0]) if kept else None
        with open(self.path, "w", newline="") as handle:
            if kept:
                writer = csv.DictWriter(handle, self.fields)
                writer.writeheader()
                writer.writerows(kept)

    def epoch(self, record: EpochRecord) -> None:
        row = {"epoch": record.epoch, **record.metrics}
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, self.fields or list(row), extrasaction="ignore")
            if self.fields is None:
                self.fields = list(row)
                writer.writeheader()
            writer.writerow(row)

    def close(self, status: str, last: EpochRecord | None) -> None:
        pass


class RunLogger:
    """A backend driven from a worker thread (module docstring): ``open``, ``epoch`` and ``close`` only queue
    the work; the first exception of the backend is a ``LoggerWarning`` and the backend is not called again;
    ``close`` waits at most ``timeout_s`` seconds for the queued work."""

    def __init__(self, backend, name: str, timeout_s: float = 60.0):
        self.backend, self.name, self.timeout_s = backend, name, timeout_s
        self.failed = False
        self.work: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=f"logger-{name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.work.get()
            if item is None:
                return
            method, arguments = item
            if self.failed:
                continue
            try:
                getattr(self.backend, method)(*arguments)
            except Exception as error:  # the backend's failure must not stop training: said once, then left alone
                self.failed = True
                warnings.warn(
                    f"logger={self.name} stopped at {method} ({type(error).__name__}: {error}); training goes on, "
                    "results.h5 keeps every number",
                    LoggerWarning,
                    stacklevel=1,
                )

    def open(self, context: LogContext) -> None:
        self.work.put(("open", (context,)))

    def epoch(self, record: EpochRecord) -> None:
        self.work.put(("epoch", (record,)))

    def close(self, status: str, last: EpochRecord | None) -> None:
        self.work.put(("close", (status, last)))
        self.work.put(None)
        self.thread.join(self.timeout_s)
        if self.thread.is_alive():
            warnings.warn(
                f"logger={self.name} did not finish within {self.timeout_s:.0f} s; left behind", LoggerWarning, stacklevel=2
            )
