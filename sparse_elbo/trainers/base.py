"""The trainer contract, and the epoch loop every trainer shares (docs/design.md §7).

A trainer is a learning algorithm. It declares once, as data, what it can train (``capabilities``); it
makes its state for a run (``start``: a fresh state and the run's start, or the saved state of a run being
resumed); and it trains one epoch at a time (``train_epoch``). Everything around the epochs is ``fit``'s,
written once for every trainer: the stopwatch, the annealing weights of each epoch (with ``λ_0``, computed
once after the trainer's start where the schedule holds the prior's scale), the evaluation after each epoch,
the stop rule, checkpoints, and resuming from one. A variant of a trainer is a new class that extends it
(``trainers/subsets.py`` extends EM, ``trainers/semi_amortized.py`` extends Adam), with its own capabilities.

    outcome = fit(trainer, problem, evaluate)            # evaluate(epoch, weights, train_time) -> ObjectiveValue
    outcome = fit(trainer, problem, evaluate, checkpoint=save, saved=state)   # save(epoch, state); resume
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Protocol

import torch

from sparse_elbo.annealing import AnnealingWeights, initial_prior_scale
from sparse_elbo.problem import Problem
from sparse_elbo.trainers.convergence import StopRule

KINDS = ("per_data_point", "amortized")  # the kinds of posterior family (``Posterior.kind``)
OBJECTIVES = ("sampled", "analytic", "entropy")


@dataclass(frozen=True)
class Capabilities:
    """What a trainer can train: kinds of posterior family (``per_data_point``, ``amortized``), objectives (by
    name), whether it follows an annealing schedule (False: it maximises the unweighted objective only), the
    schedules' ``prior_scale`` settings it can follow (``fixed``: it passes ``λ_0`` on to its E-step or
    objective), the family features it needs (``Posterior.features``), whether it runs data-parallel and
    whether it can leave the data in their file (docs/scaling.md)."""

    posteriors: tuple[str, ...]
    objectives: tuple[str, ...]
    annealing: bool
    prior_scales: tuple[str, ...] = ("optimal",)
    features: tuple[str, ...] = ()
    data_parallel: bool = False  # it runs on several ranks, each with a shard of the data (parallel.py)
    streams_data: bool = False  # it reads the data by rows (minibatches, blocks): they may stay in their file


@dataclass(frozen=True)
class Sizes:
    """The sizes that decide a run's memory: data points, D, H and the posterior's parameter count."""

    n_data: int
    n_observed: int
    n_latents: int
    posterior_numbers: int


@dataclass
class FitOutcome:
    epochs: int
    converged: bool
    stop_reason: str
    train_time: float


@dataclass
class EpochReport:
    """What an epoch may say besides its parameters: that the trainer itself ends the run (e.g. a fit that
    converged, or reached its iteration cap, within its one epoch)."""

    stop_reason: str | None = None
    converged: bool = False


class TrainerState(Protocol):
    """A trainer's own state for one run (optimiser memory, generators, ...)."""

    def state_dict(self) -> dict:
        """Everything needed to continue exactly; passed back to ``Trainer.start`` to resume."""


@dataclass
class NoState:
    """The state of a trainer that keeps none between epochs (its parameters live in the modules)."""

    def state_dict(self) -> dict:
        return {}


class Trainer(ABC):
    """The contract every trainer follows (module docstring)."""

    capabilities: ClassVar[Capabilities]
    max_epochs: int
    stop_rule: StopRule | None = None  # None: train for max_epochs
    train_dictionary: bool = True

    @abstractmethod
    def start(self, problem: Problem, saved: dict | None) -> TrainerState:
        """The state for a new run — and the run's start, counted as training time (an initial dictionary,
        initial codes) — or, given ``saved`` (a ``state_dict()``), the state of a run being resumed."""

    @abstractmethod
    def train_epoch(self, problem: Problem, state: TrainerState, epoch: int, weights: AnnealingWeights) -> EpochReport | None:
        """Train one epoch with the annealing weights of that epoch."""

    def required_features(self) -> tuple[str, ...]:
        """The family features this trainer needs (its capabilities', unless a setting adds some)."""
        return self.capabilities.features

    @abstractmethod
    def working_memory(self, sizes: Sizes) -> int:
        """A lower bound on the numbers (not bytes) training holds at once beyond the data: parameters,
        optimiser memory, the largest temporaries. Checked against the device's memory before allocating."""

    def largest_gradient(self, problem: Problem, state: TrainerState) -> float:
        """The largest absolute gradient entry of the objective at the current parameters (for a stop rule
        with a gradient test)."""
        raise TypeError(f"{type(self).__name__} has no gradient test")

    def restart(self, state: TrainerState) -> None:
        """Empty the optimiser's memory after an epoch without progress (stop rule)."""

    def evaluated_points(self, problem: Problem, epoch: int) -> torch.Tensor | None:
        """The data points (indices) whose posteriors ``epoch`` fitted, when it fitted only some (a trainer
        that works on a subset per epoch): that epoch's record covers these. None: all of them."""
        return None


@dataclass
class Stopwatch:
    """Accumulates training time, excluding evaluation."""

    total: float = 0.0
    _start: float | None = field(default=None, repr=False)

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.total += time.perf_counter() - self._start
        return False


@dataclass
class LoopState:
    """The loop's own bookkeeping, saved with every checkpoint: the last completed epoch, its unweighted
    objective, the no-progress count, the training time (and the part of it the trainer's start took), ``λ_0``
    (where the schedule holds the prior's scale) and the outcome once decided."""

    epoch: int = -1
    previous: float | None = None
    stalled_epochs: int = 0
    train_time: float = 0.0
    start_time: float = 0.0
    prior_scale: float | None = None
    outcome: FitOutcome | None = None

    @classmethod
    def from_dict(cls, saved: dict) -> LoopState:
        outcome = saved.get("outcome")
        return cls(**{**saved, "outcome": None if outcome is None else FitOutcome(**outcome)})


# evaluate(epoch, weights, train_time) after every epoch: logs, and returns the full-data objective
Evaluate = Callable[[int, AnnealingWeights, float], object]
# checkpoint(epoch, {"loop": ..., "trainer": ...}) after every completed epoch
Checkpoint = Callable[[int, dict], None]


def fit(
    trainer: Trainer, problem: Problem, evaluate: Evaluate, checkpoint: Checkpoint | None = None, saved: dict | None = None
) -> FitOutcome:
    """Train ``problem`` with ``trainer`` for up to ``trainer.max_epochs`` epochs (module docstring);
    ``saved``: a checkpoint's state, to continue that run exactly."""
    loop = LoopState() if saved is None else LoopState.from_dict(saved["loop"])
    stopwatch = Stopwatch(total=loop.train_time)
    with stopwatch:
        state = trainer.start(problem, None if saved is None else saved["trainer"])
        if saved is None and problem.annealing.holds_prior_scale:  # λ_0 of the run's start (annealing.py)
            loop.prior_scale = initial_prior_scale(problem.x, problem.model.W.detach(), problem.model.prior)
        if problem.x.is_cuda:
            torch.cuda.synchronize()
    if saved is None:
        loop.start_time = stopwatch.total
    final_annealed_epoch = problem.annealing.final_epoch()
    for epoch in range(loop.epoch + 1, trainer.max_epochs):
        weights = problem.annealing(epoch, loop.prior_scale)
        with stopwatch:
            report = trainer.train_epoch(problem, state, epoch, weights) or EpochReport()
            if problem.x.is_cuda:
                torch.cuda.synchronize()
        elbo = evaluate(epoch, weights, stopwatch.total).elbo
        current = float(elbo.detach() if torch.is_tensor(elbo) else elbo)
        if report.stop_reason is not None:
            loop.outcome = FitOutcome(epoch + 1, report.converged, report.stop_reason, stopwatch.total)
        elif trainer.stop_rule is not None and epoch >= final_annealed_epoch and loop.previous is not None:
            _apply_stop_rule(trainer, problem, state, loop, epoch, current, stopwatch)
        loop.epoch, loop.previous, loop.train_time = epoch, current, stopwatch.total
        if checkpoint is not None:
            checkpoint(epoch, {"loop": asdict(loop), "trainer": state.state_dict()})
        if loop.outcome is not None:
            return loop.outcome
    return loop.outcome or FitOutcome(trainer.max_epochs, False, "max_epochs", stopwatch.total)


def _apply_stop_rule(
    trainer: Trainer, problem: Problem, state, loop: LoopState, epoch: int, current: float, stopwatch: Stopwatch
) -> None:
    rule = trainer.stop_rule
    max_gradient = None
    if rule.needs_gradient:
        with stopwatch:
            max_gradient = trainer.largest_gradient(problem, state)
    decision = rule.decide(loop.previous, current, max_gradient, loop.stalled_epochs)
    loop.stalled_epochs = decision.stalled_epochs
    if decision.restart:
        trainer.restart(state)
    if decision.stop_reason is not None:
        loop.outcome = FitOutcome(epoch + 1, decision.stop_reason == "converged", decision.stop_reason, stopwatch.total)
