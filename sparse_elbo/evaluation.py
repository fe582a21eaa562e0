"""Full-data evaluation of a run (docs/design.md §10): the exact unweighted ELBO, its terms, σ², λ, Gini,
and the ground-truth ELBO."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from sparse_elbo import metrics
from sparse_elbo.annealing import NoAnnealing
from sparse_elbo.inference.statistics import data_blocks
from sparse_elbo.model import SparseCodingModel
from sparse_elbo.objectives import AnalyticELBO, DataStatistics, EntropyELBO, ObjectiveValue
from sparse_elbo.posteriors import DiagonalPosterior, FullCovariancePosterior
from sparse_elbo.priors import LaplacePrior
from sparse_elbo.problem import Problem
from sparse_elbo.trainers.base import Trainer, fit
from sparse_elbo.trainers.fixed_point import FixedPointPosteriorTrainer
from sparse_elbo.validation import require_one_of


def exact_objective(objective):
    """The closed-form objective that reports a run's ELBO: ``L_H`` for the entropy objective
    (σ², λ at their optima), the analytic ELBO at the learned σ², λ otherwise (also for sampled runs)."""
    return AnalyticELBO() if objective.learns_noise_and_prior_scale else EntropyELBO()


def _blocks(problem: Problem, points: torch.Tensor | None, block_size: int) -> list[torch.Tensor]:
    """``points`` (all data points when None) in blocks of ``block_size``."""
    if points is None:
        return data_blocks(problem.x.shape[0], block_size, problem.x.device)
    return list(torch.split(points, block_size))


@torch.no_grad()
def full_data_statistics(
    problem: Problem, block_size: int = 16384, points: torch.Tensor | None = None
) -> tuple[DataStatistics, torch.Tensor]:
    """The means over the data points ``points`` (all when None) behind ``σ²* = residual / D`` and
    ``λ* = prior_statistic``, and the mean posterior entropy, accumulated over blocks of data points so that
    memory stays bounded."""
    x, model = problem.x, problem.model
    n = x.shape[0] if points is None else len(points)
    entropy_objective = EntropyELBO()
    residual, prior_stat, entropy = x.new_zeros(()), x.new_zeros(model.n_latents), x.new_zeros(())
    for index in _blocks(problem, points, block_size):
        q = problem.q(index)
        r, t = entropy_objective.batch_statistics(x[index], q, model)  # (B,), (B,H)
        residual, prior_stat, entropy = residual + r.sum(), prior_stat + t.sum(0), entropy + q.entropy().sum()
    return DataStatistics(residual / n, prior_stat / n), entropy / n


@torch.no_grad()
def evaluate_problem(problem: Problem, weights, block_size: int = 16384, points: torch.Tensor | None = None) -> ObjectiveValue:
    """Exact objective over the data points ``points`` (all when None: the full-data objective), accumulated
    over blocks of data points so that memory stays bounded; ``weighted`` uses ``weights``, ``elbo`` never
    does."""
    objective = exact_objective(problem.objective)
    x, model = problem.x, problem.model
    n = x.shape[0] if points is None else len(points)
    if n <= block_size:
        return objective(x if points is None else x[points], problem.q(points), model, weights)
    if isinstance(objective, EntropyELBO):
        statistics, mean_entropy = full_data_statistics(problem, block_size, points)
        return EntropyELBO.from_statistics(mean_entropy, statistics, x.shape[1], model.prior, weights)
    values = [
        (len(index), objective(x[index], problem.q(index), model, weights)) for index in _blocks(problem, points, block_size)
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
def sparseness(
    problem: Problem, n_samples: int = 10, max_data_points: int = 10000, points: torch.Tensor | None = None
) -> tuple[float, float]:
    """Gini of |z| over ``n_samples`` posterior samples of (at most) the first ``max_data_points`` points (of
    ``points``, when given)."""
    generator = torch.Generator(device=problem.x.device).manual_seed(problem.seed + 7)
    if points is None:
        index = torch.arange(min(problem.x.shape[0], max_data_points), device=problem.x.device)
    else:
        index = points[:max_data_points]
    return metrics.posterior_sample_gini(problem.q(index), n_samples, generator)


def fit_at_dictionary(x: torch.Tensor, W: torch.Tensor, posterior_factory, prior, trainer: Trainer, seed: int = 0) -> Problem:
    """Fit fresh posteriors of ``posterior_factory``'s family (and σ², λ) to the data ``x (N,D)`` with the
    dictionary fixed to ``W (D,H)`` (columns normalised, the gauge absorbed by λ), by a ``trainer`` that does
    not train the dictionary; returns the fitted problem (``evaluate_problem`` gives its ``L_H``)."""
    n_observed, n_latents = W.shape
    model = SparseCodingModel(
        n_observed, n_latents, prior=prior, gauge="unit_norm", generator=torch.Generator().manual_seed(seed)
    )
    model = model.to(device=x.device, dtype=x.dtype)
    model.set_dictionary(W.to(device=x.device, dtype=x.dtype))
    posterior = posterior_factory(n_data=x.shape[0], n_latents=n_latents, n_observed=n_observed).to(
        device=x.device, dtype=x.dtype
    )
    problem = Problem(x=x, model=model, posterior=posterior, objective=EntropyELBO(), annealing=NoAnnealing(), seed=seed)
    fit(trainer, problem, lambda epoch, weights, t: evaluate_problem(problem, weights))
    return problem


def ground_truth_elbo(x: torch.Tensor, W_true: torch.Tensor, posterior_factory, prior, trainer: Trainer, seed: int = 0) -> float:
    """``max_{q, σ², λ} ELBO`` with ``W`` fixed to the generator's dictionary: the value a perfect learner
    would reach, for comparison with the run's ELBO (``fit_at_dictionary``)."""
    problem = fit_at_dictionary(x, W_true, posterior_factory, prior, trainer, seed)
    return float(evaluate_problem(problem, problem.annealing(0)).elbo)


@dataclass
class DictionaryScore:
    """``max_q L_H`` of a dictionary on data (nats per data point) and the σ²*, λ* (H,) it comes with."""

    elbo: float
    sigma2: float
    lam: torch.Tensor


def score_dictionary(
    x, W, prior=None, family: str = "diag", max_iterations: int = 1000, tolerance: float = 1e-9, block_size: int | None = None
) -> DictionaryScore:
    """How well a dictionary ``W (D,H)`` explains the data ``x (N,D)``: ``max_{q, σ², λ} L_H`` with W fixed.

    Diagonal posteriors (``family="diag"``) under the Laplace prior: coordinate ascent with Newton steps,
    O(N·H²) per iteration, in blocks of ``block_size`` points (None: all on CUDA, 16,384 on a CPU)
    (docs/design.md §6.4); full covariances: the fixed-point fit (§6.3). Either stops once L_H changes by
    less than ``tolerance`` (relative, floored at a hundred rounding units of x's dtype) per iteration.
    x, W: tensors (their device and dtype are used) or arrays (float64 on the CPU)."""
    require_one_of("family", family, ("diag", "full"))
    x = torch.as_tensor(x, dtype=torch.float64) if not torch.is_tensor(x) else x
    W = torch.as_tensor(W, dtype=x.dtype, device=x.device)
    factory = partial(DiagonalPosterior) if family == "diag" else partial(FullCovariancePosterior)
    trainer = FixedPointPosteriorTrainer(max_iterations, tolerance, block_size=block_size)
    problem = fit_at_dictionary(x, W, factory, prior or LaplacePrior(), trainer)
    value = evaluate_problem(problem, problem.annealing(0))
    return DictionaryScore(float(value.elbo), float(value.sigma2), value.lam.detach())
