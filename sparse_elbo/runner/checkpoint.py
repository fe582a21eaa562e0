"""Checkpoints (everything needed to continue a run exactly) and the signal guard that keeps every
results-file write whole."""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from sparse_elbo.errors import ConfigError
from sparse_elbo.parallel import Ranks
from sparse_elbo.problem import Problem
from sparse_elbo.results import ResultsWriter, read_checkpoint
from sparse_elbo.runner.checks import checkpoint_interval

FORMAT = 3  # the layout of checkpoint.pt: {"format", "model", "posterior", "fit": {"loop", "trainer"}, "torch_rng", "epoch"}


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) arrived while training; ``results_path``: the results file, once it is marked
    ``interrupted``. A ``KeyboardInterrupt``, so that ``except Exception`` does not swallow it."""

    def __init__(self, signum: int, results_path: Path | None = None):
        super().__init__(f"received signal {signum}")
        self.signum, self.results_path = int(signum), results_path


class SignalGuard:
    """Turns SIGTERM into ``RunInterrupted`` — at once while computing, but deferred to the end of a
    results-file write (``with guard.writing():``) so that a write is never cut in half."""

    def __init__(self):
        self.depth, self.pending = 0, None

    def handler(self, signum, frame):
        if self.depth > 0:
            self.pending = signum
            return
        raise RunInterrupted(signum)

    @contextlib.contextmanager
    def writing(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0 and self.pending is not None:
            signum, self.pending = self.pending, None
            raise RunInterrupted(signum)


class Checkpointer:
    """``checkpoint(epoch, fit_state)`` for the training loop: every ``results.checkpoint_every`` epochs,
    once at least ``results.checkpoint_interval_s`` seconds have passed since the last one (or the start),
    atomically replaces ``checkpoint.pt`` beside the results file. In a data-parallel run every rank saves its
    shard (``results.ShardWriter``) before rank 0 saves its own and records the epoch."""

    def __init__(self, cfg: DictConfig, problem: Problem, writer: ResultsWriter, guard: SignalGuard, ranks: Ranks | None = None):
        self.every, self.interval = int(cfg.results.checkpoint_every), checkpoint_interval(cfg)
        self.problem, self.writer, self.guard, self.ranks = problem, writer, guard, ranks or Ranks()
        self.last = time.monotonic()

    def __call__(self, epoch: int, fit_state: dict) -> None:
        if self.every <= 0 or (epoch + 1) % self.every:
            return
        if not self.ranks.any(time.monotonic() - self.last >= self.interval):
            return  # short epochs: a checkpoint (the L-BFGS memory) would cost more than they do
        buffer = io.BytesIO()
        torch.save(
            {
                "format": FORMAT,
                "model": self.problem.model.state_dict(),
                "posterior": self.problem.posterior.state_dict(),
                "fit": fit_state,
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch,
            },
            buffer,
        )
        if not self.ranks.is_main:
            with self.guard.writing():
                self.writer.write_checkpoint(epoch, buffer.getvalue())
        self.ranks.barrier()  # every shard is saved before rank 0 records the epoch
        if self.ranks.is_main:
            with self.guard.writing():
                self.writer.write_checkpoint(epoch, buffer.getvalue())
        self.last = time.monotonic()


def read_checkpoint_state(path: str | Path, rank: int = 0) -> dict:
    """The checkpoint beside the results file ``path`` (``rank``'s shard of it), deserialised (tensors on
    the host)."""
    epoch, blob = read_checkpoint(path, rank)
    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
    if state.get("format") != FORMAT:
        raise ConfigError(
            f"resume={str(path)!r}: its checkpoint was written by an earlier version of sparse_elbo and "
            "cannot be resumed by this one (the results file itself can still be read)"
        )
    if state.get("epoch", epoch) != epoch:
        raise ConfigError(
            f"resume={str(path)!r}: rank {rank}'s checkpoint is of epoch {state['epoch']} but the run's of epoch "
            f"{epoch} (it stopped while saving them); it cannot be resumed"
        )
    return state


def restore(state: dict, problem: Problem) -> dict:
    """Restore the modules and the global RNG from a checkpoint's ``state``; return the training loop's
    saved state (for ``trainers.base.fit``), moved to the run's device."""
    problem.model.load_state_dict(state["model"])
    problem.posterior.load_state_dict(state["posterior"])
    torch.set_rng_state(state["torch_rng"])
    return _to_device(state["fit"], problem.x.device)


def _to_device(value, device):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(item, device) for item in value)
    return value
