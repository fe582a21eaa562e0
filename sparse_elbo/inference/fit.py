"""Fitting posteriors at a fixed dictionary, in one place: what learning and encoding share (as scikit-learn's
``sparse_encode`` serves both dictionary learning and ``transform``; docs/design.md §6).

- ``posterior_fit``: the fit of every ``q_n`` — and of ``σ², λ``, which follow q as ``σ²*, λ*`` — at a
  dictionary ``W``, chosen by (posterior family, prior) from ``registry.POSTERIOR_FITS``: the O(N·H²)
  diagonal Newton fit (diagonal q, Laplace prior; §6.4), the fixed-point fit (full or diagonal
  covariances, any prior; §6.3), else ``BlockFit``, the generic default for any per-data-point family
  (sweeps of the entropy E-step, §6.2). Every fit follows ``PosteriorFit``: ``run``, its ``state`` for a
  warm start, ``write_to`` a posterior and model.
- ``fit_posteriors``: that fit at a model's W, written back (the end of EM on epoch subsets, the ground truth).
- ``fit_at_dictionary`` / ``score_dictionary``: fresh posteriors fitted at any ``W``; ``max_q L_H(W)``.
- ``refine`` / ``fit_new_data``: the E-step at fixed ``W, σ², λ`` (L-BFGS on the analytic ELBO, block by
  block): held-out posteriors and the encoding of new data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from sparse_elbo import closed_forms, parallel
from sparse_elbo.annealing import AnnealingWeights
from sparse_elbo.config import posterior_family
from sparse_elbo.inference import diagonal_newton, fixed_point  # noqa: F401  (they register their fits)
from sparse_elbo.inference.e_step import AnalyticEStep, BlockLBFGS, EntropyEStep, sweep
from sparse_elbo.inference.registry import POSTERIOR_FITS
from sparse_elbo.inference.statistics import SufficientStatistics, total
from sparse_elbo.model import ModelAt, SparseCodingModel
from sparse_elbo.objectives import EntropyELBO, exact_value
from sparse_elbo.priors import LaplacePrior
from sparse_elbo.validation import require_at_least


class PosteriorFit(Protocol):
    """The protocol every fixed-dictionary fit follows; ``value``: ``L_H`` of the current q (after a run)."""

    value: torch.Tensor | None

    def set_dictionary(self, W: torch.Tensor) -> None: ...

    def run(self, max_iterations: int, tolerance: float, line_search_steps: int) -> bool: ...

    def state(self) -> tuple: ...

    def load_state(self, state: tuple) -> None: ...

    def dictionary_gradient(self, W: torch.Tensor) -> torch.Tensor: ...

    def write_to(self, posterior, model) -> None: ...


@dataclass
class FitSettings:
    """How a fixed-dictionary fit runs: at most ``max_iterations`` iterations, stopping once ``L_H`` changes by
    less than ``tolerance · max(1, |L_H|)`` per iteration; ``line_search_steps`` Armijo halvings of each point's
    Newton step; ``block_size`` points per block (None: all on CUDA, 16,384 on a CPU)."""

    max_iterations: int = 1000
    tolerance: float = 1e-12
    line_search_steps: int = 30
    block_size: int | None = None

    def __post_init__(self):
        require_at_least(1, max_iterations=self.max_iterations, line_search_steps=self.line_search_steps)
        require_at_least(1, block_size=self.block_size)
        require_at_least(0, tolerance=self.tolerance)


@torch.no_grad()
def least_squares_start(x: torch.Tensor, posterior, W: torch.Tensor, blocks: list[torch.Tensor]) -> None:
    """``μ_n = (WᵀW + εI)⁻¹ Wᵀ x_n`` (ε = 1e-3) for the data points of ``blocks`` (a fit's and EM's start)."""
    for index in blocks:
        block = posterior.block_parameters(index)
        block["mean"] = closed_forms.least_squares_codes(x[index], W)
        posterior.write_block(index, block)


class BlockFit:
    """The generic fit for any per-data-point family: from the least-squares means, sweeps of the entropy
    E-step (each block's q by L-BFGS on the full-data ``L_H``, every other point's q fixed; ``σ²*, λ*`` from the
    sums after each sweep) until ``L_H`` settles. It works in ``posterior`` itself."""

    def __init__(self, x: torch.Tensor, W: torch.Tensor, prior, posterior, block_size: int | None = None, iterations: int = 20):
        self.x, self.prior, self.posterior, self.value = x, prior, posterior, None
        self.driver = BlockLBFGS(iterations=iterations, tolerance=0.0, block_size=block_size)
        self.blocks = self.driver.blocks(torch.arange(x.shape[0], device=x.device))
        self.set_dictionary(W)
        self.count = parallel.count(x.shape[0])  # data points over every rank
        least_squares_start(x, posterior, W, self.blocks)
        self.statistics = [self._sums(index) for index in self.blocks]
        self.sigma2, self.lam = total(self.statistics).across_ranks().noise_and_prior_scale(W, x.shape[1])

    def _sums(self, index: torch.Tensor) -> SufficientStatistics:
        return SufficientStatistics.of(self.x[index], self.posterior(index), self.prior, self.count)

    def set_dictionary(self, W: torch.Tensor) -> None:
        self.W = W

    def state(self) -> tuple:
        """Nothing beyond the posterior's own parameters (its ``state_dict``)."""
        return ()

    def load_state(self, state: tuple) -> None:
        self.statistics = [self._sums(index) for index in self.blocks]

    def run(self, max_iterations: int, tolerance: float, line_search_steps: int = 0) -> bool:
        tolerance = max(tolerance, 100.0 * torch.finfo(self.x.dtype).eps)
        previous = None
        for _ in range(max_iterations):
            model = ModelAt(self.W, self.sigma2.to(self.x.dtype), self.lam.to(self.x.dtype), self.prior)
            self.statistics, summed = sweep(
                self.x, self.posterior, model, self.blocks, self.statistics, AnnealingWeights(), EntropyEStep(), self.driver
            )
            self.sigma2, self.lam = summed.noise_and_prior_scale(self.W, self.x.shape[1])
            self.value = exact_value(EntropyELBO(), self.x, lambda index: self.posterior(index), model).elbo
            value = float(self.value)
            if previous is not None and abs(value - previous) <= tolerance * max(1.0, abs(value)):
                return True
            previous = value
        return False

    def dictionary_gradient(self, W: torch.Tensor) -> torch.Tensor:
        """``∂(N L_H)/∂W = (C - W S)/σ²*`` at the current q."""
        summed = total(self.statistics).across_ranks()
        return closed_forms.dictionary_gradient(summed.cross, summed.second_moment, W.to(summed.cross.dtype), self.sigma2).to(
            W.dtype
        )

    @torch.no_grad()
    def write_to(self, posterior, model) -> None:
        if posterior is not self.posterior:
            posterior.load_state_dict(self.posterior.state_dict())
        model.set_noise_and_prior_scale(self.sigma2.to(self.x.dtype), self.lam.to(self.x.dtype))


def fit_memory(n_data: int, n_latents: int, posterior_numbers: int) -> int:
    """A lower bound on the numbers a fit holds beyond the data: the posteriors and the diagonal Newton fit's
    (N,H) temporaries (diagonal posteriors hold 2 N H numbers), or the fixed-point fit's (N,H,H) arrays."""
    per_point = n_latents if posterior_numbers <= 2 * n_data * n_latents else n_latents**2
    return posterior_numbers + 16 * n_data * per_point


def posterior_fit(x: torch.Tensor, W: torch.Tensor, posterior, prior, block_size: int | None = None) -> PosteriorFit:
    """The fit of every posterior of ``posterior``'s family for data ``x (N,D)`` at the dictionary ``W (D,H)``
    (module docstring), started from the least-squares codes."""
    factory = POSTERIOR_FITS.lookup(posterior, prior) or BlockFit
    return factory(x, W, prior, posterior, block_size)


@torch.no_grad()
def fit_posteriors(x: torch.Tensor, posterior, model, settings: FitSettings | None = None) -> bool:
    """Fit every ``q_n`` of ``posterior`` for the data ``x`` at the model's W, and set the model's ``σ², λ`` to
    ``σ²*, λ*``; returns whether the fit converged (else it reached ``settings.max_iterations``)."""
    settings = settings or FitSettings()
    fit = posterior_fit(x, model.W.detach(), posterior, model.prior, settings.block_size)
    converged = fit.run(settings.max_iterations, settings.tolerance, settings.line_search_steps)
    fit.write_to(posterior, model)
    return converged


def fit_at_dictionary(x: torch.Tensor, W: torch.Tensor, family, prior, settings: FitSettings | None = None, seed: int = 0):
    """Fresh posteriors of ``family`` (a family's name, class or ``posterior=`` factory) for the data
    ``x (N,D)``, and σ², λ, fitted with the dictionary fixed to ``W (D,H)`` (columns normalised, the gauge absorbed
    by λ)  ->  (model, posterior, converged)."""
    n_observed, n_latents = W.shape
    model = SparseCodingModel(
        n_observed, n_latents, prior=prior, gauge="unit_norm", generator=torch.Generator().manual_seed(seed)
    )
    model = model.to(device=x.device, dtype=x.dtype)
    model.set_dictionary(W.to(device=x.device, dtype=x.dtype))
    factory = posterior_family(family, per_data_point=True) if isinstance(family, str) else family
    posterior = factory(n_data=x.shape[0], n_latents=n_latents, n_observed=n_observed).to(device=x.device, dtype=x.dtype)
    converged = fit_posteriors(x, posterior, model, settings)
    return model, posterior, converged


@dataclass
class DictionaryScore:
    """``max_q L_H`` of a dictionary on data (nats per data point) and the σ²*, λ* (H,) it comes with."""

    elbo: float
    sigma2: float
    lam: torch.Tensor


def score_dictionary(
    x, W, prior=None, family="diag", max_iterations: int = 1000, tolerance: float = 1e-9, block_size: int | None = None
) -> DictionaryScore:
    """How well a dictionary ``W (D,H)`` explains the data ``x (N,D)``: ``max_{q, σ², λ} L_H`` with W fixed.

    ``family``: the posteriors' family (a name in ``configs/posterior``, or a class). Diagonal posteriors under
    the Laplace prior: coordinate ascent with Newton steps, O(N·H²) per iteration, in blocks of ``block_size``
    points (None: all on CUDA, 16,384 on a CPU) (docs/design.md §6.4); full covariances: the fixed-point fit
    (§6.3). It stops once L_H changes by less than ``tolerance`` (relative, floored at a hundred rounding units
    of x's dtype) per iteration. x, W: tensors (their device and dtype are used) or arrays (float64 on the CPU)."""
    x = torch.as_tensor(x, dtype=torch.float64) if not torch.is_tensor(x) else x
    W = torch.as_tensor(W, dtype=x.dtype, device=x.device)
    settings = FitSettings(max_iterations, tolerance, block_size=block_size)
    model, posterior, _ = fit_at_dictionary(x, W, family, prior or LaplacePrior(), settings)
    value = exact_value(EntropyELBO(), x, lambda index: posterior.q(x, index), model)
    return DictionaryScore(float(value.elbo), float(value.sigma2), value.lam.detach())


def refine(x: torch.Tensor, posterior, model, driver: BlockLBFGS):
    """Maximise the analytic ELBO at the model's ``W, σ², λ`` over each ``q_n`` of a per-data-point posterior
    for data ``x`` (modified in place): the E-step of EM with W, σ², λ fixed — ``driver`` (L-BFGS) on the summed
    ELBO, block by block, since the problem separates across data points."""
    e_step, weights = AnalyticEStep(), AnnealingWeights()
    for index in driver.blocks(torch.arange(x.shape[0], device=x.device)):
        driver.optimise(posterior, index, model, e_step.block_loss(x[index], posterior, model, weights))
    return posterior


def fit_new_data(x: torch.Tensor, posterior, model, iterations: int = 200, block_size: int = 4096):
    """Per-data-point posteriors of the data ``x (N,D)`` under the model's fixed ``W, σ², λ``, of the family
    of ``posterior`` (an amortised one starts from the encoder's output, a low-rank one as a full
    covariance), refined by ``iterations`` L-BFGS iterations per block of ``block_size`` rows (0: the start)."""
    new = posterior.per_data_point(x)
    if not posterior.amortized:
        # A fresh q starts at s_h = min(init_std, λ_h): a latent the model has switched off (λ_h ≈ 1e-5)
        # would otherwise start ~1e4 nats from its optimum, and the block's shared L-BFGS line search
        # stalls on it (docs/experiments.md).
        with torch.no_grad():
            new.rescale_latents(torch.clamp(model.lam.detach() / new.init_std, max=1.0))
    if iterations > 0:
        refine(x, new, model, BlockLBFGS(iterations, None, 20, 1e-12, block_size))
    return new
