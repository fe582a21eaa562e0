"""The posterior-only fit at a fixed dictionary as a trainer (the ground-truth ELBO's default and
``score_dictionary``'s): one epoch of a batched iteration on every per-data-point posterior, ``W`` fixed;
``σ², λ`` follow q as their closed-form optima. Diagonal posteriors under the Laplace prior use the
O(N·H²) coordinate-ascent Newton fit of ``inference/diagonal_newton.py`` (docs/design.md §6.4); full
covariances (and other priors) the fixed-point iteration of ``inference/fixed_point.py`` (§6.3).
"""

from __future__ import annotations

import torch

from sparse_elbo.annealing import AnnealingWeights
from sparse_elbo.inference.diagonal_newton import DiagonalNewtonFit
from sparse_elbo.inference.fixed_point import FixedPointFit
from sparse_elbo.inference.statistics import block_size
from sparse_elbo.posteriors import DiagonalPosterior
from sparse_elbo.priors import LaplacePrior
from sparse_elbo.problem import Problem
from sparse_elbo.trainers.base import Capabilities, EpochReport, NoState, Sizes, Trainer
from sparse_elbo.validation import require_at_least


def posterior_fit(problem: Problem, W: torch.Tensor, size: int | None = None) -> DiagonalNewtonFit | FixedPointFit:
    """The batched fit of every posterior of ``problem`` at the dictionary ``W``: the diagonal Newton fit for
    diagonal posteriors under the Laplace prior (in blocks of ``size`` points; None: all on CUDA, 16,384 on a
    CPU), the fixed-point fit otherwise."""
    x, model, posterior = problem.x, problem.model, problem.posterior
    if isinstance(posterior, DiagonalPosterior) and isinstance(model.prior, LaplacePrior):
        return DiagonalNewtonFit(x, W, block_size(x, size))
    return FixedPointFit(x, W, model.prior, full=posterior.family == "full")


class FixedPointPosteriorTrainer(Trainer):
    capabilities = Capabilities(families=("diag", "full"), objectives=("entropy",), annealing=False)
    max_epochs = 1
    train_dictionary = False

    def __init__(
        self, max_iterations: int = 1000, tolerance: float = 1e-12, line_search_steps: int = 30, block_size: int | None = None
    ):
        require_at_least("trainer", 1, max_iterations=max_iterations, line_search_steps=line_search_steps)
        require_at_least("trainer", 0, tolerance=tolerance)
        if block_size is not None:
            require_at_least("trainer", 1, block_size=block_size)
        self.max_iterations = int(max_iterations)
        self.tolerance = float(tolerance)
        self.line_search_steps = int(line_search_steps)
        self.block_size = None if block_size is None else int(block_size)

    def start(self, problem: Problem, saved: dict | None) -> NoState:
        return NoState()

    @torch.no_grad()
    def train_epoch(self, problem: Problem, state: NoState, epoch: int, weights: AnnealingWeights) -> EpochReport:
        model = problem.model
        fit = posterior_fit(problem, model.W.detach(), self.block_size)
        converged = fit.run(self.max_iterations, self.tolerance, self.line_search_steps)
        fit.write_to(problem.posterior, model)
        return EpochReport("converged" if converged else "max_iterations", converged)

    def working_memory(self, sizes: Sizes) -> int:
        """The diagonal Newton fit's (N,H) temporaries (diagonal posteriors hold 2 N H numbers), or the
        fixed-point fit's (N,H,H) arrays."""
        per_point = sizes.n_latents if sizes.posterior_numbers <= 2 * sizes.n_data * sizes.n_latents else sizes.n_latents**2
        return sizes.posterior_numbers + 16 * sizes.n_data * per_point
