"""Scoring a dictionary, ``max_q L_H(W)`` with diagonal posteriors, at the paper's size (docs/benchmarks.md,
"Scoring a dictionary").

On the patches of ``experiment=patches_em`` (``--n-patches``, float32, the chosen device) and a dictionary
(``--dictionary``: a .npy array (D,H) or a results file; default: the experiment's initial W), it prints

1. ``sparse_elbo.score_dictionary`` end to end at its default tolerance: value and time;
2. the coordinate-ascent Newton fit behind it (``inference/diagonal_newton.py``), iteration by iteration;
3. the generic fit any per-data-point family gets, block coordinate ascent with the entropy E-step (10 L-BFGS
   iterations per block and sweep, ``inference.fit.BlockFit``), sweep by sweep for ``--lbfgs-seconds``,

so that the two fits are compared on value against time, side by side in one run.

    python scripts/bench_score.py --dictionary W.npy                  # 204,800 patches
    python scripts/bench_score.py --n-patches 40960 --lbfgs-seconds 300
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import sparse_elbo
from sparse_elbo.inference.diagonal_newton import DiagonalNewtonFit
from sparse_elbo.inference.fit import BlockFit
from sparse_elbo.inference.statistics import block_size
from sparse_elbo.posteriors import DiagonalPosterior
from sparse_elbo.priors import LaplacePrior
from sparse_elbo.runner.build import build


def dictionary(path: str | None, initial: torch.Tensor) -> torch.Tensor:
    if path is None:
        return initial
    if path.endswith(".npy"):
        W = torch.as_tensor(np.load(path), dtype=initial.dtype, device=initial.device)
    else:
        W = sparse_elbo.load(path).model.W.detach().to(initial)
    return W / W.norm(dim=0)


def newton_trace(x: torch.Tensor, W: torch.Tensor, iterations: int) -> None:
    start = time.perf_counter()
    fit = DiagonalNewtonFit(x, W, block_size(x, None))
    for iteration in range(1, iterations + 1):
        value = float(fit.step())
        print(f"  Newton iteration {iteration:3d}: L_H = {value:.6f}  ({time.perf_counter() - start:6.1f} s)", flush=True)


def lbfgs_trace(x: torch.Tensor, W: torch.Tensor, budget: float) -> None:
    """Sweeps of the generic block fit until ``budget`` seconds have passed."""
    start = time.perf_counter()
    posterior = DiagonalPosterior(x.shape[0], W.shape[1]).to(x)
    fit = BlockFit(x, W, LaplacePrior(), posterior, iterations=10)
    sweep = 1
    while True:
        fit.run(1, 0.0)  # one sweep over every block
        print(f"  L-BFGS sweep {sweep:3d}: L_H = {float(fit.value):.6f}  ({time.perf_counter() - start:6.1f} s)", flush=True)
        if time.perf_counter() - start > budget:
            return
        sweep += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-patches", type=int, default=204800)
    parser.add_argument("--dictionary", default=None, help="a .npy array (D,H) or a results file; default: the initial W")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--newton-iterations", type=int, default=15)
    parser.add_argument("--lbfgs-seconds", type=float, default=120.0)
    args = parser.parse_args()
    sparse_elbo.retain_freed_memory()  # as the command line does (sparse_elbo/runner/memory.py)
    cfg = sparse_elbo.compose(["experiment=patches_em", f"dataset.n_patches={args.n_patches}", f"device={args.device}"])
    problem = build(cfg).problem
    x = problem.x
    W = dictionary(args.dictionary, problem.model.W.detach())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; N={x.shape[0]}, W {tuple(W.shape)}"
    )
    start = time.perf_counter()
    score = sparse_elbo.score_dictionary(x, W)
    print(f"score_dictionary: max_q L_H = {score.elbo:.6f} in {time.perf_counter() - start:.1f} s")
    newton_trace(x, W, args.newton_iterations)
    lbfgs_trace(x, W, args.lbfgs_seconds)


if __name__ == "__main__":
    main()
