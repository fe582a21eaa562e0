"""The authors' per-batch procedure for natural-image patches (docs/design.md §7.4), for comparison in the
same tool.

One epoch is one pass over batches of ``batch_size`` points in fixed order. For each batch:

1. a fresh q: zero means, standard deviations ``fresh_std`` (1 in their code). With
   ``scale_parameterisation=std`` (theirs) L-BFGS moves the standard deviation ``s`` itself, a signed number
   (``|s|`` is the std; ``s`` may pass through 0); with ``log_std`` it moves ``log s``. The Gaussians are the
   same, but L-BFGS stops after at most ``e_step_iterations`` from the same start, so the parameterisation
   decides where the partial E-step ends, and with it the dictionary;
2. the E-step: L-BFGS (strong Wolfe, ``e_step_iterations`` iterations, memory ``history_size``) on the
   batch's own entropy objective ``L_H,β`` — ``σ²*, λ*`` from the batch alone, a biased estimate of the
   full-data values — averaged over the batch (``inference.e_step.BatchEntropyEStep``);
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
from sparse_elbo.inference.statistics import data_blocks
from sparse_elbo.objectives import EntropyELBO
from sparse_elbo.problem import Problem
from sparse_elbo.trainers.base import Capabilities, NoState, Sizes, Trainer
from sparse_elbo.validation import require_at_least, require_one_of, require_positive

SCALE_PARAMETERISATIONS = ("std", "log_std")


class AuthorsEMTrainer(Trainer):
    capabilities = Capabilities(families=("diag", "full"), objectives=("entropy",), annealing=True)

    def __init__(
        self,
        max_epochs: int = 10,
        batch_size: int = 512,
        e_step_iterations: int = 100,
        e_step_max_evaluations: int | None = None,
        history_size: int = 20,
        e_step_tolerance: float = 1e-9,
        fresh_std: float = 1.0,
        learning_rate: float = 0.5,
        scale_parameterisation: str = "std",
    ):
        require_at_least("trainer", 1, max_epochs=max_epochs, batch_size=batch_size)
        require_positive("trainer", fresh_std=fresh_std, learning_rate=learning_rate)
        require_one_of("trainer.scale_parameterisation", scale_parameterisation, SCALE_PARAMETERISATIONS)
        self.max_epochs = int(max_epochs)
        self.batch_size = int(batch_size)
        self.driver = BlockLBFGS(
            int(e_step_iterations),
            None if e_step_max_evaluations is None else int(e_step_max_evaluations),
            int(history_size),
            float(e_step_tolerance),
        )
        self.fresh_std = float(fresh_std)
        self.learning_rate = float(learning_rate)
        self.signed_scale = scale_parameterisation == "std"

    def start(self, problem: Problem, saved: dict | None) -> NoState:
        return NoState()

    def train_epoch(self, problem: Problem, state: NoState, epoch: int, weights: AnnealingWeights) -> None:
        x, model, posterior = problem.x, problem.model, problem.posterior
        loss_of = BatchEntropyEStep(self.signed_scale).block_loss
        for index in data_blocks(x.shape[0], self.batch_size, x.device):
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
        return sizes.posterior_numbers + (2 * self.driver.history_size + 8) * min(sizes.n_data, self.batch_size) * per_point
