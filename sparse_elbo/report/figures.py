"""Redraw the paper's figures from a sweep directory. Reads only results files (every ``results.h5``
under DIR, via ``sparse_elbo.results.read_results``) and groups runs by their stored config, the seed
aside (``sparse_elbo.report.sweeps``); writes PNG and PDF to DIR/figures (or --out). Which figures are drawn
depends on what the sweep holds:

- bars (runs with a generating dictionary): ``bars_fields`` (data examples, the generating bars, and
  each configuration's learned fields — its best-ELBO run — matched to the bars in order and sign) and
  ``recovery`` (recovery rate per configuration with k/n, ELBO − ground-truth ELBO and σ per run);
- every sweep: ``elbo`` (full-data ELBO per epoch and against training wall time, one thin line per
  run, the configuration's mean in bold), ``gini`` (Gini of |z| per epoch), and ``entropies`` (the
  three entropies of the entropy ELBO per epoch) where runs used the entropy objective;
- image patches: ``dictionary_<k>`` (each configuration's fields ordered by λ, largest first, from
  ``sparse_elbo.report.plot_run``) and ``annealing`` (ELBO, Gini and median localisation per epoch with
  annealed epochs shaded, and every field's final localisation per configuration).

    python -m sparse_elbo.report.figures outputs/paper/bars_recovery [--out DIR]

A DIR that does not exist, holds no results file or none that can be read, one file that is not a results
file, and an --out folder that does not exist are one-line errors (exit status 2).

Needs matplotlib, the optional extra ``figures``: ``pip install "sparse_elbo[figures]"``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
from pathlib import Path

import numpy as np

from sparse_elbo.cli import output_folder, report_user_errors
from sparse_elbo.errors import UnreadableFileError
from sparse_elbo.report.plot_run import field_shape, plot_dictionary, pyplot  # one run's dictionary ordered by λ
from sparse_elbo.report.sweeps import Group, group_runs, load_sweep, relative, sweep_path

STYLE = {"font.size": 9, "axes.titlesize": 10, "legend.fontsize": 7, "figure.dpi": 100}  # while drawing


def colour(k: int):
    return pyplot().get_cmap("tab10")(k % 10)


def best_run(group: Group):
    """The group's finished run with the highest final ELBO (None if none finished)."""
    finished = [r for r in group.finished if "elbo" in r.results.final]
    return max(finished, key=lambda r: float(r.results.final["elbo"]), default=None)


def is_bars(group: Group) -> bool:
    return any("W_true" in r.results.data for r in group.runs)


def is_patches(group: Group) -> bool:
    return not is_bars(group) and any("localisation_median" in r.results.metrics for r in group.runs)


def save(fig, out: Path, name: str, written: list[Path]) -> None:
    for suffix in ("png", "pdf"):
        fig.savefig(out / f"{name}.{suffix}", dpi=150, bbox_inches="tight")
    pyplot().close(fig)
    written.append(out / f"{name}.png")


def show_field(ax, field, title: str = "") -> None:
    limit = float(np.abs(field).max()) or 1.0
    ax.imshow(field, cmap="gray", vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=6)


def bars_examples(results, n: int) -> np.ndarray | None:
    """A few data points, regenerated from the stored dataset config (bars are seeded and cheap); None when
    this version cannot rebuild them: the config names a data builder, or arguments, that no longer exist."""
    node = results.config.get("dataset")
    target = node.get("_target_") if isinstance(node, dict) else None
    if not isinstance(target, str) or not target.startswith("sparse_elbo."):
        return None
    settings = {**{k: v for k, v in node.items() if not k.startswith("_")}, "n_data": n}
    module, _, name = target.rpartition(".")
    try:
        make = getattr(importlib.import_module(module), name)
        inspect.signature(make).bind(**settings)
    except (ImportError, AttributeError, TypeError):  # a results file of another version: no data row
        return None
    return np.asarray(make(**settings).x)


def figure_bars_fields(groups: list[Group]):
    shown = [(g, best_run(g)) for g in groups if is_bars(g)]
    shown = [(g, r) for g, r in shown if r is not None]
    if not shown:
        return None
    first = shown[0][1].results
    W_true = np.asarray(first.data["W_true"])
    rows_shape = field_shape(first)
    H = W_true.shape[1]
    examples = bars_examples(first, H)
    n_rows = 2 + len(shown)
    fig, axes = pyplot().subplots(n_rows, H, figsize=(0.75 * H + 2.6, 0.8 * n_rows + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    if examples is not None:
        for h in range(H):
            show_field(axes[0, h], examples[h].reshape(rows_shape))
    axes[0, 0].set_ylabel("data", rotation=0, ha="right", va="center")
    for h in range(H):
        show_field(axes[1, h], W_true[:, h].reshape(rows_shape))
    axes[1, 0].set_ylabel("generating\nbars", rotation=0, ha="right", va="center")
    for i, (g, run) in enumerate(shown, start=2):
        final = run.results.final
        W = np.asarray(final["W"])
        assignment = np.asarray(final.get("assignment", np.arange(H)))  # true bar j <-> learned field assignment[j]
        for j in range(min(H, W.shape[1])):
            h = int(assignment[j]) if j < len(assignment) else j
            sign = np.sign(W[:, h] @ W_true[:, j]) or 1.0
            cosines = np.asarray(final.get("matched_cosines", np.full(H, np.nan)))
            show_field(axes[i, j], sign * W[:, h].reshape(rows_shape), f"{cosines[j]:.2f}" if j < len(cosines) else "")
        label = g.name.replace(", ", "\n")
        axes[i, 0].set_ylabel(
            f"{label}\n(seed {run.results.config.get('seed')})", rotation=0, ha="right", va="center", fontsize=7
        )
    fig.suptitle(
        "bars: data, generating fields, and learned fields of each configuration's best run\n"
        "(matched to the bars by the Hungarian algorithm on |cosine|; titles: matched |cosine|)"
    )
    fig.tight_layout()
    return fig


def figure_recovery(groups: list[Group]):
    bars = [g for g in groups if is_bars(g) and g.finished]
    if not bars:
        return None
    fig, axes = pyplot().subplots(1, 3, figsize=(13, 0.35 * len(bars) + 2.8))
    names = [g.name for g in bars]
    y = np.arange(len(bars))
    rates, counts = [], []
    for g in bars:
        flags = [bool(r.results.final.get("recovered", False)) for r in g.finished]
        rates.append(np.mean(flags)), counts.append((sum(flags), len(flags)))
    axes[0].barh(y, rates, color=[colour(k) for k in range(len(bars))])
    for k, (rate, (hit, n)) in enumerate(zip(rates, counts)):
        axes[0].text(min(rate, 0.98), k, f" {hit}/{n}", va="center", ha="right" if rate > 0.8 else "left", fontsize=8)
    axes[0].set(xlim=(0, 1), xlabel="fraction of seeds recovering all bars", title="recovery rate")
    axes[0].set_yticks(y, names)
    rng = np.random.default_rng(0)
    for ax, key, title in (
        (axes[1], "elbo_minus_ground_truth", "final ELBO − ground-truth ELBO (nats)"),
        (axes[2], "sigma", "σ (generating σ = dataset.noise)"),
    ):
        for k, g in enumerate(bars):
            values = []
            for r in g.finished:
                final = r.results.final
                if key == "sigma":
                    values.append(math.sqrt(float(final["sigma2"])))
                elif "ground_truth_elbo" in final:
                    values.append(float(final["elbo"]) - float(final["ground_truth_elbo"]))
            if values:
                ax.scatter(values, k + rng.uniform(-0.15, 0.15, len(values)), s=14, color=colour(k), alpha=0.8)
                ax.plot([np.median(values)] * 2, [k - 0.3, k + 0.3], color="k", lw=1.5)
        ax.set_yticks(y, [""] * len(bars))
        ax.set(title=title)
        if key == "elbo_minus_ground_truth":
            ax.axvline(0, color="grey", lw=0.8, ls="--")
            ax.set_xscale("symlog", linthresh=0.1)
        else:
            noise = bars[0].value("dataset.noise")
            if noise is not None:
                ax.axvline(float(noise), color="grey", lw=0.8, ls="--")
    for ax in axes:
        ax.invert_yaxis()
    fig.suptitle("bars recovery per configuration (each dot a seed, bar = median)")
    fig.tight_layout()
    return fig


def _mean_curve(runs, key: str):
    """Mean of ``metrics[key]`` per epoch over the runs that reached that epoch."""
    curves = [np.asarray(r.results.metrics[key], dtype=float) for r in runs if key in r.results.metrics]
    if not curves:
        return None, None
    length = max(len(c) for c in curves)
    stacked = np.full((len(curves), length), np.nan)
    for i, c in enumerate(curves):
        stacked[i, : len(c)] = c
    epochs = np.arange(length)
    return epochs, np.nanmean(stacked, axis=0)


def _curves(ax, groups, key: str, x: str = "epoch", ylabel: str = "", symlog: bool = False) -> bool:
    drew = False
    for k, g in enumerate(groups):
        runs = [r for r in g.runs if r.results is not None and key in r.results.metrics]
        alpha = 0.35 if (x == "epoch" and len(runs) > 1) else 0.8
        for r in runs:
            m = r.results.metrics
            ax.plot(np.asarray(m[x]), np.asarray(m[key]), color=colour(k), lw=0.6 if x == "epoch" else 1.2, alpha=alpha)
            drew = True
        if x == "epoch" and runs:
            epochs, mean = _mean_curve(runs, key)
            first = int(np.asarray(runs[0].results.metrics["epoch"])[0]) if len(runs[0].results.metrics["epoch"]) else 0
            ax.plot(epochs + first, mean, color=colour(k), lw=2, label=f"{g.name} (n={len(runs)})")
        elif runs:
            ax.plot([], [], color=colour(k), lw=2, label=f"{g.name} (n={len(runs)})")
    ax.set(xlabel="training wall time (s)" if x == "wall_time" else "epoch", ylabel=ylabel)
    if symlog:
        ax.set_yscale("symlog")
    return drew


def _elbo_limits(ax, groups) -> None:
    """Zoom onto the ELBO's later values (the first epochs can be far below and flatten everything)."""
    finals = [
        float(r.results.metrics["elbo"][-1])
        for g in groups
        for r in g.runs
        if r.results is not None and len(r.results.metrics.get("elbo", []))
    ]
    if finals:
        top, bottom = max(finals), min(finals)
        spread = max(top - bottom, 0.05 * max(abs(top), 1.0))
        ax.set_ylim(bottom - 1.5 * spread, top + 0.25 * spread)


def figure_elbo(groups: list[Group]):
    fig, axes = pyplot().subplots(1, 3, figsize=(16, 4))
    if not _curves(axes[0], groups, "elbo", "epoch", "full-data ELBO (nats / data point)"):
        pyplot().close(fig)
        return None
    _curves(axes[1], groups, "elbo", "wall_time", "full-data ELBO (nats / data point)")
    _curves(axes[2], groups, "elbo", "wall_time", "full-data ELBO (nats / data point)")
    for ax in axes[:2]:
        _elbo_limits(ax, groups)
    finals = [
        float(r.results.metrics["elbo"][-1])
        for g in groups
        for r in g.runs
        if r.results is not None and len(r.results.metrics.get("elbo", []))
    ]
    top = max(finals)
    margin = 0.02 * max(abs(top), 10.0)
    axes[2].set_ylim(top - 5 * margin, top + margin)  # zoom onto the best runs' last improvements
    for ax in axes[1:]:
        ax.set_xscale("log")
    axes[0].set_title("ELBO per epoch (thin: runs, bold: mean)")
    axes[1].set_title("ELBO against training time (each run)")
    axes[2].set_title("zoom: the top of the ELBO")
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    return fig


def figure_entropies(groups: list[Group]):
    terms = ("posterior_entropy", "prior_entropy", "likelihood_entropy")
    entropy_groups = [
        g
        for g in groups
        if any(terms[0] in r.results.metrics and "prior_entropy" in r.results.metrics for r in g.runs if r.results)
    ]
    if not entropy_groups:
        return None
    fig, axes = pyplot().subplots(1, 3, figsize=(13, 3.6))
    for ax, term in zip(axes, terms):
        _curves(ax, entropy_groups, term, "epoch", "nats")
        ax.set_title(term.replace("_", " "))
    axes[0].legend()
    fig.suptitle("the entropy ELBO's three entropies: L_H = mean H[q] − H[prior] − H[likelihood]")
    fig.tight_layout()
    return fig


def figure_gini(groups: list[Group]):
    fig, ax = pyplot().subplots(figsize=(6.5, 4))
    if not _curves(ax, groups, "gini_mean", "epoch", "Gini coefficient of |z| (posterior samples)"):
        pyplot().close(fig)
        return None
    ax.set_title("sparseness per epoch (higher = sparser)")
    ax.legend()
    fig.tight_layout()
    return fig


def _shade_annealing(ax, runs) -> None:
    for r in runs:
        m = r.results.metrics
        if "weight_prior" in m and np.any(np.asarray(m["weight_prior"]) != 1):
            annealed = np.asarray(m["epoch"])[np.asarray(m["weight_prior"]) != 1]
            ax.axvspan(annealed.min() - 0.5, annealed.max() + 0.5, color="orange", alpha=0.08)
            return


def figure_annealing(groups: list[Group]):
    patches = [g for g in groups if is_patches(g)]
    if not patches:
        return None
    fig, axes = pyplot().subplots(1, 4, figsize=(16, 3.8))
    _curves(axes[0], patches, "elbo", "epoch", "full-data ELBO (nats / patch)")
    _elbo_limits(axes[0], patches)
    _curves(axes[1], patches, "gini_mean", "epoch", "Gini of |z|")
    _curves(axes[2], patches, "localisation_median", "epoch", "median localisation (random ≈ 0.99)")
    (
        axes[0].set_title("ELBO"),
        axes[1].set_title("sparseness"),
        axes[2].set_title("localisation of the fields (lower = more local)"),
    )
    for ax in axes[:3]:
        _shade_annealing(ax, [r for g in patches for r in g.runs if r.results is not None])
    values = []
    for g in patches:
        loc = [np.asarray(r.results.final["localisation"]) for r in g.finished if "localisation" in r.results.final]
        values.append(np.concatenate(loc) if loc else np.array([np.nan]))
    data = [v[np.isfinite(v)] if np.isfinite(v).any() else [0.0] for v in values]
    try:
        parts = axes[3].violinplot(data, showmedians=True, orientation="horizontal")  # matplotlib >= 3.10
    except TypeError:
        parts = axes[3].violinplot(data, showmedians=True, vert=False)
    for k, body in enumerate(parts["bodies"]):
        body.set_color(colour(k))
    axes[3].set_yticks(np.arange(1, len(patches) + 1), [f"{k + 1}" for k in range(len(patches))], fontsize=7)
    axes[3].set(xlabel="final localisation of every field", ylabel="configuration", title="fields at the end")
    # one legend under the panels: the configurations' names are too long to sit beside a panel
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, [f"{k + 1}: {label}" for k, label in enumerate(labels)], loc="lower center", fontsize=7, frameon=False)
    fig.suptitle("annealing comparison on image patches (shaded: annealed epochs)")
    fig.tight_layout(rect=(0, 0.045 * len(labels), 1, 1))
    return fig


def draw_all(root: Path, out: Path) -> list[Path]:
    """The figures of the runs under ``root`` (a sweep directory, or one results file), written to ``out``.
    A folder without results files, or none of whose results files can be read, is a user error."""
    runs = load_sweep(root)
    groups = group_runs(runs)
    if not groups:
        first = runs[0]
        raise UnreadableFileError(
            f"{str(root)!r}: none of its {len(runs)} results files could be read "
            f"({relative(first.path, root)}: {first.reason}); no figures"
        )
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with pyplot().rc_context(STYLE):
        _draw_groups(groups, out, written)
    return written


def _draw_groups(groups: list[Group], out: Path, written: list[Path]) -> None:
    for name, make in (
        ("bars_fields", figure_bars_fields),
        ("recovery", figure_recovery),
        ("elbo", figure_elbo),
        ("entropies", figure_entropies),
        ("gini", figure_gini),
        ("annealing", figure_annealing),
    ):
        fig = make(groups)
        if fig is not None:
            save(fig, out, name, written)
    for k, g in enumerate(g for g in groups if is_patches(g)):
        run = best_run(g)
        if run is None:
            continue
        fig = plot_dictionary(run.results)
        fig.suptitle(f"{g.name} (seed {run.results.config.get('seed')}): fields ordered by λ, largest first", fontsize=8)
        save(fig, out, f"dictionary_{k}", written)


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="a sweep directory (searched recursively for results.h5), or one results file")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="an existing folder; default: SWEEP/figures, created (beside the file for one results file)",
    )
    args = parser.parse_args(arguments)
    pyplot()  # matplotlib (an optional extra) before anything is read
    root = sweep_path(args.sweep)
    out = output_folder(args.out, "--out") if args.out is not None else (root.parent if root.is_file() else root) / "figures"
    for path in draw_all(root, out):
        print(path)


if __name__ == "__main__":
    report_user_errors(main)
