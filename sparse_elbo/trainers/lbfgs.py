"""Joint full-batch L-BFGS on the dictionary and every variational parameter (the authors' bars setting;
docs/design.md §7.1).

Maximises ``N · F_β(W, Φ)`` (the annealing-weighted objective summed over data points, so that
per-data-point gradients are O(1)) with ``torch.optim.LBFGS`` and a strong-Wolfe line search. Gradients
come from ``Problem.loss_and_gradients``: in closed form for the entropy ELBO with per-data-point
posteriors, by autograd otherwise. One *epoch* is ``iterations_per_epoch`` L-BFGS iterations; the
optimiser's memory is emptied whenever the annealing weights change (stale curvature pairs would mislead).
Sampled objectives use common random numbers within an epoch, so that each epoch's L-BFGS sees one
deterministic function.

Stop rule (once the annealing weights are 1): ``convergence.StopRule`` on the objective's change over an
epoch and the largest gradient entry, or ``max_epochs``. The trainer that accepts every objective,
posterior family and schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sparse_elbo.annealing import AnnealingWeights
from sparse_elbo.problem import Problem
from sparse_elbo.trainers.base import KINDS, OBJECTIVES, Capabilities, Sizes, Trainer
from sparse_elbo.trainers.convergence import StopRule, full_batch_lbfgs
from sparse_elbo.validation import require_at_least


@dataclass
class LBFGSState:
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.LBFGS | None = None
    weights: AnnealingWeights | None = None  # the weights the optimiser's memory belongs to
    closure: Callable[[], torch.Tensor] | None = field(default=None, repr=False)  # this epoch's objective

    def state_dict(self) -> dict:
        return {"optimizer": None if self.optimizer is None else self.optimizer.state_dict(), "weights": self.weights}


class LBFGSTrainer(Trainer):
    capabilities = Capabilities(posteriors=KINDS, objectives=OBJECTIVES, annealing=True)

    def __init__(
        self,
        max_epochs: int = 200,
        iterations_per_epoch: int = 50,
        history_size: int = 20,
        relative_tolerance: float = 1e-7,
        gradient_tolerance: float = 1e-2,
        train_dictionary: bool = True,
    ):
        require_at_least(1, max_epochs=max_epochs, iterations_per_epoch=iterations_per_epoch, history_size=history_size)
        self.stop_rule = StopRule(float(relative_tolerance), float(gradient_tolerance))
        self.max_epochs = int(max_epochs)
        self.iterations_per_epoch = int(iterations_per_epoch)
        self.history_size = int(history_size)
        self.train_dictionary = bool(train_dictionary)

    def _optimizer(self, params) -> torch.optim.LBFGS:
        return full_batch_lbfgs(params, self.iterations_per_epoch, self.history_size)

    def start(self, problem: Problem, saved: dict | None) -> LBFGSState:
        state = LBFGSState(problem.trainable_parameters(self.train_dictionary))
        if saved is not None:
            state.weights = saved["weights"]
            if saved["optimizer"] is not None:
                state.optimizer = self._optimizer(state.params)
                state.optimizer.load_state_dict(saved["optimizer"])
        return state

    def train_epoch(self, problem: Problem, state: LBFGSState, epoch: int, weights: AnnealingWeights) -> None:
        if weights != state.weights or state.optimizer is None:
            state.weights, state.optimizer = weights, self._optimizer(state.params)
        generator = torch.Generator(device=problem.x.device)
        noise_seed = problem.seed * 1_000_003 + epoch  # common random numbers within an epoch

        def closure():
            generator.manual_seed(noise_seed)
            return problem.loss_and_gradients(weights, generator)

        state.closure = closure
        state.optimizer.step(closure)

    def largest_gradient(self, problem: Problem, state: LBFGSState) -> float:
        state.closure()  # .grad after a step may belong to a rejected line-search point
        return max(float(p.grad.abs().max()) for p in state.params)

    def restart(self, state: LBFGSState) -> None:
        state.optimizer = self._optimizer(state.params)

    def working_memory(self, sizes: Sizes) -> int:
        """Parameters, gradient, direction and 2 × history_size curvature pairs of every parameter."""
        return (2 * self.history_size + 4) * (sizes.posterior_numbers + sizes.n_observed * sizes.n_latents)
