"""Semi-amortised Adam (``trainer=semi_amortized_adam``; docs/design.md §7.5): Adam (``trainers/adam.py``)
extended so that W's gradient comes from each batch's encoder output refined per data point.

The encoder is trained on its own ELBO as in Adam, and it alone is the model's posterior; but W follows the
per-point optimum instead of the encoder's errors: each batch's output is refined — full covariances,
``refine_iterations`` fixed-point iterations (``inference/fixed_point.py``) at the refined posteriors' own
full-data ``σ²*, λ*`` (a second statistics store, always full-data, whose batch rows follow as it passes) —
and W's gradient is the entropy objective's at the refined q. Amortised posteriors, the entropy objective,
no annealing (the refined q maximise the unweighted objective).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_elbo import closed_forms
from sparse_elbo.annealing import AnnealingWeights
from sparse_elbo.inference.fixed_point import FixedPointFit
from sparse_elbo.initialisation import DictionaryStart
from sparse_elbo.problem import Problem
from sparse_elbo.trainers.adam import AdamState, AdamTrainer
from sparse_elbo.trainers.base import Capabilities
from sparse_elbo.trainers.minibatch_statistics import StatisticsEstimate, StatisticsStore
from sparse_elbo.validation import require_at_least

REFRESH_BLOCK_SIZE = 16384  # data points per block of the refined statistics' first pass


@dataclass
class SemiAmortizedState(AdamState):
    refined: StatisticsStore | None = None  # the refined q's σ²*, λ* statistics

    def state_dict(self) -> dict:
        return {**super().state_dict(), "refined_statistics": self.refined.rows()}


class SemiAmortizedAdam(AdamTrainer):
    capabilities = Capabilities(posteriors=("amortized",), objectives=("entropy",), annealing=False)

    def __init__(
        self,
        max_epochs: int = 200,
        batch_size: int = 512,
        learning_rate: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        shuffle: bool = True,
        statistics: StatisticsEstimate | None = None,
        initialisation: DictionaryStart | None = None,
        refine_iterations: int = 10,
    ):
        super().__init__(max_epochs, batch_size, learning_rate, betas, shuffle, statistics, True, initialisation)
        require_at_least(1, refine_iterations=refine_iterations)
        self.refine_iterations = int(refine_iterations)

    def start(self, problem: Problem, saved: dict | None) -> SemiAmortizedState:
        state = SemiAmortizedState(**vars(super().start(problem, saved)))
        state.refined = StatisticsStore(problem, REFRESH_BLOCK_SIZE)
        if saved is None:
            state.refined.refresh()  # the encoder's statistics until each point is first refined
        else:
            state.refined.load(*saved["refined_statistics"])
        return state

    def set_gradients(
        self, problem: Problem, state: SemiAmortizedState, index: torch.Tensor, q, weights: AnnealingWeights
    ) -> None:
        super().set_gradients(problem, state, index, q, weights)
        self._refined_dictionary_gradient(problem.x[index], q, problem.model, state.refined, index)

    @torch.no_grad()
    def _refined_dictionary_gradient(self, x: torch.Tensor, q, model, refined: StatisticsStore, index: torch.Tensor) -> None:
        """Replace W's gradient by the one at the batch's refined q: ``∂F/∂W = (C - W S)/(B σ²)`` with
        ``C = Σ_n x_n μ_nᵀ`` (D,H), ``S = Σ_n (μ_n μ_nᵀ + Σ_n)`` (H,H) over the batch; the batch's rows of
        ``refined`` follow."""
        W = model.W.detach()  # (D,H)
        means = refined.means()
        sigma2 = closed_forms.optimal_sigma2(means.residual, x.shape[1])
        lam = closed_forms.optimal_lambda(means.prior_statistic)
        fit = FixedPointFit.at_scales(x, W, model.prior, sigma2, lam, q.mean.detach(), q.variance.detach().sqrt())
        for _ in range(self.refine_iterations):
            fit.step(line_search_steps=30)
        mean, covariance = fit.mean, fit.covariance  # (B,H), (B,H,H)
        second_moment = mean.T @ mean + covariance.sum(0)
        gradient = closed_forms.dictionary_gradient(x.T @ mean, second_moment, W, sigma2) / x.shape[0]
        model.W_raw.grad = -model.raw_gradient(gradient)
        residual = closed_forms.residual_energy(x, W, mean, (covariance * (W.T @ W)).sum((-2, -1)))  # (B,)
        refined.statistics(index, residual, model.prior.statistic(mean, torch.diagonal(covariance, dim1=-2, dim2=-1)))
