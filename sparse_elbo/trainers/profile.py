"""Full-batch L-BFGS on the dictionary's profile objective (the default for the bars; docs/design.md §7.2).

The entropy objective's profile in ``W``,

    P(W) = max_q L_H(W, q),

is maximised with ``torch.optim.LBFGS`` (strong Wolfe) on ``W`` alone (its raw parameters under the
unit-norm gauge). Every evaluation of ``P`` solves for all posteriors at that ``W`` with the family's
fixed-dictionary fit (``inference.fit.posterior_fit``: the O(N·H²) diagonal Newton fit for diagonal
posteriors under the Laplace prior, the fixed-point iteration for full covariances or other priors, the
generic block fit otherwise), warm-started from the previous evaluation's ``q``,
until ``L_H`` changes by less than ``inner_tolerance`` (relative) per iteration. By the envelope theorem
``∇P(W) = ∂L_H/∂W`` at that ``q``, which is in closed form (only σ²* depends on W at fixed q).

Why not joint L-BFGS on W and q (``trainer=lbfgs``): near an optimum the joint problem creeps, with q
lagging behind W along the bars' flat direction. With q always at its optimum, L-BFGS sees a small,
well-conditioned problem in W.

The start comes from ``initialisation`` (``sparse_elbo/initialisation.py``; MAP sparse coding by
default), counted as training time; ``q`` starts at the fixed-point fit from least-squares codes.

One *epoch* is ``iterations_per_epoch`` L-BFGS iterations, then ``q`` is refitted at the accepted ``W``
(the last evaluation may have been a rejected line-search point) and written into the posterior, with
``σ²*, λ*`` into the model. Stop rule: ``convergence.StopRule`` on ``P`` and the largest entry of
``∇(N P)`` in the raw dictionary, or ``max_epochs``.

Supports the entropy objective with per-data-point posteriors and no annealing (the fits maximise the
unweighted ``L_H``). With diagonal posteriors at a
rank-deficient dictionary ``max_q L_H`` has several nearby stationary points in q, and the warm-started
fits follow one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_elbo import parallel
from sparse_elbo.annealing import AnnealingWeights
from sparse_elbo.inference.fit import PosteriorFit, fit_memory, posterior_fit
from sparse_elbo.initialisation import DictionaryStart, SparseCodingDictionary, start_dictionary
from sparse_elbo.problem import Problem
from sparse_elbo.trainers.base import Capabilities, Sizes, Trainer
from sparse_elbo.trainers.convergence import StopRule, full_batch_lbfgs
from sparse_elbo.validation import require_at_least


@dataclass
class ProfileState:
    fit: PosteriorFit  # q at the current W, and the warm start of the next fit
    optimizer: torch.optim.LBFGS
    largest_gradient: float = float("nan")  # of ∇(N P) at the end of the last epoch

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "fixed_point": self.fit.state()}


class ProfileLBFGSTrainer(Trainer):
    capabilities = Capabilities(
        posteriors=("per_data_point",), objectives=("entropy",), annealing=False, data_parallel=True, streams_data=True
    )

    def __init__(
        self,
        max_epochs: int = 100,
        iterations_per_epoch: int = 10,
        history_size: int = 50,
        relative_tolerance: float = 1e-7,
        gradient_tolerance: float = 10.0,
        inner_tolerance: float = 1e-8,
        inner_max_iterations: int = 200,
        line_search_steps: int = 30,
        initialisation: DictionaryStart | None = None,
    ):
        require_at_least(
            1,
            max_epochs=max_epochs,
            iterations_per_epoch=iterations_per_epoch,
            history_size=history_size,
            inner_max_iterations=inner_max_iterations,
            line_search_steps=line_search_steps,
        )
        require_at_least(0, inner_tolerance=inner_tolerance)
        self.stop_rule = StopRule(float(relative_tolerance), float(gradient_tolerance))
        self.max_epochs = int(max_epochs)
        self.iterations_per_epoch = int(iterations_per_epoch)
        self.history_size = int(history_size)
        self.inner_tolerance = float(inner_tolerance)
        self.inner_max_iterations = int(inner_max_iterations)
        self.line_search_steps = int(line_search_steps)
        self.initialisation = initialisation if initialisation is not None else SparseCodingDictionary()

    def start(self, problem: Problem, saved: dict | None) -> ProfileState:
        model = problem.model
        with torch.no_grad():
            if saved is None:
                start_dictionary(self.initialisation, problem)
            fit = posterior_fit(problem.x, model.W, problem.posterior, model.prior)
            if saved is not None:
                fit.load_state(saved["fixed_point"])
        optimizer = full_batch_lbfgs([model.W_raw], self.iterations_per_epoch, self.history_size)
        if saved is not None:
            optimizer.load_state_dict(saved["optimizer"])
        return ProfileState(fit, optimizer)

    def _closure(self, problem: Problem, state: ProfileState):
        model, n_data = problem.model, parallel.count(problem.x.shape[0])  # N over every rank

        def closure():  # -N P(W) and its gradient in W_raw
            with torch.no_grad():
                W = model.W
                state.fit.set_dictionary(W)
                state.fit.run(self.inner_max_iterations, self.inner_tolerance, self.line_search_steps)
                model.W_raw.grad = -model.raw_gradient(state.fit.dictionary_gradient(W))
                return -n_data * state.fit.value

        return closure

    def train_epoch(self, problem: Problem, state: ProfileState, epoch: int, weights: AnnealingWeights) -> None:
        closure = self._closure(problem, state)
        state.optimizer.step(closure)
        closure()  # q at the accepted W (the last evaluation may have been a rejected trial)
        state.largest_gradient = float(problem.model.W_raw.grad.abs().max())
        state.fit.write_to(problem.posterior, problem.model)

    def largest_gradient(self, problem: Problem, state: ProfileState) -> float:
        return state.largest_gradient

    def restart(self, state: ProfileState) -> None:
        state.optimizer = full_batch_lbfgs(
            state.optimizer.param_groups[0]["params"], self.iterations_per_epoch, self.history_size
        )

    def working_memory(self, sizes: Sizes) -> int:
        """The posteriors and the fit's temporaries (``inference.fit.fit_memory``)."""
        return fit_memory(sizes.n_data, sizes.n_latents, sizes.posterior_numbers)
