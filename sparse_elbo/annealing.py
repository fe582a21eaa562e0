"""Annealing: weights ``(β_lik, β_prior, β_q)`` on the three ELBO terms as a function of the epoch, and how
the prior's scale is set while ``β_prior > 1`` (docs/design.md §8).

``β = 1`` for every term is the true objective. Weighted values are only ever optimised; results
store the unweighted ELBO and the weights separately.

``prior_scale`` (every schedule): ``optimal`` weights ``H[p(z; λ*)]`` by ``β_prior`` — the literal weighted
objective, which has no maximum while ``β_prior > 1`` (every latent switches off, §8); ``fixed`` holds the
prior's scale at one shared value ``λ_0`` in the weighted prior term while ``β_prior > 1``: a sparser Laplace
model of scale ``λ_0/β_prior``, bounded, with every latent in use. ``λ_0`` is computed once, at a run's start,
by ``initial_prior_scale`` (the training loop calls it) and reaches the E-step and the objectives as
``AnnealingWeights.prior_scale``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import torch

from sparse_elbo import closed_forms, parallel
from sparse_elbo.validation import invalid, require_one_of

TERMS = ("likelihood", "prior", "entropy")
PRIOR_SCALES = ("optimal", "fixed")


@dataclass(frozen=True)
class AnnealingWeights:
    """The weights of one epoch; ``prior_scale``: ``λ_0``, held in the weighted prior term (fixed-scale
    annealing while ``β_prior > 1``), or None: ``λ*``."""

    likelihood: float = 1.0
    prior: float = 1.0
    entropy: float = 1.0
    prior_scale: float | None = None

    @property
    def is_identity(self) -> bool:
        return self.likelihood == 1.0 and self.prior == 1.0 and self.entropy == 1.0


@torch.no_grad()
def initial_prior_scale(x: torch.Tensor, W: torch.Tensor, prior, block_size: int = 16384) -> float:
    """``λ_0``: the mean prior statistic ``|μ_nh|^k`` of the least-squares codes ``μ_n = (WᵀW + εI)⁻¹Wᵀx_n`` of
    the data ``x (N,D)`` at the dictionary ``W (D,H)`` (the statistic of a point mass at μ; ``k`` the prior's
    statistic degree), over every data point and latent: the scale of the codes the run starts from."""
    total = 0.0
    for start in range(0, x.shape[0], block_size):
        codes = closed_forms.least_squares_codes(x[start : start + block_size], W)  # (B,H)
        total += float(codes.abs().pow(prior.statistic_degree).sum())
    if parallel.sharing() is not None:  # the data points of every rank
        total = float(parallel.summed(torch.tensor(total, dtype=torch.float64, device=x.device))[0])
    return total / (parallel.count(x.shape[0]) * W.shape[1])


def _terms(term) -> tuple[str, ...]:
    """``term``: one term's name, or a list of them (weighted alike)."""
    terms = (term,) if isinstance(term, str) else tuple(term)
    if not terms:
        raise invalid("term", f"must name at least one of {list(TERMS)}")
    for name in terms:
        require_one_of("term", name, TERMS)
    return terms


class Schedule(ABC):
    """The contract of an annealing schedule: the weights of each epoch (``weights``), the first epoch from
    which they stay 1 (``final_epoch``; stop rules wait for it), and how λ is set while ``β_prior > 1``
    (``prior_scale``, module docstring)."""

    def __init__(self, prior_scale: str = "optimal"):
        require_one_of("prior_scale", prior_scale, PRIOR_SCALES)
        self.prior_scale = prior_scale

    @abstractmethod
    def weights(self, epoch: int) -> AnnealingWeights:
        """The annealing weights of ``epoch`` (λ's scale left to ``__call__``)."""

    @abstractmethod
    def final_epoch(self) -> int:
        """The first epoch from which the weights stay 1."""

    @property
    def holds_prior_scale(self) -> bool:
        """Whether some epoch holds λ at ``λ_0`` (``prior_scale=fixed`` and an annealed prior term)."""
        return self.prior_scale == "fixed" and any(self.weights(e).prior != 1.0 for e in range(self.final_epoch()))

    def __call__(self, epoch: int, held_scale: float | None = None) -> AnnealingWeights:
        """The weights of ``epoch``; with ``held_scale`` (``λ_0``) and ``prior_scale=fixed``, an epoch with
        ``β_prior > 1`` carries it as ``prior_scale``."""
        weights = self.weights(epoch)
        if held_scale is not None and self.prior_scale == "fixed" and weights.prior != 1.0:
            return replace(weights, prior_scale=float(held_scale))
        return weights


class NoAnnealing(Schedule):
    """All weights 1 at every epoch (``prior_scale`` then never applies)."""

    def weights(self, epoch: int) -> AnnealingWeights:
        return AnnealingWeights()

    def final_epoch(self) -> int:
        """First epoch from which the weights stay 1."""
        return 0


class StepAnnealing(Schedule):
    """``β_term = max(1, start - step · epoch)``.

    The authors' prior annealing for non-amortised natural-image learning is
    ``start=10, step=2`` on the prior: 10, 8, 6, 4, 2, then 1 (``max(1, 2(5 - epoch))``).
    The authors' amortised schedule ``max(1, 2 - 0.1 epoch)`` is ``start=2, step=0.1``.
    """

    def __init__(self, term: str | list[str] = "prior", start: float = 10.0, step: float = 2.0, prior_scale: str = "optimal"):
        super().__init__(prior_scale)
        terms = _terms(term)
        if start < 1:
            raise invalid("start", f"must be >= 1, got {start}")
        if step <= 0:
            raise invalid("step", f"must be > 0, got {step}")
        self.terms, self.start, self.step = terms, float(start), float(step)

    def weights(self, epoch: int) -> AnnealingWeights:
        weight = 1.0 if epoch >= self.final_epoch() else max(1.0, self.start - self.step * epoch)
        return AnnealingWeights(**dict.fromkeys(self.terms, weight))

    def final_epoch(self) -> int:
        """First epoch ``e`` with ``start - step·e ≤ 1`` (checked exactly, not through a rounded ratio)."""
        epoch = max(0, math.floor((self.start - 1.0) / self.step) - 1)
        while self.start - self.step * epoch > 1.0:
            epoch += 1
        return epoch


class TemperatureAnnealing(StepAnnealing):
    """``β_lik = β_prior = β = max(1, start - step · epoch)``, ``β_q = 1``: the ELBO at temperature ``1/β``.

    ``β (E_q[log p(x|z)] + E_q[log p(z)]) + H[q]`` is maximised by the tempered posterior
    ``q ∝ (p(x|z) p(z))^β``: the same modes, narrowed. With λ held at ``λ_0`` while β > 1
    (``prior_scale=fixed``) the schedule starts near MAP sparse coding — as β grows the means tend to
    the codes of ``½||x - Wμ||²/σ² + Σ_h |μ_h|/λ_h`` — and ends at the ELBO (docs/design.md §8)."""

    def __init__(self, start: float = 10.0, step: float = 2.0, prior_scale: str = "optimal"):
        super().__init__(("likelihood", "prior"), start, step, prior_scale)


class ExponentialAnnealing(Schedule):
    """``β_term = 1 + (start - 1) · decay^epoch``, set to exactly 1 once within ``tolerance`` of 1."""

    def __init__(
        self,
        term: str | list[str] = "prior",
        start: float = 10.0,
        decay: float = 0.5,
        tolerance: float = 1e-3,
        prior_scale: str = "optimal",
    ):
        super().__init__(prior_scale)
        terms = _terms(term)
        if start < 1:
            raise invalid("start", f"must be >= 1, got {start}")
        if not 0 < decay < 1:
            raise invalid("decay", f"must be in (0, 1), got {decay}")
        if not tolerance > 0:
            raise invalid("tolerance", f"must be > 0, got {tolerance}")
        self.terms, self.start, self.decay, self.tolerance = terms, float(start), float(decay), float(tolerance)

    def _excess(self, epoch: int) -> float:
        return (self.start - 1.0) * self.decay**epoch

    def weights(self, epoch: int) -> AnnealingWeights:
        weight = 1.0 if epoch >= self.final_epoch() else 1.0 + self._excess(epoch)
        return AnnealingWeights(**dict.fromkeys(self.terms, weight))

    def final_epoch(self) -> int:
        """First epoch whose excess weight ``(start - 1)·decay^e`` is below ``tolerance``."""
        if self.start - 1.0 < self.tolerance:
            return 0
        epoch = max(0, math.floor(math.log(self.tolerance / (self.start - 1.0)) / math.log(self.decay)) - 1)
        while self._excess(epoch) >= self.tolerance:
            epoch += 1
        return epoch
