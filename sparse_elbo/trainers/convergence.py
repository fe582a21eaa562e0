"""The epoch-level stop rule shared by the full-batch L-BFGS trainers.

After an epoch with objective ``F`` (previous epoch ``F_prev``) and largest absolute gradient entry ``g``:

- ``|F - F_prev| / max(1, |F|) < relative_tolerance`` and ``g < gradient_tolerance``: converged;
- the relative change is below tolerance but ``g`` is not: no progress (the line search can no longer
  resolve a decrease, e.g. in float32). The trainer restarts L-BFGS with an empty memory; a second such
  epoch in a row stops the run as ``stalled``;
- otherwise: progress.

Requiring both tests avoids stopping on a flat stretch that is not a stationary point.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparse_elbo.validation import require_at_least

PROGRESS, CONVERGED, NO_PROGRESS = "progress", "converged", "no_progress"


@dataclass
class StopRule:
    relative_tolerance: float
    gradient_tolerance: float

    def __post_init__(self):
        require_at_least("trainer", 0, relative_tolerance=self.relative_tolerance, gradient_tolerance=self.gradient_tolerance)

    def verdict(self, previous: float, current: float, max_gradient: float) -> str:
        if not abs(current - previous) / max(1.0, abs(current)) < self.relative_tolerance:
            return PROGRESS
        return CONVERGED if max_gradient < self.gradient_tolerance else NO_PROGRESS
