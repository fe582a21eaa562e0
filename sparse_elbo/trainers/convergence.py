"""The epoch-level stop rule (docs/design.md §7.6).

After an epoch with the unweighted objective ``F`` (previous epoch ``F_prev``) and, where the rule has a
gradient test, the largest absolute gradient entry ``g`` of the trainer's objective:

- ``|F - F_prev| / max(1, |F|) < relative_tolerance`` and ``g < gradient_tolerance``: converged;
- the relative change is below tolerance but ``g`` is not: no progress (the line search can no longer
  resolve a decrease, e.g. in float32). The trainer restarts its optimiser with an empty memory; a second
  such epoch in a row stops the run as ``stalled``;
- otherwise: progress.

Requiring both tests avoids stopping on a flat stretch that is not a stationary point. A rule without a
gradient test (``gradient_tolerance=None``) stops on the relative change alone; ``relative_tolerance=0``
never stops. The rule is consulted only once the annealing weights are 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_elbo.validation import require_at_least

PROGRESS, CONVERGED, NO_PROGRESS = "progress", "converged", "no_progress"


def full_batch_lbfgs(params, iterations: int, history_size: int) -> torch.optim.LBFGS:
    """One epoch of ``iterations`` L-BFGS iterations (strong Wolfe, unit first step); the stop rule,
    not torch's tolerances, decides when to end."""
    return torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=iterations,
        history_size=history_size,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )


@dataclass
class EpochDecision:
    stop_reason: str | None  # "converged", "stalled", or None to go on
    stalled_epochs: int  # no-progress epochs in a row
    restart: bool  # empty the optimiser's memory before the next epoch


@dataclass
class StopRule:
    relative_tolerance: float
    gradient_tolerance: float | None = None

    def __post_init__(self):
        require_at_least(0, relative_tolerance=self.relative_tolerance)
        if self.gradient_tolerance is not None:
            require_at_least(0, gradient_tolerance=self.gradient_tolerance)

    @property
    def needs_gradient(self) -> bool:
        return self.gradient_tolerance is not None

    def verdict(self, previous: float, current: float, max_gradient: float | None = None) -> str:
        if not abs(current - previous) / max(1.0, abs(current)) < self.relative_tolerance:
            return PROGRESS
        if self.gradient_tolerance is None:
            return CONVERGED
        return CONVERGED if max_gradient < self.gradient_tolerance else NO_PROGRESS

    def decide(self, previous: float, current: float, max_gradient: float | None, stalled_epochs: int) -> EpochDecision:
        """The verdict applied: stop when converged or after a second no-progress epoch in a row, and
        restart the optimiser's memory after a no-progress epoch."""
        verdict = self.verdict(previous, current, max_gradient)
        if verdict == CONVERGED:
            return EpochDecision("converged", stalled_epochs, False)
        if verdict == NO_PROGRESS:
            return EpochDecision("stalled" if stalled_epochs + 1 >= 2 else None, stalled_epochs + 1, True)
        return EpochDecision(None, 0, False)
