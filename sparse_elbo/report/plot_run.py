"""Figures from one results file: the dictionary ordered by λ (largest first), the ELBO and its three
terms per epoch, and the Gini sparseness per epoch. Writes PNG and PDF next to the file (or to --out).

    python -m sparse_elbo.report.plot_run outputs/runs/<date>/<time>/results.h5 [--out DIR]

Needs matplotlib, the optional extra ``figures``: ``pip install "sparse_elbo[figures]"``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from sparse_elbo.cli import output_folder, report_user_errors
from sparse_elbo.errors import ConfigError, MissingExtraError
from sparse_elbo.results import read_results

INSTALL_FIGURES = 'pip install "sparse_elbo[figures]"'


def pyplot():
    """matplotlib's pyplot, drawing to files only (the Agg backend). matplotlib is an optional extra: without
    it, a user error that says how to install it. Imported on first use, so that the reporting reads runs
    without it; the figure tools and ``scripts/`` are the only places that import matplotlib."""
    try:
        import matplotlib
    except ImportError as error:
        raise MissingExtraError(f"the figures need matplotlib, which is not installed: {INSTALL_FIGURES}") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def field_shape(results) -> tuple[int, int]:
    if "image_shape" in results.data:
        rows, cols = (int(v) for v in results.data["image_shape"])
        return rows, cols
    side = int(round(math.sqrt(results.final["W"].shape[0])))
    return side, results.final["W"].shape[0] // side


def plot_dictionary(results, ax_grid_figure=None):
    """Fields ordered by λ (largest first), each scaled to its own max |w|, grey = 0."""
    W, lam = np.asarray(results.final["W"]), np.asarray(results.final["lambda"])
    rows, cols = field_shape(results)
    plt = pyplot()
    order = np.argsort(-lam)
    H = W.shape[1]
    n_cols = math.ceil(math.sqrt(H))
    n_rows = math.ceil(H / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.0 * n_cols, 1.0 * n_rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, h in enumerate(order):
        field = W[:, h].reshape(rows, cols)
        limit = np.abs(field).max() or 1.0
        ax = axes.ravel()[k]
        ax.imshow(field, cmap="gray", vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_title(f"λ={lam[h]:.2f}", fontsize=6)
    fig.suptitle("dictionary, ordered by λ (largest first)")
    fig.tight_layout()
    return fig


def plot_curves(results):
    m = results.metrics
    epochs = np.asarray(m["epoch"])
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot(epochs, m["elbo"], marker="o")
    axes[0].set(xlabel="epoch", ylabel="ELBO (nats / data point)", title="unweighted full-data ELBO")
    for name in ("posterior_entropy", "prior_entropy", "likelihood_entropy", "expected_log_likelihood", "expected_log_prior"):
        if name in m:
            axes[1].plot(epochs, m[name], marker=".", label=name.replace("_", " "))
    axes[1].set(xlabel="epoch", ylabel="nats", title="ELBO terms")
    axes[1].legend(fontsize=7)
    gini, spread = np.asarray(m["gini_mean"]), np.asarray(m["gini_std"])
    axes[2].plot(epochs, gini, marker="o")
    axes[2].fill_between(epochs, gini - spread, gini + spread, alpha=0.3)
    axes[2].set(xlabel="epoch", ylabel="Gini of |z|", title="sparseness (posterior samples)")
    if "weight_prior" in m and np.any(np.asarray(m["weight_prior"]) != 1):
        for ax in axes:
            annealed = epochs[np.asarray(m["weight_prior"]) != 1]
            ax.axvspan(annealed.min() - 0.5, annealed.max() + 0.5, color="orange", alpha=0.1, label="annealing")
    fig.tight_layout()
    return fig


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="an existing folder (default: beside the results file)")
    args = parser.parse_args(arguments)
    plt = pyplot()
    out = output_folder(args.out, "--out") if args.out is not None else args.results.parent
    results = read_results(args.results)
    missing = [key for key in ("W", "lambda") if key not in results.final]
    if missing:
        reason = f" ({results.attrs['reason']})" if results.attrs.get("reason") else ""
        raise ConfigError(
            f"{str(args.results)!r}: no final {missing[0]} to draw: the run is {results.status or 'of unknown status'}{reason}; "
            "plot_run draws a finished run"
        )
    for name, fig in (("dictionary", plot_dictionary(results)), ("curves", plot_curves(results))):
        for suffix in ("png", "pdf"):
            fig.savefig(out / f"{name}.{suffix}", dpi=150)
        plt.close(fig)
        print(out / f"{name}.png")


if __name__ == "__main__":
    report_user_errors(main)
