"""The authors' per-batch procedure for natural-image patches (docs/design.md §7.4), for comparison in the
same tool.

One epoch is one pass over batches in fixed order: the blocks of the E-step driver (``driver.block_size``
points; 512 in ``trainer=authors_em``, as theirs). For each batch:

1. a fresh q: zero means, standard deviations ``fresh_std`` (1 in their code). With
   ``scale_parameterisation=std`` (theirs) L-BFGS moves the standard deviation ``s`` itself, a signed number
   (``|s|`` is the std; ``s`` may pass through 0); with ``log_std`` it moves ``log s``. The Gaussians are the
   same, but L-BFGS stops after at most ``driver.iterations`` from the same start, so the parameterisation
   decides where the partial E-step ends, and with it the dictionary;
2. the E-step: L-BFGS (the ``driver``: strong Wolfe, ``driver.iterations`` iterations, memory
   ``driver.history_size``) on the batch's own entropy objective ``L_H,β`` — ``σ²*, λ*`` from the batch
   alone, a biased estimate of the full-data values — averaged over the batch
   (``inference.e_step.BatchEntropyEStep``);
3. the M-step: one gradient-ascent step of size ``learning_rate`` on the raw dictionary,
   ``W_raw ← W_raw + η ∇_{W_raw} L_H,β(batch)``, whose columns the unit-norm gauge normalises where W is used
   (their ``constrain_W=True``). Like their code this does not renormalise ``W_raw``: its column norms grow
   with every step (the gradient is orthogonal to each column), so the effective step on the normalised W
   shrinks as training goes on.

Whatever the procedure optimises, the values reported after each epoch are the exact full-data ``L_H``.
"""

from __future__ import annotations

import torch

from sparse_elbo.annealing import AnnealingWeights
from sparse_elbo.inference.e_step import BatchEntropyEStep, BlockLBFGS
from sparse_elbo.inference.statistics import CPU_BLOCK_SIZE
from sparse_elbo.objectives import EntropyELBO
from sparse_elbo.problem import Problem
from sparse_elbo.trainers.base import Capabilities, NoState, Sizes, Trainer
from sparse_elbo.validation import require_at_least, require_one_of, require_positive

SCALE_PARAMETERISATIONS = ("std", "log_std")


class AuthorsEMTrainer(Trainer):
    capabilities = Capabilities(posteriors=("per_data_point",), objectives=("entropy",), annealing=True)

    def __init__(
        self,
        max_epochs: int = 10,
        driver: BlockLBFGS | None = None,
        fresh_std: float = 1.0,
        learning_rate: float = 0.5,
        scale_parameterisation: str = "std",
    ):
        require_at_least(1, max_epochs=max_epochs)
        require_positive(fresh_std=fresh_std, learning_rate=learning_rate)
        require_one_of("scale_parameterisation", scale_parameterisation, SCALE_PARAMETERISATIONS)
        self.max_epochs = int(max_epochs)
        self.driver = driver if driver is not None else BlockLBFGS(block_size=512)  # their batches of 512
        self.fresh_std = float(fresh_std)
        self.learning_rate = float(learning_rate)
        self.signed_scale = scale_parameterisation == "std"

    def required_features(self) -> tuple[str, ...]:
        """The signed-scale E-step needs the family's signed blocks (``Posterior.features``)."""
        return ("signed_blocks",) if self.signed_scale else ()

    def start(self, problem: Problem, saved: dict | None) -> NoState:
        return NoState()

    def train_epoch(self, problem: Problem, state: NoState, epoch: int, weights: AnnealingWeights) -> None:
        x, model, posterior = problem.x, problem.model, problem.posterior
        loss_of = BatchEntropyEStep(self.signed_scale).block_loss
        for index in self.driver.blocks(torch.arange(x.shape[0], device=x.device)):
            if self.signed_scale:
                block = posterior.fresh_signed_block(len(index), self.fresh_std)
                block = self.driver.minimise(block, model, loss_of(x[index], posterior, model, weights))
                posterior.write_signed_block(index, block)
            else:
                posterior.reset_block(index, self.fresh_std)
                self.driver.optimise(posterior, index, model, loss_of(x[index], posterior, model, weights))
            self.gradient_m_step(problem, index, weights)

    def gradient_m_step(self, problem: Problem, index: torch.Tensor, weights: AnnealingWeights) -> None:
        """``W_raw ← W_raw + η ∇_{W_raw} L_H,β(batch)`` (module docstring)."""
        model = problem.model
        value = EntropyELBO()(problem.x[index], problem.posterior(index), model, weights)
        (grad,) = torch.autograd.grad(value.weighted, model.W_raw)
        with torch.no_grad():
            model.W_raw.add_(self.learning_rate * grad)

    def working_memory(self, sizes: Sizes) -> int:
        """The posteriors, and one batch's L-BFGS memory."""
        per_point = sizes.posterior_numbers // max(sizes.n_data, 1)
        batch = min(sizes.n_data, self.driver.block_size or CPU_BLOCK_SIZE)
        return sizes.posterior_numbers + (2 * self.driver.history_size + 8) * batch * per_point
