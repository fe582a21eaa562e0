"""Variational EM on the full data (docs/design.md §7.3): E-steps on the per-data-point posteriors in
blocks, closed-form M-steps for the dictionary.

One EM iteration, on ``Σ`` the sufficient statistics of every block (``inference/statistics.py``):

1. ``σ², λ`` ← their full-data optima ``σ²*, λ*`` of the current W and q;
2. for each block of ``e_step_block_size`` points (the whole data set on CUDA, 16,384 points on a CPU):
   the E-step objective (``e_step``: ``AnalyticEStep`` — the analytic ELBO at those ``σ², λ`` — or
   ``EntropyEStep`` — the full-data ``L_H`` with ``σ²*, λ*`` following the block's q, every other point's
   q fixed) is maximised over the block's posteriors by ``e_step_iterations`` warm-started L-BFGS
   iterations (``inference/e_step.py``), and the block's share of the sums is updated;
3. the M-step: ``W ← W + ω (W* - W)`` with ``W* = (Σ_n x_n μ_nᵀ)(Σ_n μ_n μ_nᵀ + Σ_n)⁻¹`` the maximiser of
   the expected log-likelihood (ω = ``m_step_overrelaxation``; for ω ∈ (0, 2] it never lowers the ELBO),
   then the gauge fix ``W_h → W_h / c_h``, ``z_h → c_h z_h``, ``λ_h → c_h λ_h`` (``c_h = ||W_h||``), which
   leaves the ELBO unchanged.

An epoch is ``em_iterations_per_epoch`` EM iterations (with that epoch's annealing weights), then the
model's ``σ², λ`` are set to the exact full-data optima. Every step is a coordinate ascent, so the ELBO
never decreases while the weights are 1. A new run starts from the least-squares codes of the initial
dictionary, ``μ_n = (WᵀW + εI)⁻¹ Wᵀ x_n`` (ε = 1e-3), so that the first ``σ²*, λ*`` reflect the data's
scale (from ``μ = 0`` prior annealing would switch every latent off at once). The initial dictionary is
``initialisation``'s (``sparse_elbo/initialisation.py``): the model's own random start by default, or the
MAP sparse-coding dictionary learned from it (``trainer/initialisation=sparse_coding``; docs/design.md §7.3).

Annealed epochs (prior weight ``β_prior > 1``): with ``λ = λ*`` the weighted objective has no maximum — a
latent switched off (``μ_·h = 0``, ``s_·h = s``, so ``λ*_h ∝ s``) adds ``(1 - β_prior) log s → +∞`` as
``s → 0`` — so E-steps that converge switch latents off one after another (docs/design.md §8).
``annealed_prior_scale=fixed`` holds ``λ`` at one shared value ``λ_0`` (the mean ``λ*`` of the start's codes)
while ``β_prior > 1`` and uses the analytic E-step there: ``β_prior log p(z; λ_0)`` is, up to a constant, the
log density of a Laplace prior of scale ``λ_0/β_prior``, so an annealed epoch is EM on a sparser model — bounded,
with every latent in use — and the true objective takes over once ``β_prior = 1``. ``optimal`` (the default)
keeps ``λ = λ*`` throughout, the literal weighted objective.

Restarts (``posterior_restarts``): ``end_of_annealing`` starts the first epoch with ``β_prior = 1`` from
fresh posteriors, as a run starts (least-squares means of the current W, the posterior's initial scales);
``every_epoch`` does so at every epoch from then on (without annealing: from epoch 1). The annealed epochs
leave q fitted to a sparser model, and a latent whose λ*_h has shrunk towards 0 cannot come back in EM (its
q is then the prior, so ``λ*_h = E|z_h|`` stays small): the E-steps are partial, so where they start decides
where they end. A restart lowers the ELBO for the first E-steps of its epoch; the epoch's EM iterations then
refit q (docs/design.md §8).

Epoch subsets (``epoch_subset_size``; docs/design.md §7.3): each epoch's EM runs on a random subset of that
many points — one subset for the annealed epochs, a fresh one with fresh q at every later epoch — with the
subset's own sums, σ²* and λ*. The run ends with ``W`` the mean of the last ``average_last_epochs`` epochs' W
and every posterior fitted at it (the O(N·H²) Newton fit for diagonal q), so its final ELBO is
``max_q L_H(W)`` over all the data; until then an epoch's record covers its subset (``evaluated_points``).

Stop rule: the relative change of the ELBO over an epoch below ``relative_tolerance`` (0: never), once
the annealing weights are 1; or ``max_epochs``. With ``train_dictionary=false`` the M-step is left out:
block coordinate ascent on the posteriors (and σ², λ) at a fixed dictionary — with the entropy E-step,
``max_q L_H`` at that W in O(N·H²) per iteration for diagonal posteriors (``evaluation.score_dictionary``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sparse_elbo import closed_forms
from sparse_elbo.annealing import AnnealingWeights
from sparse_elbo.errors import ConfigError
from sparse_elbo.inference.e_step import AnalyticEStep, BlockContext, BlockLBFGS, EStepObjective
from sparse_elbo.inference.statistics import CPU_BLOCK_SIZE, SufficientStatistics, block_size, total
from sparse_elbo.initialisation import RandomDictionary, start_dictionary
from sparse_elbo.problem import Problem
from sparse_elbo.trainers.base import Capabilities, NoState, Sizes, Trainer
from sparse_elbo.trainers.convergence import StopRule
from sparse_elbo.trainers.fixed_point import FixedPointPosteriorTrainer
from sparse_elbo.validation import require_at_least, require_one_of

ANNEALED_PRIOR_SCALES = ("optimal", "fixed")
POSTERIOR_RESTARTS = ("never", "end_of_annealing", "every_epoch")


@dataclass
class EMState:
    annealing_scale: float | None = None  # λ_0 of the annealed epochs (annealed_prior_scale=fixed)
    recent_dictionaries: list[torch.Tensor] = field(default_factory=list)  # W (D,H) after each of the last epochs

    def state_dict(self) -> dict:
        return {"annealing_scale": self.annealing_scale, "recent_dictionaries": [W.cpu() for W in self.recent_dictionaries]}


class EMTrainer(Trainer):
    capabilities = Capabilities(families=("diag", "full"), objectives=("entropy",), annealing=True)

    def __init__(
        self,
        max_epochs: int = 10,
        em_iterations_per_epoch: int = 1,
        e_step: EStepObjective = AnalyticEStep(),
        e_step_iterations: int = 100,
        e_step_max_evaluations: int | None = None,
        e_step_block_size: int | None = None,
        history_size: int = 20,
        e_step_tolerance: float = 1e-9,
        m_step_overrelaxation: float = 1.0,
        relative_tolerance: float = 0.0,
        train_dictionary: bool = True,
        annealed_prior_scale: str = "optimal",
        posterior_restarts: str = "never",
        epoch_subset_size: int | None = None,
        average_last_epochs: int = 1,
        initialisation=None,
    ):
        require_at_least(
            "trainer",
            1,
            max_epochs=max_epochs,
            em_iterations_per_epoch=em_iterations_per_epoch,
            **({} if e_step_block_size is None else {"e_step_block_size": e_step_block_size}),
        )
        if not 0 < m_step_overrelaxation <= 2:
            raise ConfigError(
                f"trainer.m_step_overrelaxation must be in (0, 2] (beyond 2 the M-step can lower the ELBO), "
                f"got {m_step_overrelaxation}"
            )
        self.max_epochs = int(max_epochs)
        self.em_iterations_per_epoch = int(em_iterations_per_epoch)
        self.e_step = e_step
        self.driver = BlockLBFGS(
            int(e_step_iterations),
            None if e_step_max_evaluations is None else int(e_step_max_evaluations),
            int(history_size),
            float(e_step_tolerance),
        )
        self.e_step_block_size = None if e_step_block_size is None else int(e_step_block_size)
        self.m_step_overrelaxation = float(m_step_overrelaxation)
        self.stop_rule = StopRule(float(relative_tolerance))
        self.train_dictionary = bool(train_dictionary)
        require_one_of("trainer.annealed_prior_scale", annealed_prior_scale, ANNEALED_PRIOR_SCALES)
        self.fixed_annealing_scale = annealed_prior_scale == "fixed"
        require_one_of("trainer.posterior_restarts", posterior_restarts, POSTERIOR_RESTARTS)
        self.posterior_restarts = posterior_restarts
        self.epoch_subset_size = None if epoch_subset_size is None else int(epoch_subset_size)
        self.average_last_epochs = int(average_last_epochs)
        self._check_subsets(float(relative_tolerance))
        self.initialisation = initialisation if initialisation is not None else RandomDictionary()

    def _check_subsets(self, relative_tolerance: float) -> None:
        """Epoch subsets need what their finish relies on: a run of exactly ``max_epochs`` epochs that trains W,
        with the posteriors of each new subset fresh (module docstring)."""
        require_at_least("trainer", 1, average_last_epochs=self.average_last_epochs)
        if self.epoch_subset_size is None:
            if self.average_last_epochs > 1:
                raise ConfigError("trainer.average_last_epochs > 1 needs trainer.epoch_subset_size (a number of points)")
            return
        require_at_least("trainer", 1, epoch_subset_size=self.epoch_subset_size)
        if self.average_last_epochs > self.max_epochs:
            raise ConfigError(
                f"trainer.average_last_epochs must be at most trainer.max_epochs ({self.max_epochs}), got {self.average_last_epochs}"
            )
        needs = {
            "posterior_restarts": (self.posterior_restarts, "every_epoch"),
            "relative_tolerance": (relative_tolerance, 0.0),
            "train_dictionary": (self.train_dictionary, True),
        }
        for key, (value, required) in needs.items():
            if value != required:
                raise ConfigError(f"trainer.epoch_subset_size needs trainer.{key}={required}, got {value}")

    # ----------------------------------------------------------------------------------- the run
    def start(self, problem: Problem, saved: dict | None) -> EMState:
        if saved is None:
            if self.train_dictionary:
                start_dictionary(self.initialisation, problem)
            self.initialise_means(problem)
        saved = saved or {}
        scale = saved.get("annealing_scale")
        if self.fixed_annealing_scale and scale is None:  # a new run, or one saved without λ_0
            scale = self._annealing_scale(problem)
        return EMState(scale, [W.to(problem.model.W.device) for W in saved.get("recent_dictionaries", [])])

    def _annealing_scale(self, problem: Problem) -> float:
        """λ_0: the mean λ* of the current codes over all the data (at a run's start: its least-squares codes)."""
        points = torch.arange(problem.x.shape[0], device=problem.x.device)
        summed = total([self._statistics(problem, index, len(points)) for index in self._blocks(problem, points)])
        _, lam = summed.noise_and_prior_scale(problem.model.W.detach(), problem.x.shape[1])
        return float(lam.mean())

    def _blocks(self, problem: Problem, points: torch.Tensor) -> list[torch.Tensor]:
        """``points`` (indices) in blocks of ``e_step_block_size``."""
        return list(torch.split(points, block_size(problem.x, self.e_step_block_size)))

    @staticmethod
    def _statistics(problem: Problem, index: torch.Tensor, count: int) -> SufficientStatistics:
        return SufficientStatistics.of(problem.x[index], problem.q(index), problem.model.prior, count)

    def uses_subsets(self, problem: Problem) -> bool:
        """Whether the epochs run on subsets: ``epoch_subset_size`` is set and smaller than the data (a subset
        at least the data's size is all of it: EM on every point, the last W kept, no final fit)."""
        return self.epoch_subset_size is not None and self.epoch_subset_size < problem.x.shape[0]

    def epoch_points(self, problem: Problem, epoch: int) -> torch.Tensor:
        """The data points (sorted indices) of ``epoch``'s EM: all, or a random ``epoch_subset_size`` of them —
        one subset for all annealed epochs, a fresh one at every later epoch (drawn from the run's seed and
        the epoch, so a resumed run draws the same)."""
        n, device = problem.x.shape[0], problem.x.device
        if not self.uses_subsets(problem):
            return torch.arange(n, device=device)
        draw = epoch if epoch >= problem.annealing.final_epoch() else 0
        generator = torch.Generator().manual_seed(int(problem.seed) * 1_000_003 + draw)
        return torch.randperm(n, generator=generator)[: self.epoch_subset_size].sort().values.to(device)

    def train_epoch(self, problem: Problem, state: EMState, epoch: int, weights: AnnealingWeights) -> None:
        points = self.epoch_points(problem, epoch)
        if self.restarts_posteriors(problem, epoch):
            self.initialise_posteriors(problem, points)
        blocks = self._blocks(problem, points)
        statistics = [self._statistics(problem, index, len(points)) for index in blocks]
        fixed_scale = state.annealing_scale if self.fixed_annealing_scale and weights.prior != 1.0 else None
        for _ in range(self.em_iterations_per_epoch):
            statistics = self.em_iteration(problem, blocks, statistics, weights, fixed_scale)
        self._set_noise_and_prior_scale(problem, total(statistics))
        if self.uses_subsets(problem) and epoch >= self.max_epochs - self.average_last_epochs:
            state.recent_dictionaries.append(problem.model.W.detach().clone())
            if epoch == self.max_epochs - 1:
                self.finish(problem, state, weights)

    def evaluated_points(self, problem: Problem, epoch: int) -> torch.Tensor | None:
        """With epoch subsets, the epoch's subset (every epoch but the last, which fits every posterior)."""
        if not self.uses_subsets(problem) or epoch == self.max_epochs - 1:
            return None
        return self.epoch_points(problem, epoch)

    @torch.no_grad()
    def finish(self, problem: Problem, state: EMState, weights: AnnealingWeights) -> None:
        """The end of a run on epoch subsets: ``W`` ← the mean of the last ``average_last_epochs`` epochs'
        dictionaries, columns normalised (tail averaging of a stochastic iteration), then every data point's
        posterior — and σ², λ — fitted at that W (``FixedPointPosteriorTrainer``: the O(N·H²) Newton fit for
        diagonal q), so that the run ends at ``max_q L_H(W)`` over all the data."""
        W = torch.stack(state.recent_dictionaries).mean(0)  # (D,H)
        problem.model.set_dictionary(W / W.norm(dim=0).clamp_min(torch.finfo(W.dtype).tiny))
        FixedPointPosteriorTrainer(block_size=self.e_step_block_size).train_epoch(problem, NoState(), 0, weights)

    def working_memory(self, sizes: Sizes) -> int:
        """The posteriors, and one block's L-BFGS memory and (block, H, H) covariance temporaries (with epoch
        subsets, at least the final fit's)."""
        block = min(sizes.n_data, self.e_step_block_size or CPU_BLOCK_SIZE)
        per_point = sizes.posterior_numbers // max(sizes.n_data, 1)
        e_steps = sizes.posterior_numbers + (2 * self.driver.history_size + 8) * block * per_point
        if self.epoch_subset_size is None:
            return e_steps
        return max(e_steps, FixedPointPosteriorTrainer().working_memory(sizes))

    # ----------------------------------------------------------------------------------- one iteration
    def em_iteration(
        self,
        problem: Problem,
        blocks: list[torch.Tensor],
        statistics: list[SufficientStatistics],
        weights: AnnealingWeights,
        fixed_scale: float | None = None,
    ) -> list[SufficientStatistics]:
        """One EM iteration (module docstring) from the blocks' sums; returns their new sums. ``fixed_scale``:
        ``λ`` held at this value and the analytic E-step (an annealed epoch under ``annealed_prior_scale=fixed``)."""
        x, model, posterior = problem.x, problem.model, problem.posterior
        summed = total(statistics)
        self._set_noise_and_prior_scale(problem, summed)
        e_step = self.e_step
        if fixed_scale is not None:
            with torch.no_grad():
                model.log_lambda.fill_(math.log(fixed_scale))
            e_step = AnalyticEStep()
        statistics = list(statistics)
        for b, index in enumerate(blocks):
            others = summed - statistics[b]
            context = BlockContext(others, statistics[b].x_energy)
            block_loss = e_step.block_loss(x[index], posterior, model, weights, context)
            block = self.driver.optimise(posterior, index, model, block_loss)
            statistics[b] = SufficientStatistics.of(
                x[index], posterior.gaussian(block), model.prior, statistics[b].count, statistics[b].x_energy
            )
            summed = others + statistics[b]
        if not self.train_dictionary:
            return statistics
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

    def restarts_posteriors(self, problem: Problem, epoch: int) -> bool:
        """Whether ``epoch`` starts from fresh posteriors (``posterior_restarts``; module docstring): the first
        epoch after annealing, or every epoch from then on (without annealing: every epoch after the first;
        epoch 0 starts fresh anyway)."""
        first_unannealed = problem.annealing.final_epoch()
        if self.posterior_restarts == "never" or epoch == 0:
            return False
        return epoch == first_unannealed or (self.posterior_restarts == "every_epoch" and epoch > first_unannealed)

    @torch.no_grad()
    def initialise_posteriors(self, problem: Problem, points: torch.Tensor) -> None:
        """The q of the data points ``points`` as at a run's start: the posterior's initial scales and the
        least-squares means."""
        problem.posterior.reset_block(points)
        self.initialise_means(problem, points)

    @torch.no_grad()
    def initialise_means(self, problem: Problem, points: torch.Tensor | None = None) -> None:
        """``μ_n = (WᵀW + εI)⁻¹ Wᵀ x_n`` (ε = 1e-3) for the current W (module docstring), for the data points
        ``points`` (all when None)."""
        W = problem.model.W  # (D,H)
        points = torch.arange(problem.x.shape[0], device=problem.x.device) if points is None else points
        for index in self._blocks(problem, points):
            block = problem.posterior.block_parameters(index)
            block["mean"] = closed_forms.least_squares_codes(problem.x[index], W)
            problem.posterior.write_block(index, block)
