"""When EM starts an epoch from fresh posteriors (``trainer/restarts``; docs/design.md §8): a small policy.

Annealed epochs leave q fitted to a sparser model, and a latent whose ``λ*_h`` has shrunk towards 0 cannot come
back in EM (its q is then the prior, so ``λ*_h = E|z_h|`` stays small): the E-steps are partial, so where
they start decides where they end. A restart puts q back where a run starts (the least-squares means of the
current W, the posterior's initial scales); it lowers the ELBO for the first E-steps of its epoch, which the
epoch's EM iterations then refit. Epoch 0 starts fresh anyway.
"""

from __future__ import annotations

from typing import Protocol


class RestartPolicy(Protocol):
    """``policy(epoch, first_unannealed) -> bool``: whether ``epoch`` starts from fresh posteriors."""

    def __call__(self, epoch: int, first_unannealed: int) -> bool: ...


class NeverRestart:
    """Posteriors are carried from epoch to epoch."""

    def __call__(self, epoch: int, first_unannealed: int) -> bool:
        return False


class RestartAfterAnnealing:
    """Fresh posteriors at the first epoch with every annealing weight 1."""

    def __call__(self, epoch: int, first_unannealed: int) -> bool:
        return epoch > 0 and epoch == first_unannealed


class RestartEveryEpoch:
    """Fresh posteriors at every epoch once annealing has ended (without annealing: from epoch 1)."""

    def __call__(self, epoch: int, first_unannealed: int) -> bool:
        return epoch > 0 and epoch >= first_unannealed
