"""Full-batch L-BFGS on the dictionary's profile objective (the default for the bars).

The entropy objective's profile in ``W``,

    P(W) = max_q L_H(W, q),

is maximised with ``torch.optim.LBFGS`` (strong Wolfe) on ``W`` alone (its raw parameters under the
unit-norm gauge). Every evaluation of ``P`` solves for all posteriors at that ``W`` with the batched
fixed-point iteration of ``trainers/fixed_point.py``, warm-started from the previous evaluation's
``q``, until ``L_H`` changes by less than ``inner_tolerance`` (relative) per iteration. By the
envelope theorem ``∇P(W) = ∂L_H/∂W`` at that ``q``, which is in closed form
(``_FixedPoint.dictionary_gradient``; σ²* is the only term of ``L_H`` that depends on ``W`` at fixed q).

Why not joint L-BFGS on W and q (``trainer=lbfgs``): near an optimum the joint problem creeps, with q
lagging behind W along the bars' flat direction; from the same start, joint L-BFGS gains ~1e-4 nats per
epoch for 150+ epochs where the profile settles in ~15 (README, *Benchmark*). With q always at its
optimum, L-BFGS sees a 250-dimensional, well-conditioned problem.

The start comes from ``initialisation`` (``sparse_elbo/initialisation.py``; MAP sparse coding by
default), counted as training time; ``q`` starts at the fixed-point fit from least-squares codes.

One *epoch* is ``iterations_per_epoch`` L-BFGS iterations, then ``q`` is refitted at the accepted ``W``
(the last evaluation may have been a rejected line-search point), written into the posterior with
``σ²*, λ*`` into the model, and evaluated. Convergence: ``convergence.StopRule`` on ``P`` and the
largest entry of ``∇(N P)`` in the raw dictionary, or ``max_epochs``.

Supports the entropy objective with per-data-point diagonal or full-covariance posteriors and no
annealing (the fixed-point iteration maximises the unweighted ``L_H``). With diagonal posteriors at a
rank-deficient dictionary ``max_q L_H`` has several nearby stationary points in q, and the warm-started
fits follow one of them: on 3×3 bars (N = 300) a cold fit at the final W ended 0.004 nats higher.
"""

from __future__ import annotations

import torch

from sparse_elbo.initialisation import RandomDictionary
from sparse_elbo.problem import Checkpoint, Evaluate, FitOutcome, Problem, Stopwatch
from sparse_elbo.trainers.convergence import StopRule, full_batch_lbfgs
from sparse_elbo.trainers.fixed_point import _FixedPoint
from sparse_elbo.validation import require_at_least


class ProfileLBFGSTrainer:
    supported_families = ("diag", "full")
    supported_objectives = ("entropy",)
    supports_annealing = False

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
        initialisation=None,
    ):
        require_at_least("trainer", 1, max_epochs=max_epochs, iterations_per_epoch=iterations_per_epoch,
                         history_size=history_size, inner_max_iterations=inner_max_iterations,
                         line_search_steps=line_search_steps)
        require_at_least("trainer", 0, inner_tolerance=inner_tolerance)
        self.stop_rule = StopRule(float(relative_tolerance), float(gradient_tolerance))
        self.max_epochs = int(max_epochs)
        self.iterations_per_epoch = int(iterations_per_epoch)
        self.history_size = int(history_size)
        self.inner_tolerance = float(inner_tolerance)
        self.inner_max_iterations = int(inner_max_iterations)
        self.line_search_steps = int(line_search_steps)
        self.initialisation = initialisation if initialisation is not None else RandomDictionary()
        self.train_dictionary = True

    def _optimizer(self, params):
        return full_batch_lbfgs(params, self.iterations_per_epoch, self.history_size)

    def fit(self, problem: Problem, evaluate: Evaluate, checkpoint: Checkpoint | None = None, state: dict | None = None) -> FitOutcome:
        """Train; after each completed epoch ``checkpoint(epoch, trainer_state)`` (if given) receives
        everything needed to continue exactly: pass it back as ``state`` to resume."""
        x, model, posterior = problem.x, problem.model, problem.posterior
        weights = problem.annealing(0)  # always 1 (``supports_annealing = False``: checked by the runner's build)
        state = state or {}
        stopwatch = Stopwatch(total=state.get("train_time", 0.0))
        with stopwatch, torch.no_grad():
            if not state:
                generator = torch.Generator(device=x.device).manual_seed(problem.seed)
                model.set_dictionary(self.initialisation(x, model.W, generator))
            fit = _FixedPoint(x, model.W, model.prior, full=posterior.family == "full")
            if state.get("fixed_point") is not None:
                fit.mean, fit.curvature, fit.sigma2, fit.lam = state["fixed_point"]
        params = [model.W_raw]
        optimizer = self._optimizer(params)
        if state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        n_data = x.shape[0]

        def closure():
            with torch.no_grad():
                W = model.W
                fit.set_dictionary(W)
                fit.run(self.inner_max_iterations, self.inner_tolerance, self.line_search_steps)
                model.W_raw.grad = -model.raw_gradient(fit.dictionary_gradient(W))
                return -n_data * fit.value

        previous, stalled_epochs, outcome = state.get("previous"), state.get("stalled_epochs", 0), None
        for epoch in range(state.get("epoch", -1) + 1, self.max_epochs):
            with stopwatch:
                optimizer.step(closure)
                closure()  # q at the accepted W (the last evaluation may have been a rejected trial)
                max_grad = float(model.W_raw.grad.abs().max())
                fit.write_to(posterior, model)
            current = float(evaluate(epoch, weights, stopwatch.total).elbo)
            if previous is not None:
                decision = self.stop_rule.decide(previous, current, max_grad, stalled_epochs)
                stalled_epochs = decision.stalled_epochs
                if decision.restart:
                    optimizer = self._optimizer(params)
                if decision.stop_reason is not None:
                    outcome = FitOutcome(epoch + 1, decision.stop_reason == "converged", decision.stop_reason, stopwatch.total)
            previous = current
            if checkpoint is not None:
                checkpoint(epoch, {
                    "epoch": epoch, "previous": previous, "stalled_epochs": stalled_epochs,
                    "optimizer": optimizer.state_dict(), "train_time": stopwatch.total, "outcome": outcome,
                    "fixed_point": (fit.mean, fit.curvature, fit.sigma2, fit.lam),
                })
            if outcome is not None:
                return outcome
        return state.get("outcome") or FitOutcome(self.max_epochs, False, "max_epochs", stopwatch.total)

