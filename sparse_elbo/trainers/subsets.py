"""Variational EM on epoch subsets with tail averaging and a final fit (``trainer=em_subsets``; docs/design.md
§7.3): EM (``trainers/em.py``) extended.

Each epoch's EM runs on a random subset of ``subset_size`` data points — one subset for the annealed epochs,
a fresh one with fresh posteriors (least-squares means, initial scales) at every later epoch — with the
subset's own sums, σ²* and λ*. Subsets are drawn from the run's seed and the epoch, so a resumed run draws
the same. The run ends with ``W`` the mean of the last ``average_last_epochs`` epochs' dictionaries (tail
averaging of a stochastic iteration), columns normalised, and every data point's posterior — and σ², λ —
fitted at that W (``inference.fit.fit_posteriors``: the O(N·H²) Newton fit for diagonal q), so its final
ELBO is ``max_q L_H`` over all the data; until then an epoch's record covers its subset
(``evaluated_points``). The run has exactly ``max_epochs`` epochs (no stop rule: the subsets' ELBOs are not
comparable from epoch to epoch). A subset at least the data's size (or ``subset_size=None``) is all of it: EM
on every point with fresh posteriors at every epoch after annealing, the last W kept, no final fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparse_elbo import parallel
from sparse_elbo.annealing import AnnealingWeights
from sparse_elbo.inference.e_step import AnalyticEStep, BlockLBFGS, EStepObjective
from sparse_elbo.inference.fit import FitSettings, fit_memory, fit_posteriors
from sparse_elbo.initialisation import DictionaryStart
from sparse_elbo.problem import Problem
from sparse_elbo.trainers.base import Sizes
from sparse_elbo.trainers.em import EMTrainer
from sparse_elbo.trainers.restarts import RestartEveryEpoch
from sparse_elbo.validation import invalid, require_at_least


@dataclass
class SubsetState:
    recent_dictionaries: list[torch.Tensor] = field(default_factory=list)  # W (D,H) after each of the last epochs

    def state_dict(self) -> dict:
        return {"recent_dictionaries": [W.cpu() for W in self.recent_dictionaries]}


class EpochSubsetEM(EMTrainer):
    def __init__(
        self,
        max_epochs: int = 16,
        subset_size: int | None = 40960,
        average_last_epochs: int = 4,
        em_iterations_per_epoch: int = 1,
        e_step: EStepObjective = AnalyticEStep(),
        driver: BlockLBFGS | None = None,
        m_step_overrelaxation: float = 1.0,
        initialisation: DictionaryStart | None = None,
    ):
        super().__init__(
            max_epochs, em_iterations_per_epoch, e_step, driver, m_step_overrelaxation, 0.0, RestartEveryEpoch(), initialisation
        )
        self.stop_rule = None  # exactly max_epochs epochs
        require_at_least(1, subset_size=subset_size, average_last_epochs=average_last_epochs)
        if average_last_epochs > max_epochs:
            raise invalid("average_last_epochs", f"must be at most max_epochs ({max_epochs}), got {average_last_epochs}")
        self.subset_size = None if subset_size is None else int(subset_size)
        self.average_last_epochs = int(average_last_epochs)

    def start(self, problem: Problem, saved: dict | None) -> SubsetState:
        super().start(problem, saved)
        return SubsetState([W.to(problem.model.W.device) for W in (saved or {}).get("recent_dictionaries", [])])

    def uses_subsets(self, problem: Problem) -> bool:
        return self.subset_size is not None and self.subset_size < parallel.count(problem.x.shape[0])

    def epoch_points(self, problem: Problem, epoch: int) -> torch.Tensor:
        """The data points (sorted indices) of ``epoch``'s EM (module docstring): drawn from the indices of the
        whole data set, of which a rank of a data-parallel run keeps its own (``parallel.mine``)."""
        n, device = problem.x.shape[0], problem.x.device
        if not self.uses_subsets(problem):
            return torch.arange(n, device=device)
        draw = epoch if epoch >= problem.annealing.final_epoch() else 0
        generator = torch.Generator().manual_seed(int(problem.seed) * 1_000_003 + draw)
        drawn = torch.randperm(parallel.count(n), generator=generator)[: self.subset_size].sort().values
        return parallel.mine(drawn, n).to(device)

    def train_epoch(self, problem: Problem, state: SubsetState, epoch: int, weights: AnnealingWeights) -> None:
        points = self.epoch_points(problem, epoch)
        if self.restarts(epoch, problem.annealing.final_epoch()):
            self.initialise_posteriors(problem, points)
        self.run_em(problem, points, weights)
        if self.uses_subsets(problem) and epoch >= self.max_epochs - self.average_last_epochs:
            state.recent_dictionaries.append(problem.model.W.detach().clone())
            if epoch == self.max_epochs - 1:
                self.finish(problem, state)

    def evaluated_points(self, problem: Problem, epoch: int) -> torch.Tensor | None:
        """The epoch's subset (every epoch but the last, which fits every posterior)."""
        if not self.uses_subsets(problem) or epoch == self.max_epochs - 1:
            return None
        return self.epoch_points(problem, epoch)

    @torch.no_grad()
    def finish(self, problem: Problem, state: SubsetState) -> None:
        """W ← the mean of the recent dictionaries, columns normalised; every posterior fitted at it."""
        W = torch.stack(state.recent_dictionaries).mean(0)  # (D,H)
        problem.model.set_dictionary(W / W.norm(dim=0).clamp_min(torch.finfo(W.dtype).tiny))
        fit_posteriors(problem.x, problem.posterior, problem.model, FitSettings(block_size=self.driver.block_size))

    def working_memory(self, sizes: Sizes) -> int:
        """EM's, or the final fit's when larger."""
        return max(super().working_memory(sizes), fit_memory(sizes.n_data, sizes.n_latents, sizes.posterior_numbers))
