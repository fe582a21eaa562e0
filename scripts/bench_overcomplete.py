"""H = 400: does the ELBO itself prefer the unlocalised fields the overcomplete setting learns? (docs/benchmarks.md,
"Overcomplete fields").

Trains ``experiment=patches_em_overcomplete`` on ``--n-patches`` patches (or reads a finished run, ``--results``),
then scores on the same patches, with ``sparse_elbo.score_dictionary`` (``max_{q, σ², λ} L_H`` at a fixed W,
diagonal posteriors; the first ``--score-patches`` of the run's patches, the same for every dictionary):

- ``learned``: the run's H = 400 dictionary;
- ``localised``: an H = 400 dictionary of localised fields — the shipped ``patches16_h100`` dictionary (learned by
  ``patches_em`` on the same photographs, the same whitening) with each field also shifted by 2 pixels towards the
  patch's centre along the rows, the columns and both (zero-filled, columns normalised);
- ``patches16_h100``: the shipped H = 100 dictionary itself, for scale.

For each: the ELBO (nats per patch), σ²*, the number of latents switched off (λ* below ``--off``), the Gini
coefficient of λ*, the median localisation index and the share of noise-like fields (index above 0.88,
``metrics.NOISE_LIKE_LOCALISATION_16X16``). ``--figure``: the fields of ``learned`` and ``localised``, ordered by λ*.

    python scripts/bench_overcomplete.py [--n-patches 20480] [--score-patches 4096] [--results R.h5] [--figure F.png]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import hydra.utils
import numpy as np
import torch
from omegaconf import OmegaConf

import sparse_elbo
from sparse_elbo.metrics import NOISE_LIKE_LOCALISATION_16X16, field_grid, gini, localisation_index

SHIFT = 2  # pixels


def shifted_towards_centre(W: np.ndarray, side: int, rows: int, cols: int) -> np.ndarray:
    """Each field of ``W (side², H)`` moved by ``rows, cols`` (0 or SHIFT) pixels towards the patch's centre
    (zero-filled), columns normalised  ->  (side², H)."""
    fields = W.T.reshape(-1, side, side)  # (H, p, p)
    energy = fields**2 / (fields**2).sum((1, 2), keepdims=True)
    grid = np.arange(side) - (side - 1) / 2
    toward = [-np.sign((energy.sum(2 - axis) * grid).sum(1)).astype(int) for axis in (0, 1)]  # (H,) each
    out = np.zeros_like(fields)
    for h, field in enumerate(fields):
        dr, dc = rows * (toward[0][h] or 1), cols * (toward[1][h] or 1)
        moved = np.roll(field, (dr, dc), axis=(0, 1))
        if dr:
            moved[slice(0, dr) if dr > 0 else slice(dr, None), :] = 0.0
        if dc:
            moved[:, slice(0, dc) if dc > 0 else slice(dc, None)] = 0.0
        out[h] = moved / np.linalg.norm(moved)
    return out.reshape(len(fields), -1).T


def localised_dictionary(side: int) -> np.ndarray:
    """The shipped H = 100 fields in four positions (module docstring)  ->  (side², 400)."""
    W = sparse_elbo.pretrained("patches16_h100").model.W.detach().double().numpy()  # (D, 100)
    return np.concatenate([shifted_towards_centre(W, side, r, c) for r, c in [(0, 0), (SHIFT, 0), (0, SHIFT), (SHIFT, SHIFT)]], 1)


def learned_run(arguments) -> Path:
    if arguments.results:
        return Path(arguments.results)
    folder = Path(tempfile.mkdtemp(prefix="overcomplete_"))
    overrides = ["experiment=patches_em_overcomplete", f"dataset.n_patches={arguments.n_patches}", f"seed={arguments.seed}"]
    start = time.perf_counter()
    summary = sparse_elbo.run(sparse_elbo.compose(overrides), folder, overrides=overrides, progress=False)
    print(
        f"trained: python -m sparse_elbo.train {' '.join(overrides)}  ({time.perf_counter() - start:.0f} s) -> {summary.results_path}"
    )
    return summary.results_path


def describe(name: str, W: np.ndarray, x: torch.Tensor, side: int, arguments) -> tuple[dict, np.ndarray]:
    start = time.perf_counter()
    score = sparse_elbo.score_dictionary(x, W, max_iterations=arguments.iterations, tolerance=1e-7)
    lam = score.lam.double().numpy()  # (H,)
    index = localisation_index(W, (side, side))  # (H,)
    row = {
        "dictionary": name,
        "H": W.shape[1],
        "ELBO": f"{score.elbo:.2f}",
        "σ²*": f"{score.sigma2:.2e}",
        f"λ* < {arguments.off}": int((lam < arguments.off).sum()),
        "Gini(λ*)": f"{float(gini(torch.as_tensor(lam))):.3f}",
        "median localisation": f"{np.median(index):.3f}",
        "noise-like": f"{np.mean(index > NOISE_LIKE_LOCALISATION_16X16):.0%}",
        "scoring time": f"{time.perf_counter() - start:.0f} s",
    }
    return row, lam


def figure(path: str, panels: list[tuple[str, np.ndarray, np.ndarray]], side: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 6.4))
    for axis, (title, W, lam) in zip(axes, panels):
        axis.imshow(field_grid(W, lam, (side, side)), cmap="gray")
        axis.set_title(title, fontsize=10)
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-patches", type=int, default=20480, help="patches the H = 400 run learns from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", help="a finished patches_em_overcomplete run's results.h5 (skips training)")
    parser.add_argument("--score-patches", type=int, default=4096, help="the first this many of the run's patches")
    parser.add_argument("--iterations", type=int, default=300, help="the scoring fit's iteration cap")
    parser.add_argument("--off", type=float, default=0.05, help="a latent with λ* below this is switched off")
    parser.add_argument("--figure", help="write the learned and localised fields here (.png)")
    arguments = parser.parse_args()
    sparse_elbo.retain_freed_memory()
    results = sparse_elbo.read_results(learned_run(arguments))
    cfg = OmegaConf.create(results.config)
    dataset = hydra.utils.instantiate(cfg.dataset)  # the run's own patches, drawn again from its settings
    side = dataset.image_shape[0]
    x = torch.as_tensor(dataset.x[: arguments.score_patches], dtype=torch.float64)  # (M, D)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(x)} of the run's patches; float64")
    learned = np.asarray(results.final["W"], dtype=np.float64)
    shipped = sparse_elbo.pretrained("patches16_h100").model.W.detach().double().numpy()
    rows, panels = [], []
    for name, W in [("learned", learned), ("localised", localised_dictionary(side)), ("patches16_h100", shipped)]:
        row, lam = describe(name, W, x, side, arguments)
        rows.append(row)
        panels.append((f"{name}: ELBO {row['ELBO']}, median localisation {row['median localisation']}", W, lam))
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(value) for value in row.values()) + " |")
    if arguments.figure:
        figure(arguments.figure, panels[:2], side)


if __name__ == "__main__":
    main()
