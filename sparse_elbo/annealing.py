"""Annealing: weights ``(β_lik, β_prior, β_q)`` on the three ELBO terms as a function of the epoch (docs/design.md §8).

``β = 1`` for every term is the true objective. Weighted values are only ever optimised; results
store the unweighted ELBO and the weights separately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from sparse_elbo.errors import ConfigError
from sparse_elbo.validation import require_one_of

TERMS = ("likelihood", "prior", "entropy")


@dataclass(frozen=True)
class AnnealingWeights:
    likelihood: float = 1.0
    prior: float = 1.0
    entropy: float = 1.0

    @property
    def is_identity(self) -> bool:
        return self.likelihood == 1.0 and self.prior == 1.0 and self.entropy == 1.0


class Schedule(Protocol):
    """The contract of an annealing schedule: the weights of each epoch, and the first epoch from which
    they stay 1 (stop rules wait for it)."""

    def __call__(self, epoch: int) -> AnnealingWeights: ...

    def final_epoch(self) -> int: ...


def _terms(term) -> tuple[str, ...]:
    """``term``: one term's name, or a list of them (weighted alike)."""
    terms = (term,) if isinstance(term, str) else tuple(term)
    if not terms:
        raise ConfigError(f"annealing.term must name at least one of {list(TERMS)}")
    for name in terms:
        require_one_of("annealing.term", name, TERMS)
    return terms


class NoAnnealing:
    """All weights 1 at every epoch."""

    def __call__(self, epoch: int) -> AnnealingWeights:
        return AnnealingWeights()

    def final_epoch(self) -> int:
        """First epoch from which the weights stay 1."""
        return 0


class StepAnnealing:
    """``β_term = max(1, start - step · epoch)``.

    The authors' prior annealing for non-amortised natural-image learning is
    ``start=10, step=2`` on the prior: 10, 8, 6, 4, 2, then 1 (``max(1, 2(5 - epoch))``).
    The authors' amortised schedule ``max(1, 2 - 0.1 epoch)`` is ``start=2, step=0.1``.
    """

    def __init__(self, term: str | list[str] = "prior", start: float = 10.0, step: float = 2.0):
        terms = _terms(term)
        if start < 1:
            raise ConfigError(f"annealing.start must be >= 1, got {start}")
        if step <= 0:
            raise ConfigError(f"annealing.step must be > 0, got {step}")
        self.terms, self.start, self.step = terms, float(start), float(step)

    def __call__(self, epoch: int) -> AnnealingWeights:
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
    ``q ∝ (p(x|z) p(z))^β``: the same modes, narrowed. With λ held fixed while β > 1 (the EM's
    ``annealed_prior_scale=fixed``) the schedule starts near MAP sparse coding — as β grows the means tend to
    the codes of ``½||x - Wμ||²/σ² + Σ_h |μ_h|/λ_h`` — and ends at the ELBO (docs/design.md §8)."""

    def __init__(self, start: float = 10.0, step: float = 2.0):
        super().__init__(("likelihood", "prior"), start, step)


class ExponentialAnnealing:
    """``β_term = 1 + (start - 1) · decay^epoch``, set to exactly 1 once within ``tolerance`` of 1."""

    def __init__(self, term: str | list[str] = "prior", start: float = 10.0, decay: float = 0.5, tolerance: float = 1e-3):
        terms = _terms(term)
        if start < 1:
            raise ConfigError(f"annealing.start must be >= 1, got {start}")
        if not 0 < decay < 1:
            raise ConfigError(f"annealing.decay must be in (0, 1), got {decay}")
        if not tolerance > 0:
            raise ConfigError(f"annealing.tolerance must be > 0, got {tolerance}")
        self.terms, self.start, self.decay, self.tolerance = terms, float(start), float(decay), float(tolerance)

    def _excess(self, epoch: int) -> float:
        return (self.start - 1.0) * self.decay**epoch

    def __call__(self, epoch: int) -> AnnealingWeights:
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
