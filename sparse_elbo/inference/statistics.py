"""Data blocks and sufficient statistics (docs/design.md §6.1).

A pass over the data in blocks of points keeps memory bounded. For a set of data points and their
posteriors, the sums

    x_energy = Σ_n ||x_n||²,  cross = Σ_n x_n μ_nᵀ (D,H),  second_moment = Σ_n (μ_n μ_nᵀ + Σ_n) (H,H),
    prior = Σ_n t_n (H,)   (the prior's statistic, E|z| for Laplace)

give the full-data ``σ²*``, ``λ*`` and the closed-form dictionary for *any* W
(``closed_forms.expected_residual_from_sums``, ``closed_forms.optimal_dictionary``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_elbo import closed_forms, parallel
from sparse_elbo.data import squared_residual
from sparse_elbo.parallel import summed

# On a CPU, blocks of 16,384 points keep every (block, H) temporary of the E-step below glibc's 32 MiB
# mmap threshold, so freed buffers are reused instead of being returned to the kernel and page-faulted
# back in at every L-BFGS evaluation. CUDA's caching allocator has no such cost.
CPU_BLOCK_SIZE = 16384


def block_size(x: torch.Tensor, requested: int | None) -> int:
    """``requested``, or when it is None the whole data set on CUDA (when it is in the device's memory, not
    left in its file) and 16,384 points on a CPU."""
    if requested is not None:
        return requested
    return x.shape[0] if x.is_cuda and torch.is_tensor(x) else CPU_BLOCK_SIZE


def data_blocks(n: int, size: int, device) -> list[torch.Tensor]:
    """Consecutive index blocks covering ``0..n-1``."""
    return [torch.arange(start, min(start + size, n), device=device) for start in range(0, n, size)]


@dataclass
class SufficientStatistics:
    """Sums over a set of data points (float64); ``count`` is N of the whole data set (module docstring)."""

    x_energy: torch.Tensor
    cross: torch.Tensor
    second_moment: torch.Tensor
    prior: torch.Tensor
    count: int

    @classmethod
    @torch.no_grad()
    def of(cls, x: torch.Tensor, q, prior, count: int, x_energy: torch.Tensor | None = None) -> SufficientStatistics:
        """The sums of the data points ``x (B,D)`` with Gaussians ``q`` (``x_energy``: their Σ||x||², when
        known — it never changes). Products in the data's dtype, sums accumulated in float64."""
        f64 = torch.float64
        return cls(
            x.pow(2).sum(dtype=f64) if x_energy is None else x_energy,
            (x.T @ q.mean).to(f64),  # (D,H)
            (q.mean.T @ q.mean + q.covariance_sum()).to(f64),  # (H,H)
            prior.statistic(q.mean, q.variance).sum(0, dtype=f64),  # (H,)
            count,
        )

    def residual(self, W: torch.Tensor) -> torch.Tensor:
        """``Σ_n E||x_n - W z||²`` for the dictionary ``W (D,H)``."""
        return closed_forms.expected_residual_from_sums(self.x_energy, self.cross, self.second_moment, W.to(self.cross.dtype))

    def noise_and_prior_scale(self, W: torch.Tensor, n_observed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``σ²*`` and ``λ*`` (H,) of these sums (taken as the whole data set's) at the dictionary W."""
        sigma2 = closed_forms.optimal_sigma2(self.residual(W), n_observed, self.count)
        return sigma2, closed_forms.optimal_lambda(self.prior, self.count)

    def rescaled(self, scale: torch.Tensor, prior_degree: int) -> SufficientStatistics:
        """The sums after the gauge change ``z_h → c_h z_h`` (``t(c z) = c^degree t(z)``)."""
        scale = scale.to(self.cross.dtype)
        return SufficientStatistics(
            self.x_energy,
            self.cross * scale,
            self.second_moment * torch.outer(scale, scale),
            self.prior * scale**prior_degree,
            self.count,
        )

    def across_ranks(self) -> SufficientStatistics:
        """The sums over the data points of every rank (``parallel.summed``: one all-reduce; these sums
        themselves in a single process)."""
        x_energy, cross, second_moment, prior = summed(self.x_energy, self.cross, self.second_moment, self.prior)
        return SufficientStatistics(x_energy, cross, second_moment, prior, self.count)

    def _combine(self, other: SufficientStatistics, sign: float) -> SufficientStatistics:
        return SufficientStatistics(
            self.x_energy + sign * other.x_energy,
            self.cross + sign * other.cross,
            self.second_moment + sign * other.second_moment,
            self.prior + sign * other.prior,
            self.count,
        )

    def __add__(self, other: SufficientStatistics) -> SufficientStatistics:
        return self._combine(other, 1.0)

    def __sub__(self, other: SufficientStatistics) -> SufficientStatistics:
        return self._combine(other, -1.0)


def total(statistics) -> SufficientStatistics:
    """The sum of a sequence of block statistics."""
    statistics = list(statistics)
    return sum(statistics[1:], statistics[0])


@torch.no_grad()
def start_scales(x: torch.Tensor, codes: torch.Tensor, W: torch.Tensor, statistic: torch.Tensor):
    """σ², λ of a fit's start from the least-squares ``codes (N,H)`` of ``x (N,D)`` at ``W (D,H)``: σ² the codes'
    mean squared residual plus 10⁻³ of the data's mean square (the residual is 0 where H ≥ D), λ the mean of the
    prior ``statistic (N,H)`` of the codes — over the data points of every rank (``parallel.Ranks.sharing``)."""
    tiny = torch.finfo(x.dtype).tiny
    if parallel.sharing() is None and torch.is_tensor(x):
        return (x - codes @ W.T).pow(2).mean() + 1e-3 * x.pow(2).mean(), statistic.mean(0).clamp_min(tiny)
    residual, energy, total_statistic = summed(*squared_residual(x, codes, W), statistic.sum(0))  # rows in a file too
    n = parallel.count(x.shape[0])
    sigma2 = (residual + 1e-3 * energy) / (n * x.shape[1])
    return sigma2.to(x.dtype), (total_statistic / n).to(x.dtype).clamp_min(tiny)
