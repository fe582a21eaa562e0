"""How a minibatch trainer estimates the entropy objective's ``σ²*, λ*`` (``trainer/statistics``; docs/design.md
§3, §7.5). They are data-set averages; a step on a minibatch needs them all the same.

- ``FullDataStatistics`` (default): the per-data-point statistics ``r_n = ||x_n - Wμ_n||² + tr(WᵀWΣ_n)`` and
  ``t_nh = E|z_h|`` are stored for every data point (recomputed exactly at the start of every
  ``refresh_every``-th epoch, and each batch's rows replaced by their new values as it passes), so that
  ``σ²* = mean_n r_n / D`` and ``λ* = mean_n t_n`` are full-data values. The batch enters as
  ``S = S_full + (mean_B s - stopgrad(mean_B s))``: the value is the full-data statistic and the gradient the
  batch estimate of its gradient, so the step is the minibatch estimate of the gradient of the full-data
  ``L_H`` (unbiased up to the staleness of the other rows: at most one epoch when every epoch starts with a
  refresh, at most one epoch plus the batches since the last pass without it — the refresh is an encoder
  pass over all data, about a third of an epoch's matrix products).
- ``BatchStatistics``: ``σ²*, λ*`` from the minibatch alone — what the authors' code does (biased; kept for
  reproduction).

Objectives that learn σ², λ as parameters need neither (``store`` is then None). Whatever the estimator, the
values reported after each epoch are the exact full-data ones.
"""

from __future__ import annotations

from typing import Protocol

import torch

from sparse_elbo import parallel
from sparse_elbo.inference.statistics import data_blocks
from sparse_elbo.objectives import DataStatistics
from sparse_elbo.problem import Problem
from sparse_elbo.validation import require_at_least


class StatisticsEstimate(Protocol):
    """How a step estimates ``σ²*, λ*``: the store it keeps (or None), whether checkpoints keep its rows, and
    what happens before each epoch."""

    saves_rows: bool

    def store(self, problem: Problem) -> StatisticsStore | None: ...

    def before_epoch(self, store: StatisticsStore | None, epoch: int) -> None: ...


class StatisticsStore:
    """Per-data-point ``r_n (N,)`` and ``t_n (N,H)`` with their running sums. Data-parallel (``parallel.py``):
    each rank stores its shard's rows, and the sums (the only thing a step reads) are over every rank's."""

    def __init__(self, problem: Problem, block_size: int):
        self.problem, self.block_size = problem, block_size
        n, H = problem.x.shape[0], problem.model.n_latents
        self.residual = problem.x.new_zeros(n)  # r (N_rank,)
        self.prior_statistic = problem.x.new_zeros(n, H)  # t (N_rank,H)
        self.n_all = parallel.count(n)  # N: the data points of every rank
        self.filled = False  # rows hold values (after a refresh or a load)

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute every row exactly for the current W and q."""
        problem = self.problem
        for index in data_blocks(problem.x.shape[0], self.block_size, problem.x.device):
            r, t = problem.objective.batch_statistics(problem.x[index], problem.q(index), problem.model)
            self.residual[index], self.prior_statistic[index] = r, t
        self._sum_rows()

    def _sum_rows(self) -> None:
        self.residual_sum = parallel.total(self.residual.sum())
        self.prior_sum = parallel.total(self.prior_statistic.sum(0))
        self.filled = True

    def load(self, residual: torch.Tensor, prior_statistic: torch.Tensor) -> None:
        """Rows saved by a checkpoint."""
        self.residual.copy_(residual)
        self.prior_statistic.copy_(prior_statistic)
        self._sum_rows()

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.residual, self.prior_statistic

    def means(self) -> DataStatistics:
        """The full-data means of the stored rows (no gradient)."""
        n = self.n_all
        return DataStatistics(residual=self.residual_sum / n, prior_statistic=self.prior_sum / n)

    def statistics(self, index: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> DataStatistics:
        """Full-data means with the batch's rows replaced by ``r (B,), t (B,H)`` (which carry gradients):
        value = full-data mean, gradient = that of the batch mean. Stores the new rows."""
        n = self.n_all
        with torch.no_grad():
            if parallel.sharing() is None:
                self.residual_sum = self.residual_sum - self.residual[index].sum() + r.detach().sum()
                self.prior_sum = self.prior_sum - self.prior_statistic[index].sum(0) + t.detach().sum(0)
            else:  # the rows every rank replaced (one all-reduce)
                r_change = r.detach().sum() - self.residual[index].sum()
                t_change = t.detach().sum(0) - self.prior_statistic[index].sum(0)
                r_change, t_change = (part.to(r.dtype) for part in parallel.summed(r_change, t_change))
                self.residual_sum, self.prior_sum = self.residual_sum + r_change, self.prior_sum + t_change
            self.residual[index], self.prior_statistic[index] = r.detach(), t.detach()
        return DataStatistics(
            residual=self.residual_sum / n + parallel.batch_mean_change(r),
            prior_statistic=self.prior_sum / n + parallel.batch_mean_change(t),
        )


class FullDataStatistics:
    """Full-data ``σ²*, λ*`` from stored per-point rows (module docstring); ``block_size``: points per block of
    a refresh; ``refresh_every``: epochs between refreshes (0: only the first)."""

    def __init__(self, block_size: int = 16384, refresh_every: int = 1):
        require_at_least(1, block_size=block_size)
        require_at_least(0, refresh_every=refresh_every)
        self.block_size, self.refresh_every = int(block_size), int(refresh_every)

    def store(self, problem: Problem) -> StatisticsStore | None:
        """The store, where the objective uses ``σ²*, λ*`` (the entropy objective)."""
        return None if problem.objective.learns_noise_and_prior_scale else StatisticsStore(problem, self.block_size)

    @property
    def saves_rows(self) -> bool:
        """Whether checkpoints keep the rows (when not every epoch refreshes them)."""
        return self.refresh_every != 1

    def before_epoch(self, store: StatisticsStore | None, epoch: int) -> None:
        every = self.refresh_every
        if store is not None and (not store.filled or (every > 0 and epoch % every == 0)):
            store.refresh()


class BatchStatistics:
    """``σ²*, λ*`` of each minibatch alone (module docstring)."""

    saves_rows = False

    def store(self, problem: Problem) -> None:
        return None

    def before_epoch(self, store, epoch: int) -> None:
        pass
