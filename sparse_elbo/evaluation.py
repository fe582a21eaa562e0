"""Full-data evaluation of a run (docs/design.md §10): the exact unweighted ELBO, its terms, σ², λ, Gini,
and the ground-truth ELBO."""

from __future__ import annotations

import torch

from sparse_elbo import metrics
from sparse_elbo.annealing import NoAnnealing
from sparse_elbo.inference.statistics import data_blocks
from sparse_elbo.model import SparseCodingModel
from sparse_elbo.objectives import AnalyticELBO, DataStatistics, EntropyELBO, ObjectiveValue
from sparse_elbo.problem import Problem
from sparse_elbo.trainers.base import Trainer, fit


def exact_objective(objective):
    """The closed-form objective that reports a run's ELBO: ``L_H`` for the entropy objective
    (σ², λ at their optima), the analytic ELBO at the learned σ², λ otherwise (also for sampled runs)."""
    return AnalyticELBO() if objective.learns_noise_and_prior_scale else EntropyELBO()


@torch.no_grad()
def full_data_statistics(problem: Problem, block_size: int = 16384) -> tuple[DataStatistics, torch.Tensor]:
    """The full-data means behind ``σ²* = residual / D`` and ``λ* = prior_statistic``, and the mean
    posterior entropy, accumulated over blocks of data points so that memory stays bounded."""
    x, model, n = problem.x, problem.model, problem.x.shape[0]
    entropy_objective = EntropyELBO()
    residual, prior_stat, entropy = x.new_zeros(()), x.new_zeros(model.n_latents), x.new_zeros(())
    for index in data_blocks(n, block_size, x.device):
        q = problem.q(index)
        r, t = entropy_objective.batch_statistics(x[index], q, model)  # (B,), (B,H)
        residual, prior_stat, entropy = residual + r.sum(), prior_stat + t.sum(0), entropy + q.entropy().sum()
    return DataStatistics(residual / n, prior_stat / n), entropy / n


@torch.no_grad()
def evaluate_problem(problem: Problem, weights, block_size: int = 16384) -> ObjectiveValue:
    """Exact full-data objective, accumulated over blocks of data points so that memory stays bounded;
    ``weighted`` uses ``weights``, ``elbo`` never does."""
    objective = exact_objective(problem.objective)
    x, model, n = problem.x, problem.model, problem.x.shape[0]
    if n <= block_size:
        return objective(x, problem.q(), model, weights)
    if isinstance(objective, EntropyELBO):
        statistics, mean_entropy = full_data_statistics(problem, block_size)
        return EntropyELBO.from_statistics(mean_entropy, statistics, x.shape[1], model.prior, weights)
    values = [
        (len(index), objective(x[index], problem.q(index), model, weights)) for index in data_blocks(n, block_size, x.device)
    ]
    terms = {name: sum(m * v.terms[name] for m, v in values) / n for name in values[0][1].terms}
    return ObjectiveValue(
        elbo=sum(m * v.elbo for m, v in values) / n,
        weighted=sum(m * v.weighted for m, v in values) / n,
        terms=terms,
        sigma2=model.sigma2,
        lam=model.lam,
    )


@torch.no_grad()
def sparseness(problem: Problem, n_samples: int = 10, max_data_points: int = 10000) -> tuple[float, float]:
    """Gini of |z| over ``n_samples`` posterior samples of (at most) the first ``max_data_points`` points."""
    generator = torch.Generator(device=problem.x.device).manual_seed(problem.seed + 7)
    index = torch.arange(min(problem.x.shape[0], max_data_points), device=problem.x.device)
    return metrics.posterior_sample_gini(problem.q(index), n_samples, generator)


def ground_truth_elbo(x: torch.Tensor, W_true: torch.Tensor, posterior_factory, prior, trainer: Trainer, seed: int = 0) -> float:
    """``max_{q, σ², λ} ELBO`` with ``W`` fixed to the generator's dictionary (columns normalised,
    the gauge absorbed by λ): the value a perfect learner would reach, for comparison with the run's ELBO.

    posterior_factory(n_data=, n_latents=, n_observed=) builds a fresh posterior of the run's family;
    trainer: one that does not train the dictionary (``train_dictionary`` false), e.g. the fixed-point fit.
    """
    n_observed, n_latents = W_true.shape
    generator = torch.Generator().manual_seed(seed)
    model = SparseCodingModel(n_observed, n_latents, prior=prior, gauge="unit_norm", generator=generator)
    model.set_dictionary(W_true.cpu().float())
    model = model.to(device=x.device, dtype=x.dtype)
    posterior = posterior_factory(n_data=x.shape[0], n_latents=n_latents, n_observed=n_observed).to(
        device=x.device, dtype=x.dtype
    )
    problem = Problem(x=x, model=model, posterior=posterior, objective=EntropyELBO(), annealing=NoAnnealing(), seed=seed)
    fit(trainer, problem, lambda epoch, weights, t: evaluate_problem(problem, weights))
    return float(evaluate_problem(problem, problem.annealing(0)).elbo)
