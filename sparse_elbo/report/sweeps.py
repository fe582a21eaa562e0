"""Read a sweep back (docs/results.md): every ``results.h5`` under a directory, grouped by its stored config.

Runs are grouped by the resolved config stored in each file, never by directory names. Two runs are in
the same group when their configs agree on every key except the seed (``seed`` and every key named
``seed`` below it, such as ``dataset.seed``, which follow the run seed) and ``resume``. A group's label
is the set of keys that differ between the groups of the sweep (``posterior=DiagonalPosterior``,
``objective.n_samples=10``, ...), so that a table shows what was swept and nothing else.

    from sparse_elbo.report.sweeps import load_runs, group_runs, summary_rows
    runs = load_runs("outputs/paper/bars_recovery")
    for group in group_runs(runs): print(group.name, len(group.finished), len(group.failed))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sparse_elbo.errors import ConfigError, MissingFileError, UnreadableFileError
from sparse_elbo.results import Results, read_results

IGNORED_KEYS = ("resume",)  # never part of a run's setting
MISSING = "—"  # label value of a key that a group's config does not have


@dataclass
class Run:
    """One results file: its status (finished | failed | interrupted | running | unreadable)."""

    path: Path
    status: str
    reason: str = ""
    results: Results | None = None

    @property
    def config(self) -> dict:
        return {} if self.results is None else self.results.config

    @property
    def finished(self) -> bool:
        return self.status == "finished"


def find_results(root: str | Path) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    # natural order: job 2 before job 10
    return sorted(root.rglob("results.h5"), key=lambda p: [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in p.parts])


# What read_results raises for a file that is not a results file or cannot be read (a truncated or foreign
# file, one that vanished since the folder was listed, a config attribute that is not YAML). Anything else
# is a bug and propagates.
UNREADABLE = (ConfigError, MissingFileError, UnreadableFileError, yaml.YAMLError)


def load_run(path: str | Path) -> Run:
    """Read one file; a file that is not a results file or cannot be read is a run with status ``unreadable``
    and the reason (it must not stop a summary of the others)."""
    path = Path(path)
    try:
        return _run(path, read_results(path))
    except UNREADABLE as error:
        return Run(path=path, status="unreadable", reason=f"{type(error).__name__}: {error}")


def _run(path: Path, results: Results) -> Run:
    if not isinstance(results.config, dict):
        raise ConfigError(f"{str(path)!r}: not a results file (its config attribute is not a mapping)")
    return Run(path=path, status=results.status or "unknown", reason=str(results.attrs.get("reason", "")), results=results)


def load_runs(root: str | Path) -> list[Run]:
    return [load_run(p) for p in find_results(root)]


def sweep_path(root: str | Path) -> Path:
    """The folder or results file a tool was given (its DIR): a missing one is a user error."""
    root = Path(root)
    if not root.exists():
        raise MissingFileError(f"{str(root)!r}: no such folder or results file")
    return root


def load_sweep(root: str | Path) -> list[Run]:
    """The runs a tool reports on: every results file under the folder ``root``, or the one file ``root``.
    A missing path, a folder without any results file, and a single file that is not a results file are
    user errors (one line naming the path); in a folder, a file that cannot be read is a run with status
    ``unreadable``, listed with the others."""
    root = sweep_path(root)
    if root.is_file():
        return [_run(root, read_results(root))]  # the user named this file: one that is not a results file is their error
    runs = load_runs(root)
    if not runs:
        raise MissingFileError(f"{str(root)!r}: no results files (results.h5) in this folder or below it")
    return runs


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become tuples (hashable)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list):
            out[name] = tuple(_hashable(v) for v in value)
        else:
            out[name] = value
    return out


def _hashable(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in flatten(value).items()))
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


def setting(config: dict) -> dict[str, Any]:
    """The flattened config without the seed keys: what identifies a configuration across seeds."""
    return {k: v for k, v in flatten(config).items() if k.rsplit(".", 1)[-1] != "seed" and k not in IGNORED_KEYS}


def short_value(key: str, value: Any) -> str:
    """``sparse_elbo.posteriors.DiagonalPosterior`` -> ``DiagonalPosterior``; floats compactly."""
    if value is MISSING:
        return MISSING
    if key.endswith("_target_") and isinstance(value, str):
        return value.rsplit(".", 1)[-1]
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def short_key(key: str) -> str:
    """``posterior._target_`` -> ``posterior``; ``model.prior._target_`` -> ``model.prior``."""
    return key[: -len("._target_")] if key.endswith("._target_") else key


@dataclass
class Group:
    """Runs with the same setting. ``label``: the swept keys (short names) and their values."""

    setting: dict[str, Any]
    label: dict[str, str] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)

    @property
    def name(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.label.items() if v != MISSING) or "all runs"

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.finished]

    @property
    def failed(self) -> list[Run]:
        return [r for r in self.runs if not r.finished]

    def value(self, key: str, default=None):
        return self.setting.get(key, default)


def group_runs(runs: list[Run]) -> list[Group]:
    """Group readable runs by setting (order: first appearance); label each by the keys that vary."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        if run.results is None:
            continue
        s = setting(run.config)
        key = tuple(sorted((k, repr(v)) for k, v in s.items()))
        groups.setdefault(key, Group(setting=s)).runs.append(run)
    out = list(groups.values())
    keys = sorted({k for g in out for k in g.setting})
    varying = [k for k in keys if len({repr(g.setting.get(k, MISSING)) for g in out}) > 1]
    varying = _drop_implied(varying, out)
    for g in out:
        g.label = {short_key(k): short_value(k, g.setting.get(k, MISSING)) for k in varying}
    return out


def _drop_implied(varying: list[str], groups: list[Group]) -> list[str]:
    """Leave out keys whose values are fixed by another varying ``_target_`` key of the same group path
    (e.g. ``posterior.init_std`` differing only because ``posterior._target_`` does), keeping labels short.
    A key stays when two groups with the same ``_target_`` differ in it."""
    targets = [k for k in varying if k.endswith("._target_")]
    keep = []
    for k in varying:
        parent = next((t for t in targets if k != t and k.startswith(t[: -len("_target_")])), None)
        if parent is not None:
            by_target: dict[str, set] = {}
            for g in groups:
                by_target.setdefault(repr(g.setting.get(parent, MISSING)), set()).add(repr(g.setting.get(k, MISSING)))
            if all(len(v) == 1 for v in by_target.values()):
                continue
        keep.append(k)
    return keep


def _scalar(value) -> float | None:
    if value is None:
        return None
    try:
        x = float(np.asarray(value).reshape(()))
    except (TypeError, ValueError):
        return None
    return x


# name -> (description, how it is shown: "float" (4 digits) | "short" (1 digit) | "rate" (with k/n))
QUANTITIES: dict[str, tuple[str, str]] = {
    "elbo": ("final full-data ELBO (nats / data point)", "float"),
    "elbo_minus_ground_truth": ("final ELBO − ground-truth ELBO", "float"),
    "recovered": ("all bars recovered (rate)", "rate"),
    "min_matched_cosine": ("min matched |cosine| (bars)", "float"),
    "sigma": ("σ", "float"),
    "gini": ("final Gini of |z|", "float"),
    "localisation_median": ("median localisation (patches; random ≈ 0.99)", "float"),
    "held_out_log_px": ("held-out log p(x) (importance sampled)", "float"),
    "amortization_gap": ("amortisation gap (nats)", "float"),
    "epochs": ("epochs", "short"),
    "train_time": ("training time (s)", "short"),
}


def run_quantities(results: Results) -> dict[str, float]:
    """The headline numbers of one finished run (only those it has)."""
    final, metrics = results.final, results.metrics
    out: dict[str, float | None] = {
        "elbo": _scalar(final.get("elbo")),
        "recovered": _scalar(final.get("recovered")),
        "min_matched_cosine": _scalar(final.get("min_matched_cosine")),
        "train_time": _scalar(final.get("train_time")),
        "epochs": _scalar(final.get("epochs")),
        "held_out_log_px": _scalar(final.get("held_out_log_px")),
        "amortization_gap": _scalar(final.get("amortization_gap")),
    }
    gt = _scalar(final.get("ground_truth_elbo"))
    if gt is not None and out["elbo"] is not None:
        out["elbo_minus_ground_truth"] = out["elbo"] - gt
    sigma2 = _scalar(final.get("sigma2"))
    if sigma2 is not None:
        out["sigma"] = math.sqrt(sigma2)
    if "gini_mean" in metrics and len(metrics["gini_mean"]):
        out["gini"] = float(np.asarray(metrics["gini_mean"])[-1])
    if "localisation" in final and "W_true" not in results.data:  # patches only (bars have ground truth)
        out["localisation_median"] = float(np.median(final["localisation"]))
    return {k: v for k, v in out.items() if v is not None and np.isfinite(v)}


@dataclass
class Statistic:
    mean: float
    std: float
    count: int

    def text(self, kind: str = "float") -> str:
        if kind == "rate":
            return f"{self.mean:.2f} ({round(self.mean * self.count)}/{self.count})"
        digits = 1 if kind == "short" else 4 if abs(self.mean) < 100 else 2
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}" if self.count > 1 else f"{self.mean:.{digits}f}"


def statistics(group: Group) -> dict[str, Statistic]:
    """Mean, standard deviation (ddof=1; 0 for one run) and count of each quantity over finished runs."""
    values: dict[str, list[float]] = {}
    for run in group.finished:
        for k, v in run_quantities(run.results).items():
            values.setdefault(k, []).append(v)
    return {k: Statistic(float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) for k, v in values.items()}


def summary_rows(groups: list[Group]) -> tuple[list[str], list[dict]]:
    """One row per group: label columns, counts, ``<q>_mean``, ``<q>_std``, ``<q>_n`` for each quantity."""
    stats = [statistics(g) for g in groups]
    present = [q for q in QUANTITIES if any(q in s for s in stats)]
    label_columns = list(groups[0].label) if groups else []
    columns = [*label_columns, "n_finished", "n_failed"]
    for q in present:
        columns += [f"{q}_mean", f"{q}_std", f"{q}_n"]
    rows = []
    for g, s in zip(groups, stats):
        row = {**g.label, "n_finished": len(g.finished), "n_failed": len(g.failed)}
        for q in present:
            st = s.get(q)
            row[f"{q}_mean"] = "" if st is None else st.mean
            row[f"{q}_std"] = "" if st is None else st.std
            row[f"{q}_n"] = 0 if st is None else st.count
        rows.append(row)
    return columns, rows


def markdown_table(groups: list[Group]) -> str:
    """The summary as a Markdown table: mean ± std over finished runs, counts."""
    stats = [statistics(g) for g in groups]
    present = [q for q in QUANTITIES if any(q in s for s in stats)]
    label_columns = list(groups[0].label) if groups else []
    header = [*label_columns, "finished", "failed", *(QUANTITIES[q][0] for q in present)]
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in header) + " |", "|" + "---|" * len(header)]
    for g, s in zip(groups, stats):
        cells = [*g.label.values(), str(len(g.finished)), str(len(g.failed))]
        cells += [s[q].text(QUANTITIES[q][1]) if q in s else "" for q in present]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def not_finished(runs: list[Run]) -> list[Run]:
    """Runs that did not finish (failed, interrupted, still running or killed, unreadable)."""
    return [r for r in runs if not r.finished]


def relative(path: Path, root: str | Path | None) -> str:
    if root is None:
        return str(path)
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)
