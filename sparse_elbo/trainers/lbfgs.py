"""Joint full-batch L-BFGS on the dictionary and every variational parameter (the authors' bars setting).

Maximises ``N · F_β(W, Φ)`` (the annealing-weighted objective summed over data points, so that
per-data-point gradients are O(1)) with ``torch.optim.LBFGS`` and a strong-Wolfe line search. Gradients
come from ``Problem.loss_and_gradients``: in closed form for the entropy ELBO with per-data-point
posteriors, by autograd otherwise.
One *epoch* is ``iterations_per_epoch`` L-BFGS iterations followed by an evaluation.

Convergence (checked once the annealing schedule has reached weight 1): ``convergence.StopRule`` on
the objective's change over an epoch and the largest gradient entry, or ``max_epochs`` reached.
"""

from __future__ import annotations

import torch

from sparse_elbo.problem import Checkpoint, Evaluate, FitOutcome, Problem, Stopwatch
from sparse_elbo.trainers.convergence import StopRule, full_batch_lbfgs
from sparse_elbo.validation import require_at_least


class LBFGSTrainer:
    supported_families = ("diag", "full", "amortized")
    supported_objectives = ("sampled", "analytic", "entropy")

    def __init__(
        self,
        max_epochs: int = 200,
        iterations_per_epoch: int = 50,
        history_size: int = 20,
        relative_tolerance: float = 1e-7,
        gradient_tolerance: float = 1e-2,
        train_dictionary: bool = True,
    ):
        require_at_least("trainer", 1, max_epochs=max_epochs, iterations_per_epoch=iterations_per_epoch,
                         history_size=history_size)
        self.stop_rule = StopRule(float(relative_tolerance), float(gradient_tolerance))
        self.max_epochs = int(max_epochs)
        self.iterations_per_epoch = int(iterations_per_epoch)
        self.history_size = int(history_size)
        self.train_dictionary = bool(train_dictionary)

    def _optimizer(self, params):
        return full_batch_lbfgs(params, self.iterations_per_epoch, self.history_size)

    def fit(self, problem: Problem, evaluate: Evaluate, checkpoint: Checkpoint | None = None, state: dict | None = None) -> FitOutcome:
        """Train; after each completed epoch ``checkpoint(epoch, trainer_state)`` (if given) receives
        everything needed to continue exactly: pass it back as ``state`` to resume."""
        params = problem.trainable_parameters(self.train_dictionary)
        generator = torch.Generator(device=problem.x.device)
        state = state or {}
        stopwatch = Stopwatch(total=state.get("train_time", 0.0))
        previous, stalled_epochs = state.get("previous"), state.get("stalled_epochs", 0)
        weights, optimizer = state.get("weights"), None
        if state.get("optimizer") is not None:
            optimizer = self._optimizer(params)
            optimizer.load_state_dict(state["optimizer"])
        final_annealed_epoch = problem.annealing.final_epoch()
        outcome = None
        for epoch in range(state.get("epoch", -1) + 1, self.max_epochs):
            new_weights = problem.annealing(epoch)
            if new_weights != weights or optimizer is None:  # the objective changed: stale curvature pairs would mislead
                weights, optimizer = new_weights, self._optimizer(params)
            noise_seed = problem.seed * 1_000_003 + epoch  # common random numbers within an epoch

            def closure():
                generator.manual_seed(noise_seed)
                return problem.loss_and_gradients(weights, generator)

            with stopwatch:
                optimizer.step(closure)
            value = evaluate(epoch, weights, stopwatch.total)
            current = float(value.weighted)
            if epoch >= final_annealed_epoch and previous is not None:
                with stopwatch:
                    closure()
                    max_grad = max(float(p.grad.abs().max()) for p in params)
                decision = self.stop_rule.decide(previous, current, max_grad, stalled_epochs)
                stalled_epochs = decision.stalled_epochs
                if decision.restart:
                    optimizer = self._optimizer(params)
                if decision.stop_reason is not None:
                    outcome = FitOutcome(epoch + 1, decision.stop_reason == "converged", decision.stop_reason, stopwatch.total)
            previous = current
            if checkpoint is not None:
                checkpoint(epoch, {
                    "epoch": epoch, "previous": previous, "stalled_epochs": stalled_epochs, "weights": weights,
                    "optimizer": optimizer.state_dict(), "train_time": stopwatch.total,
                    "outcome": outcome,
                })
            if outcome is not None:
                return outcome
        return state.get("outcome") or FitOutcome(self.max_epochs, False, "max_epochs", stopwatch.total)
