"""Figures for annealing on natural-image patches, from results files of runs on the same patches (e.g. the
runs that ``scripts/bench_annealing.py --out DIR`` keeps):

- ``fields_by_lambda``: each run's fields ordered by λ (largest first), side by side;
- ``localisation_gini``: the median localisation index of the fields and the Gini coefficient of the codes
  per epoch, annealed epochs shaded.

    python scripts/figure_annealing.py --out docs/figures \\
        "fast EM (patches_em)=DIR/em_0/results.h5" "fast EM, no annealing=DIR/em_none_0/results.h5" \\
        "authors' procedure=DIR/authors_0/results.h5"
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sparse_elbo.report.plot_run import field_shape  # noqa: E402
from sparse_elbo.results import read_results  # noqa: E402


def fields_by_lambda(runs: dict) -> plt.Figure:
    fig = plt.figure(figsize=(4.2 * len(runs), 4.6))
    for subfigure, (label, results) in zip(fig.subfigures(1, len(runs)), runs.items()):
        W, lam = np.asarray(results.final["W"]), np.asarray(results.final["lambda"])
        rows, cols = field_shape(results)
        side = math.ceil(math.sqrt(W.shape[1]))
        axes = subfigure.subplots(side, side, squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, h in zip(axes.ravel(), np.argsort(-lam)):
            field = W[:, h].reshape(rows, cols)
            limit = float(np.abs(field).max()) or 1.0
            ax.imshow(field, cmap="gray", vmin=-limit, vmax=limit, interpolation="nearest")
        localisation = float(np.median(np.asarray(results.final["localisation"])))
        subfigure.suptitle(
            f"{label}\nELBO {float(results.final['elbo']):.2f}, median localisation {localisation:.3f}", fontsize=9
        )
    return fig


def localisation_and_gini(runs: dict) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for label, results in runs.items():
        m = results.metrics
        epochs = np.asarray(m["epoch"])
        (line,) = axes[0].plot(epochs, m["localisation_median"], marker="o", label=label)
        axes[1].plot(epochs, m["gini_mean"], marker="o", color=line.get_color(), label=label)
        annealed = epochs[np.asarray(m["weight_prior"]) != 1]
        if annealed.size:
            for ax in axes:
                ax.axvspan(annealed.min() - 0.5, annealed.max() + 0.5, color=line.get_color(), alpha=0.06)
    axes[0].set(xlabel="epoch", ylabel="median localisation (uniform field = 1)", title="field localisation")
    axes[1].set(xlabel="epoch", ylabel="Gini of |z|", title="code sparseness")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="LABEL=results.h5")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--prefix", default="annealing_")
    args = parser.parse_args()
    runs = {label: read_results(path) for label, path in (item.rsplit("=", 1) for item in args.runs)}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, figure in (("fields_by_lambda", fields_by_lambda(runs)), ("localisation_gini", localisation_and_gini(runs))):
        path = args.out / f"{args.prefix}{name}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        print(path)


if __name__ == "__main__":
    main()
