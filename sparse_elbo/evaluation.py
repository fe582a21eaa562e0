"""Full-data evaluation of a run (docs/design.md §10): the exact unweighted ELBO, its terms, σ², λ, Gini,
and the ground-truth ELBO (``score_dictionary``, ``max_q L_H`` of any dictionary, is ``inference.fit``'s)."""

from __future__ import annotations

import torch

from sparse_elbo import metrics, parallel
from sparse_elbo.annealing import NoAnnealing
from sparse_elbo.inference.fit import FitSettings, fit_at_dictionary
from sparse_elbo.model import SparseCodingModel
from sparse_elbo.objectives import AnalyticELBO, EntropyELBO, ObjectiveValue, exact_value
from sparse_elbo.problem import Problem
from sparse_elbo.trainers.base import Trainer, fit


def exact_objective(objective):
    """The closed-form objective that reports a run's ELBO: ``L_H`` for the entropy objective
    (σ², λ at their optima), the analytic ELBO at the learned σ², λ otherwise (also for sampled runs)."""
    return AnalyticELBO() if objective.learns_noise_and_prior_scale else EntropyELBO()


@torch.no_grad()
def evaluate_problem(problem: Problem, weights, block_size: int = 16384, points: torch.Tensor | None = None) -> ObjectiveValue:
    """Exact objective over the data points ``points`` (all when None: the full-data objective), accumulated
    over blocks of data points so that memory stays bounded; ``weighted`` uses ``weights``, ``elbo`` never
    does (``objectives.exact_value``)."""
    return exact_value(exact_objective(problem.objective), problem.x, problem.q, problem.model, weights, block_size, points)


@torch.no_grad()
def sparseness(
    problem: Problem, n_samples: int = 10, max_data_points: int = 10000, points: torch.Tensor | None = None
) -> tuple[float, float]:
    """Gini of |z| over ``n_samples`` posterior samples of (at most) the first ``max_data_points`` points (of
    ``points``, when given). Data-parallel: of the first ``max_data_points`` of the whole data set (of each
    rank's ``points``, as many in all), each rank sampling its own."""
    generator = torch.Generator(device=problem.x.device).manual_seed(problem.seed + 7)
    ranks, n = parallel.sharing(), problem.x.shape[0]
    if ranks is None:
        index = torch.arange(min(n, max_data_points), device=problem.x.device) if points is None else points[:max_data_points]
        return metrics.posterior_sample_gini(problem.q(index), n_samples, generator)
    if points is None:
        index = parallel.mine(torch.arange(min(parallel.count(n), max_data_points)), n).to(problem.x.device)
    else:
        index = points[: -(-max_data_points // ranks.size)]
    g = metrics.sample_gini(problem.q(index), n_samples, generator)  # (K, B)
    total, square, size = parallel.summed(
        g.sum(), g.square().sum(), torch.tensor(float(g.numel()), dtype=torch.float64, device=g.device)
    )
    mean = total / size
    return float(mean), float(((square - size * mean**2) / (size - 1)).clamp_min(0.0).sqrt())


def ground_truth_elbo(
    x: torch.Tensor, W_true: torch.Tensor, family, prior, settings: FitSettings | None = None, seed: int = 0
) -> float:
    """``max_{q, σ², λ} ELBO`` with ``W`` fixed to the generator's dictionary, for per-data-point posteriors of
    ``family``: the value a perfect learner would reach, for comparison with the run's ELBO
    (``inference.fit.fit_at_dictionary``, ``settings``: how the fit runs)."""
    model, posterior, _ = fit_at_dictionary(x, W_true, family, prior, settings, seed)
    return float(exact_value(EntropyELBO(), x, lambda index: posterior.q(x, index), model).elbo)


def ground_truth_elbo_by_trainer(
    x: torch.Tensor, W_true: torch.Tensor, posterior_factory, prior, trainer: Trainer, seed: int = 0
) -> float:
    """The same, fitted by ``trainer`` (one that keeps the dictionary fixed, e.g. L-BFGS on an encoder's
    weights: the ground truth of an amortised family) with ``W`` fixed to ``W_true``."""
    n_observed, n_latents = W_true.shape
    model = SparseCodingModel(
        n_observed, n_latents, prior=prior, gauge="unit_norm", generator=torch.Generator().manual_seed(seed)
    )
    model = model.to(device=x.device, dtype=x.dtype)
    model.set_dictionary(W_true.to(device=x.device, dtype=x.dtype))
    posterior = posterior_factory(n_data=x.shape[0], n_latents=n_latents, n_observed=n_observed).to(
        device=x.device, dtype=x.dtype
    )
    problem = Problem(x=x, model=model, posterior=posterior, objective=EntropyELBO(), annealing=NoAnnealing(), seed=seed)
    fit(trainer, problem, lambda epoch, weights, t: evaluate_problem(problem, weights))
    return float(evaluate_problem(problem, problem.annealing(0)).elbo)
