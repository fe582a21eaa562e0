"""The E-step: maximising an objective over the posteriors of one block of data points at a time, with
the dictionary fixed (docs/design.md §6.2).

An *E-step objective* (a small strategy, chosen in the config with ``_target_``) says what a block's
posteriors maximise; ``BlockLBFGS`` (the driver, one config node shared by ``em`` and ``authors_em``, and
used by the refinement of held-out posteriors and by encoding) maximises it with L-BFGS, block by block, and
writes the result back.

- ``AnalyticEStep``: the analytic ELBO summed over the block, at the model's ``σ², λ`` (held fixed; EM sets
  them to the full-data optima of the previous q) — or at ``λ_0`` where the weights hold the prior's scale
  (``AnnealingWeights.prior_scale``). Points are independent.
- ``EntropyEStep``: the full-data ``L_H`` as a function of the block's q, every other point's q fixed:
  ``σ²*, λ*`` follow the block's q inside the E-step (``-N L_H``, the sum over data points). Where the
  weights hold λ at ``λ_0`` it is the analytic E-step at the model's ``σ²`` and ``λ_0``: λ does not follow q
  then, and σ² stays at the optimum of the previous q, so that the block's points stay independent.
- ``BatchEntropyEStep``: the block's own ``L_H`` (``σ²*, λ*`` from the block alone, averaged over it): the
  authors' per-batch E-step.

Where a fused kernel is registered for the (posterior family, prior) pair (``registry.E_STEP_KERNELS``;
diagonal posteriors under the Laplace prior, ``kernels.py``) it gives value and gradient (``fused=True``);
everything else uses autograd.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from sparse_elbo import parallel
from sparse_elbo.annealing import AnnealingWeights
from sparse_elbo.inference.kernels import DiagonalLaplaceEntropyEStep
from sparse_elbo.inference.registry import E_STEP_KERNELS
from sparse_elbo.inference.statistics import CPU_BLOCK_SIZE, SufficientStatistics, total
from sparse_elbo.model import ModelAt
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


def autograd_loss(value_of: Callable, gaussian_of: Callable) -> BlockLoss:
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


def _held_scales(model, weights: AnnealingWeights):
    """The model's values, with λ at ``weights.prior_scale`` where the weights hold it (a view: the model's
    own λ is left as it is)."""
    if weights.prior_scale is None:
        return model
    lam = torch.full_like(model.lam.detach(), weights.prior_scale)
    return ModelAt(model.W.detach(), model.sigma2.detach(), lam, model.prior)


@dataclass(frozen=True)
class AnalyticEStep:
    """``-Σ_n F_β,n`` over the block: the analytic ELBO at the model's fixed ``σ², λ`` (or ``λ_0``)."""

    fused: bool = True

    def block_loss(self, x, posterior, model, weights, context=None) -> BlockLoss:
        kernel = E_STEP_KERNELS.lookup(posterior, model.prior) if self.fused else None
        if kernel is not None:
            return _fused_loss(kernel(x, model, weights))
        size, at = x.shape[0], _held_scales(model, weights)
        unheld = replace(weights, prior_scale=None)  # the held λ is in ``at``
        return autograd_loss(lambda q: -size * AnalyticELBO()(x, q, at, unheld).weighted, posterior.gaussian)


@dataclass(frozen=True)
class EntropyEStep:
    """``-N L_H,β`` of the whole data set as a function of the block's q (``context.others`` fixed); where the
    weights hold λ at λ_0, the analytic E-step (module docstring)."""

    fused: bool = True

    def block_loss(self, x, posterior, model, weights, context=None) -> BlockLoss:
        if weights.prior_scale is not None:
            return AnalyticEStep(self.fused).block_loss(x, posterior, model, weights, context)
        others = context.others
        other_residual = others.residual(model.W.detach())
        if self.fused and E_STEP_KERNELS.lookup(posterior, model.prior) is not None:
            kernel = DiagonalLaplaceEntropyEStep(x, model, weights, other_residual, others.prior, others.count, context.x_energy)
            return _fused_loss(kernel)

        def negative_total(q):
            residual, prior_statistic = EntropyELBO().batch_statistics(x, q, model)  # (B,), (B,H)
            statistics = DataStatistics(
                (other_residual + residual.sum()) / others.count, (others.prior + prior_statistic.sum(0)) / others.count
            )  # the other points' entropies are a constant and left out
            value = EntropyELBO.from_statistics(q.entropy().sum() / others.count, statistics, x.shape[1], model.prior, weights)
            return -others.count * value.weighted

        return autograd_loss(negative_total, posterior.gaussian)


@dataclass(frozen=True)
class BatchEntropyEStep:
    """``-L_H,β`` of the block alone (``σ²*, λ*`` from the block, averaged over it): the authors' E-step.
    ``signed_scale``: the block holds the scale as a signed number (``posterior.signed_gaussian``), as theirs."""

    signed_scale: bool = False

    def block_loss(self, x, posterior, model, weights, context=None) -> BlockLoss:
        gaussian_of = posterior.signed_gaussian if self.signed_scale else posterior.gaussian
        return autograd_loss(lambda q: -EntropyELBO()(x, q, model, weights).weighted, gaussian_of)


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


@dataclass
class Counts:
    """What a driver did: L-BFGS iterations and objective evaluations, summed over its calls."""

    iterations: int = 0
    evaluations: int = 0


@dataclass
class BlockLBFGS:
    """The block E-step driver: L-BFGS (strong Wolfe) on one block's posterior parameters at a time, from their
    current values, for at most ``iterations`` iterations (``max_evaluations`` objective evaluations; None:
    torch's 1.25 × iterations), stopping earlier once a step changes the loss by less than ``tolerance``.
    ``block_size``: data points per block (None: all on CUDA, 16,384 on a CPU; a trainer whose blocks are
    part of its algorithm, the authors' batches, sets its own). ``counts`` sums the iterations and
    evaluations of every call (benchmarks read it)."""

    iterations: int = 100
    max_evaluations: int | None = None
    history_size: int = 20
    tolerance: float = 1e-9
    block_size: int | None = None
    counts: Counts = field(default_factory=Counts, init=False, compare=False, repr=False)

    def __post_init__(self):
        require_at_least(1, iterations=self.iterations, history_size=self.history_size, max_evaluations=self.max_evaluations)
        require_at_least(1, block_size=self.block_size)
        require_at_least(0, tolerance=self.tolerance)
        self.iterations, self.history_size, self.tolerance = int(self.iterations), int(self.history_size), float(self.tolerance)

    def blocks(self, points: torch.Tensor) -> list[torch.Tensor]:
        """``points`` (indices) in blocks of ``block_size`` (module docstring)."""
        size = self.block_size or (len(points) if points.is_cuda else CPU_BLOCK_SIZE)
        return list(torch.split(points, max(size, 1)))

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
        leaves = list(block.values())
        optimizer = torch.optim.LBFGS(
            leaves,
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
        state = optimizer.state[leaves[0]]
        self.counts.iterations += int(state.get("n_iter", 0))
        self.counts.evaluations += int(state.get("func_evals", 0))
        return {name: value.detach() for name, value in block.items()}


def sweep(
    x: torch.Tensor,
    posterior,
    model,
    blocks: list[torch.Tensor],
    statistics: list[SufficientStatistics],
    weights: AnnealingWeights,
    e_step: EStepObjective,
    driver: BlockLBFGS,
    summed: SufficientStatistics | None = None,
) -> tuple[list[SufficientStatistics], SufficientStatistics]:
    """One E-step over every block in turn (docs/design.md §7.3 step 2): each block's posteriors maximise
    ``e_step``'s objective with the other blocks' sums fixed, and the block's share of the sums follows. ``model``:
    W, σ², λ as the E-step reads them; ``summed``: the total of ``statistics`` over every rank, when known.
    Returns the blocks' new sums and their total (kept up to date block by block).

    Data-parallel (``parallel.Ranks.sharing``): every rank sweeps its own blocks at once, the other ranks'
    sums held at their values at the sweep's start; the total returned is then all-reduced afresh."""
    summed = total(statistics).across_ranks() if summed is None else summed
    statistics = list(statistics)
    for b, index in enumerate(blocks):
        others = summed - statistics[b]
        block_loss = e_step.block_loss(x[index], posterior, model, weights, BlockContext(others, statistics[b].x_energy))
        block = driver.optimise(posterior, index, model, block_loss)
        statistics[b] = SufficientStatistics.of(
            x[index], posterior.gaussian(block), model.prior, statistics[b].count, statistics[b].x_energy
        )
        summed = others + statistics[b]
    if parallel.sharing() is not None:  # the other ranks' blocks moved too
        summed = total(statistics).across_ranks()
    return statistics, summed
