"""The E-step: maximising an objective over the posteriors of one block of data points at a time, with
the dictionary fixed (docs/design.md §6.2).

An *E-step objective* (a small strategy, chosen in the config with ``_target_``) says what a block's
posteriors maximise; ``BlockLBFGS`` (the driver) maximises it with L-BFGS and writes the result back. One
driver serves the EM trainers and the refinement of held-out posteriors.

- ``AnalyticEStep``: the analytic ELBO summed over the block, at the model's ``σ², λ`` (held fixed; EM sets
  them to the full-data optima of the previous q). Points are independent.
- ``EntropyEStep``: the full-data ``L_H`` as a function of the block's q, every other point's q fixed:
  ``σ²*, λ*`` follow the block's q inside the E-step (``-N L_H``, the sum over data points).
- ``BatchEntropyEStep``: the block's own ``L_H`` (``σ²*, λ*`` from the block alone, averaged over it): the
  authors' per-batch E-step.

Diagonal posteriors under the Laplace prior use the fused value and gradient of ``kernels.py``
(``fused=True``); everything else uses autograd.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from sparse_elbo.annealing import AnnealingWeights
from sparse_elbo.inference.kernels import DiagonalLaplaceEntropyEStep, DiagonalLaplaceEStep
from sparse_elbo.inference.statistics import SufficientStatistics
from sparse_elbo.objectives import AnalyticELBO, DataStatistics, EntropyELBO
from sparse_elbo.validation import require_at_least

# block_loss(block) -> loss: the negated objective at the block's parameters ({name: leaf tensor}); sets
# every parameter's .grad
BlockLoss = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class BlockContext:
    """What a block's E-step may need beyond its own data: the other points' sums (the whole data set's
    ``count``) and the block's own ``Σ||x||²`` (known once, it never changes)."""

    others: SufficientStatistics
    x_energy: torch.Tensor


class EStepObjective(Protocol):
    def block_loss(
        self, x: torch.Tensor, posterior, model, weights: AnnealingWeights, context: BlockContext | None = None
    ) -> BlockLoss:
        """The loss of the block of data ``x (B,D)`` (posterior parameters passed at each call)."""


def _autograd_loss(value_of: Callable, gaussian_of: Callable) -> BlockLoss:
    """``value_of(q) -> loss`` differentiated by autograd with respect to the block's parameters, with
    ``q = gaussian_of(block)``."""

    def loss(block):
        for value in block.values():
            value.grad = None
        result = value_of(gaussian_of(block))
        result.backward()
        return result.detach()

    return loss


def _fused_loss(kernel) -> BlockLoss:
    def loss(block):
        value, block["mean"].grad, block["log_std"].grad = kernel.loss_and_gradients(block["mean"], block["log_std"])
        return value

    return loss


@dataclass(frozen=True)
class AnalyticEStep:
    """``-Σ_n F_β,n`` over the block: the analytic ELBO at the model's fixed ``σ², λ``."""

    fused: bool = True

    def block_loss(self, x, posterior, model, weights, context=None) -> BlockLoss:
        if self.fused and DiagonalLaplaceEStep.applies_to(posterior, model):
            return _fused_loss(DiagonalLaplaceEStep(x, model, weights))
        size = x.shape[0]
        return _autograd_loss(lambda q: -size * AnalyticELBO()(x, q, model, weights).weighted, posterior.gaussian)


@dataclass(frozen=True)
class EntropyEStep:
    """``-N L_H,β`` of the whole data set as a function of the block's q (``context.others`` fixed)."""

    fused: bool = True

    def block_loss(self, x, posterior, model, weights, context=None) -> BlockLoss:
        others = context.others
        other_residual = others.residual(model.W.detach())
        if self.fused and DiagonalLaplaceEStep.applies_to(posterior, model):
            kernel = DiagonalLaplaceEntropyEStep(x, model, weights, other_residual, others.prior, others.count, context.x_energy)
            return _fused_loss(kernel)

        def negative_total(q):
            residual, prior_statistic = EntropyELBO().batch_statistics(x, q, model)  # (B,), (B,H)
            statistics = DataStatistics(
                (other_residual + residual.sum()) / others.count, (others.prior + prior_statistic.sum(0)) / others.count
            )  # the other points' entropies are a constant and left out
            value = EntropyELBO.from_statistics(q.entropy().sum() / others.count, statistics, x.shape[1], model.prior, weights)
            return -others.count * value.weighted

        return _autograd_loss(negative_total, posterior.gaussian)


@dataclass(frozen=True)
class BatchEntropyEStep:
    """``-L_H,β`` of the block alone (``σ²*, λ*`` from the block, averaged over it): the authors' E-step.
    ``signed_scale``: the block holds the scale as a signed number (``posterior.signed_gaussian``), as theirs."""

    signed_scale: bool = False

    def block_loss(self, x, posterior, model, weights, context=None) -> BlockLoss:
        gaussian_of = posterior.signed_gaussian if self.signed_scale else posterior.gaussian
        return _autograd_loss(lambda q: -EntropyELBO()(x, q, model, weights).weighted, gaussian_of)


@contextlib.contextmanager
def _frozen(module: torch.nn.Module):
    """No gradients for the module's parameters (W, σ², λ are fixed in an E-step: a third less work)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


@dataclass(frozen=True)
class BlockLBFGS:
    """The block E-step driver: L-BFGS (strong Wolfe) on one block's posterior parameters, from their
    current values, for at most ``iterations`` iterations (``max_evaluations`` objective evaluations; None:
    torch's 1.25 × iterations), stopping earlier once a step changes the loss by less than ``tolerance``."""

    iterations: int = 100
    max_evaluations: int | None = None
    history_size: int = 20
    tolerance: float = 1e-9

    def __post_init__(self):
        require_at_least(
            "trainer",
            1,
            e_step_iterations=self.iterations,
            history_size=self.history_size,
            **({} if self.max_evaluations is None else {"e_step_max_evaluations": self.max_evaluations}),
        )
        require_at_least("trainer", 0, e_step_tolerance=self.tolerance)

    def optimise(self, posterior, index: torch.Tensor, model, block_loss: BlockLoss) -> dict[str, torch.Tensor]:
        """Maximise the block's objective over the posteriors of data points ``index``; returns (and
        stores) their new parameters."""
        block = self.minimise(posterior.block_parameters(index), model, block_loss)
        posterior.write_block(index, block)
        return block

    def minimise(self, block: dict[str, torch.Tensor], model, block_loss: BlockLoss) -> dict[str, torch.Tensor]:
        """Run L-BFGS on the leaves ``block`` ({name: tensor}) from their values, ``model`` frozen; returns
        them detached."""
        block = {name: value.detach().requires_grad_(True) for name, value in block.items()}
        optimizer = torch.optim.LBFGS(
            list(block.values()),
            lr=1.0,
            max_iter=self.iterations,
            max_eval=self.max_evaluations,
            history_size=self.history_size,
            tolerance_grad=1e-7,
            tolerance_change=self.tolerance,
            line_search_fn="strong_wolfe",
        )
        with _frozen(model):
            optimizer.step(lambda: block_loss(block))
        return {name: value.detach() for name, value in block.items()}
