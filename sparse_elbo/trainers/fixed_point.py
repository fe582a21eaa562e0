"""The posterior-only fit at a fixed dictionary as a trainer (the ground-truth ELBO's default): one epoch
of the batched fixed-point iteration of ``inference/fixed_point.py`` on every per-data-point diagonal or
full-covariance posterior, ``W`` fixed; ``σ², λ`` follow q as their closed-form optima (docs/design.md §6.3).
"""

from __future__ import annotations

import torch

from sparse_elbo.annealing import AnnealingWeights
from sparse_elbo.inference.fixed_point import FixedPointFit
from sparse_elbo.problem import Problem
from sparse_elbo.trainers.base import Capabilities, EpochReport, NoState, Sizes, Trainer
from sparse_elbo.validation import require_at_least


class FixedPointPosteriorTrainer(Trainer):
    capabilities = Capabilities(families=("diag", "full"), objectives=("entropy",), annealing=False)
    max_epochs = 1
    train_dictionary = False

    def __init__(self, max_iterations: int = 1000, tolerance: float = 1e-12, line_search_steps: int = 30):
        require_at_least("trainer", 1, max_iterations=max_iterations, line_search_steps=line_search_steps)
        require_at_least("trainer", 0, tolerance=tolerance)
        self.max_iterations = int(max_iterations)
        self.tolerance = float(tolerance)
        self.line_search_steps = int(line_search_steps)

    def start(self, problem: Problem, saved: dict | None) -> NoState:
        return NoState()

    @torch.no_grad()
    def train_epoch(self, problem: Problem, state: NoState, epoch: int, weights: AnnealingWeights) -> EpochReport:
        model = problem.model
        fit = FixedPointFit(problem.x, model.W.detach(), model.prior, full=problem.posterior.family == "full")
        converged = fit.run(self.max_iterations, self.tolerance, self.line_search_steps)
        fit.write_to(problem.posterior, model)
        return EpochReport("converged" if converged else "max_iterations", converged)

    def working_memory(self, sizes: Sizes) -> int:
        return sizes.posterior_numbers + 5 * sizes.n_data * sizes.n_latents**2
