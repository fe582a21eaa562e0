"""Fast paths keyed by (posterior family, prior), as distrax registers KL divergences by pair of distribution
classes: a family's module (or a kernel's) registers what it has, and everything else takes the generic path.

    E_STEP_KERNELS.register(DiagonalPosterior, LaplacePrior)(DiagonalLaplaceEStep)
    kernel = E_STEP_KERNELS.lookup(posterior, prior)   # None: no fused kernel, autograd

``lookup`` walks both classes' method resolution orders (the family's first), so a registration for a base
class serves its subclasses and ``object`` stands for any prior.
"""

from __future__ import annotations


class PairRegistry:
    """What is registered for pairs of (posterior class, prior class)."""

    def __init__(self, name: str):
        self.name, self.entries = name, {}

    def register(self, posterior_type: type, prior_type: type = object):
        def decorate(entry):
            self.entries[(posterior_type, prior_type)] = entry
            return entry

        return decorate

    def lookup(self, posterior, prior):
        """The entry for the most specific registered pair of ``posterior``'s and ``prior``'s classes (either
        may be given as a class or an instance); None when there is none."""
        posterior_type = posterior if isinstance(posterior, type) else type(posterior)
        prior_type = prior if isinstance(prior, type) else type(prior)
        for family in posterior_type.__mro__:
            for kind in prior_type.__mro__:
                if (family, kind) in self.entries:
                    return self.entries[(family, kind)]
        return None


E_STEP_KERNELS = PairRegistry("fused E-step kernels")  # (posterior, prior) -> kernel class (inference/kernels.py)
POSTERIOR_FITS = PairRegistry("fixed-dictionary fits")  # (posterior, prior) -> fit factory (inference/fit.py)
