"""Full-data evaluation of a run: the exact unweighted ELBO, its terms, σ², λ, Gini, field matching,
and the ground-truth ELBO (SPEC §8)."""

from __future__ import annotations

import torch

from sparse_elbo import metrics
from sparse_elbo.model import SparseCodingModel
from sparse_elbo.objectives import AnalyticELBO, EntropyELBO, ObjectiveValue
from sparse_elbo.problem import Problem


def exact_objective(objective):
    """The closed-form objective that reports a run's ELBO: ``L_H`` for the entropy objective
    (σ², λ at their optima), the analytic ELBO at the learned σ², λ otherwise (also for sampled runs)."""
    return AnalyticELBO() if objective.learns_noise_and_prior_scale else EntropyELBO()


@torch.no_grad()
def evaluate_problem(problem: Problem, weights) -> ObjectiveValue:
    """Exact full-data objective; ``weighted`` uses ``weights``, ``elbo`` never does."""
    q = problem.posterior()
    return exact_objective(problem.objective)(problem.x, q, problem.model, weights)


@torch.no_grad()
def sparseness(problem: Problem, n_samples: int = 10) -> tuple[float, float]:
    generator = torch.Generator(device=problem.x.device).manual_seed(problem.seed + 7)
    return metrics.posterior_sample_gini(problem.posterior(), n_samples, generator)


def ground_truth_elbo(
    x: torch.Tensor, W_true: torch.Tensor, posterior_factory, prior, trainer, seed: int = 0
) -> float:
    """``max_{q, σ², λ} ELBO`` with ``W`` fixed to the generator's dictionary (columns normalised,
    the gauge absorbed by λ): the value a perfect learner would reach, for comparison with the run's ELBO.

    posterior_factory(n_data, n_latents) builds a fresh posterior of the run's family;
    trainer is an ``LBFGSTrainer`` with ``train_dictionary=False``.
    """
    from sparse_elbo.annealing import NoAnnealing

    n_observed, n_latents = W_true.shape
    generator = torch.Generator().manual_seed(seed)
    model = SparseCodingModel(n_observed, n_latents, prior=prior, gauge="unit_norm", generator=generator)
    model.set_dictionary(W_true.cpu().float())
    model = model.to(device=x.device, dtype=x.dtype)
    posterior = posterior_factory(n_data=x.shape[0], n_latents=n_latents).to(device=x.device, dtype=x.dtype)
    problem = Problem(x=x, model=model, posterior=posterior, objective=EntropyELBO(), annealing=NoAnnealing(), seed=seed)
    trainer.fit(problem, lambda epoch, weights, t: evaluate_problem(problem, weights))
    return float(evaluate_problem(problem, problem.annealing(0)).elbo)
