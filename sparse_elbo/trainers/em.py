"""Variational EM on the full data (docs/design.md §7.3): E-steps on the per-data-point posteriors in
blocks, closed-form M-steps for the dictionary.

One EM iteration, on ``Σ`` the sufficient statistics of every block (``inference/statistics.py``):

1. ``σ², λ`` ← their full-data optima ``σ²*, λ*`` of the current W and q;
2. for each block of the driver's ``block_size`` points (the whole data set on CUDA, 16,384 points on a
   CPU): the E-step objective (``e_step``: ``AnalyticEStep`` — the analytic ELBO at those ``σ², λ`` — or
   ``EntropyEStep`` — the full-data ``L_H`` with ``σ²*, λ*`` following the block's q, every other point's
   q fixed) is maximised over the block's posteriors by the driver's warm-started L-BFGS iterations
   (``inference/e_step.py``: ``BlockLBFGS``, ``sweep``), and the block's share of the sums is updated;
3. the M-step: ``W ← W + ω (W* - W)`` with ``W* = (Σ_n x_n μ_nᵀ)(Σ_n μ_n μ_nᵀ + Σ_n)⁻¹`` the maximiser of
   the expected log-likelihood (ω = ``m_step_overrelaxation``; for ω ∈ (0, 2] it never lowers the ELBO),
   then the gauge fix ``W_h → W_h / c_h``, ``z_h → c_h z_h``, ``λ_h → c_h λ_h`` (``c_h = ||W_h||``), which
   leaves the ELBO unchanged.

An epoch is ``em_iterations_per_epoch`` EM iterations (with that epoch's annealing weights), then the
model's ``σ², λ`` are set to the exact full-data optima. Every step is a coordinate ascent, so the ELBO
never decreases while the weights are 1. A new run starts from the least-squares codes of the initial
dictionary, ``μ_n = (WᵀW + εI)⁻¹ Wᵀ x_n`` (ε = 1e-3), so that the first ``σ²*, λ*`` reflect the data's
scale (from ``μ = 0`` prior annealing would switch every latent off at once). The initial dictionary is
``initialisation``'s (``sparse_elbo/initialisation.py``). Where the schedule holds λ at ``λ_0``
(``annealing.prior_scale=fixed``) the E-step objective receives it with the weights (docs/design.md §8);
``restarts`` (``trainers/restarts.py``) says which epochs start from fresh posteriors.

Stop rule: the relative change of the ELBO over an epoch below ``relative_tolerance`` (0: never), once
the annealing weights are 1; or ``max_epochs``. The variant on epoch subsets is ``trainers/subsets.py``.
"""

from __future__ import annotations

import torch

from sparse_elbo import closed_forms, parallel
from sparse_elbo.annealing import AnnealingWeights
from sparse_elbo.inference.e_step import AnalyticEStep, BlockLBFGS, EStepObjective, sweep
from sparse_elbo.inference.fit import least_squares_start
from sparse_elbo.inference.statistics import CPU_BLOCK_SIZE, SufficientStatistics, total
from sparse_elbo.initialisation import DictionaryStart, RandomDictionary, start_dictionary
from sparse_elbo.problem import Problem
from sparse_elbo.trainers.base import Capabilities, NoState, Sizes, Trainer
from sparse_elbo.trainers.convergence import StopRule
from sparse_elbo.trainers.restarts import NeverRestart, RestartPolicy
from sparse_elbo.validation import invalid, require_at_least


class EMTrainer(Trainer):
    capabilities = Capabilities(
        posteriors=("per_data_point",),
        objectives=("entropy",),
        annealing=True,
        prior_scales=("optimal", "fixed"),
        data_parallel=True,
        streams_data=True,
    )

    def __init__(
        self,
        max_epochs: int = 10,
        em_iterations_per_epoch: int = 1,
        e_step: EStepObjective = AnalyticEStep(),
        driver: BlockLBFGS | None = None,
        m_step_overrelaxation: float = 1.0,
        relative_tolerance: float = 0.0,
        restarts: RestartPolicy | None = None,
        initialisation: DictionaryStart | None = None,
    ):
        require_at_least(1, max_epochs=max_epochs, em_iterations_per_epoch=em_iterations_per_epoch)
        if not 0 < m_step_overrelaxation <= 2:
            raise invalid(
                "m_step_overrelaxation",
                f"must be in (0, 2] (beyond 2 the M-step can lower the ELBO), got {m_step_overrelaxation}",
            )
        self.max_epochs, self.em_iterations_per_epoch = int(max_epochs), int(em_iterations_per_epoch)
        self.e_step, self.driver = e_step, driver if driver is not None else BlockLBFGS()
        self.m_step_overrelaxation = float(m_step_overrelaxation)
        self.stop_rule = StopRule(float(relative_tolerance))
        self.restarts = restarts if restarts is not None else NeverRestart()
        self.initialisation = initialisation if initialisation is not None else RandomDictionary()

    def start(self, problem: Problem, saved: dict | None):
        if saved is None:
            start_dictionary(self.initialisation, problem)
            self.initialise_posteriors(problem, torch.arange(problem.x.shape[0], device=problem.x.device), fresh_scales=False)
        return NoState()

    def train_epoch(self, problem: Problem, state, epoch: int, weights: AnnealingWeights) -> None:
        points = torch.arange(problem.x.shape[0], device=problem.x.device)
        if self.restarts(epoch, problem.annealing.final_epoch()):
            self.initialise_posteriors(problem, points)
        self.run_em(problem, points, weights)

    def run_em(self, problem: Problem, points: torch.Tensor, weights: AnnealingWeights) -> None:
        """``em_iterations_per_epoch`` EM iterations on the data points ``points`` (their own sums, σ²*, λ*),
        then the model's σ², λ ← the optima of those points' q."""
        blocks, count = self.driver.blocks(points), parallel.count(len(points))
        statistics = [self._statistics(problem, index, count) for index in blocks]
        for _ in range(self.em_iterations_per_epoch):
            statistics = self.em_iteration(problem, blocks, statistics, weights)
        self._set_noise_and_prior_scale(problem, total(statistics).across_ranks())

    @staticmethod
    def _statistics(problem: Problem, index: torch.Tensor, count: int) -> SufficientStatistics:
        return SufficientStatistics.of(problem.x[index], problem.q(index), problem.model.prior, count)

    def working_memory(self, sizes: Sizes) -> int:
        """The posteriors, and one block's L-BFGS memory and (block, H, H) covariance temporaries."""
        block = min(sizes.n_data, self.driver.block_size or CPU_BLOCK_SIZE)
        per_point = sizes.posterior_numbers // max(sizes.n_data, 1)
        return sizes.posterior_numbers + (2 * self.driver.history_size + 8) * block * per_point

    def em_iteration(
        self, problem: Problem, blocks: list[torch.Tensor], statistics: list[SufficientStatistics], weights: AnnealingWeights
    ) -> list[SufficientStatistics]:
        """One EM iteration (module docstring) from the blocks' sums; returns their new sums."""
        model, posterior = problem.model, problem.posterior
        summed = total(statistics).across_ranks()
        self._set_noise_and_prior_scale(problem, summed)
        statistics, summed = sweep(problem.x, posterior, model, blocks, statistics, weights, self.e_step, self.driver, summed)
        scale = self.m_step(model, summed)
        posterior.rescale_latents(scale)
        return [s.rescaled(scale, model.prior.statistic_degree) for s in statistics]

    @torch.no_grad()
    def m_step(self, model, statistics: SufficientStatistics) -> torch.Tensor:
        """Set ``W`` to ``W_old + ω (W* - W_old)`` with its columns normalised; return their norms ``c (H,)``:
        the latents must follow, ``z_h → c_h z_h``.

        For fixed ``q`` the residual is quadratic in ``W`` with its minimum at ``W*``, so
        ``R(W_ω) - R(W*) = (ω - 1)² (R(W_old) - R(W*))``: for ω ∈ (0, 2] the step never lowers the ELBO, and
        ω > 1 extrapolates along the direction EM moves in (over-relaxation, Salakhutdinov & Roweis 2003)."""
        W = closed_forms.optimal_dictionary(statistics.cross, statistics.second_moment)  # W* (D,H)
        if self.m_step_overrelaxation != 1.0:
            W_old = model.W.detach().to(W.dtype)  # unit-norm columns: the gauge the latents are in
            W = W_old + self.m_step_overrelaxation * (W - W_old)
        norms = W.norm(dim=0).clamp_min(torch.finfo(W.dtype).tiny)
        model.set_dictionary((W / norms).to(model.W_raw.dtype))
        return norms

    @staticmethod
    @torch.no_grad()
    def _set_noise_and_prior_scale(problem: Problem, statistics: SufficientStatistics) -> None:
        """The model's σ², λ ← the full-data optima σ²*, λ* of the current W and q."""
        sigma2, lam = statistics.noise_and_prior_scale(problem.model.W.detach(), problem.x.shape[1])
        problem.model.set_noise_and_prior_scale(sigma2.to(problem.x.dtype), lam.to(problem.x.dtype))

    @torch.no_grad()
    def initialise_posteriors(self, problem: Problem, points: torch.Tensor, fresh_scales: bool = True) -> None:
        """The q of the data points ``points`` as at a run's start: the least-squares means of the current W
        (module docstring) and, with ``fresh_scales``, the posterior's initial scales."""
        if fresh_scales:
            problem.posterior.reset_block(points)
        least_squares_start(problem.x, problem.posterior, problem.model.W, self.driver.blocks(points))
