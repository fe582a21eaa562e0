"""One run, start to end: build, train with the shared epoch loop, evaluate, write ``results.h5``; or
resume a run from its checkpoint. Every exit leaves the results file readable and marked
``finished``, ``failed`` or ``interrupted``. A run changes no process-wide setting for good: its SIGTERM
handler is in place only while it trains (the caller's is put back). Tuning malloc to keep freed memory
for reuse (``memory.py``) is the process's owner's choice: the command line makes it
(``sparse_elbo.train``, ``encode``, ``denoise``), a script calls ``sparse_elbo.retain_freed_memory()``."""

from __future__ import annotations

import platform
import signal
import threading
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from sparse_elbo.errors import ConfigError, MissingFileError, UserError
from sparse_elbo.parallel import Ranks
from sparse_elbo.results import ResultsWriter, ShardWriter, read_results, require_new_results_file
from sparse_elbo.runner.build import Components, build, resolve_device, results_path
from sparse_elbo.runner.checkpoint import Checkpointer, RunInterrupted, SignalGuard, read_checkpoint_state, restore
from sparse_elbo.runner.final import RunSummary, final_evaluation, write_posterior
from sparse_elbo.runner.loggers import LogContext, RunLogger
from sparse_elbo.runner.record import EpochRecorder
from sparse_elbo.trainers.base import fit
from sparse_elbo.version import __version__


def _versions() -> str:
    import h5py
    import hydra

    return (
        f"sparse_elbo={__version__} torch={torch.__version__} numpy={np.__version__} "
        f"h5py={h5py.__version__} hydra={hydra.__version__} python={platform.python_version()}"
    )


def run(
    cfg: DictConfig,
    output_dir: str | Path,
    overrides: list[str] | None = None,
    progress: bool | None = None,
    group: str | None = None,
) -> RunSummary:
    """Run one experiment and write ``output_dir/results.h5`` — or, with ``resume=PATH`` in the config,
    continue the run stored in ``PATH`` from its last checkpoint, in the same file; return the summary.
    ``group``: the sweep the run is a job of (its folder), for the loggers' grouping."""
    if cfg.get("resume"):
        return resume(cfg.resume, progress=progress)
    ranks = _ranks(cfg)
    path = ranks.from_main(results_path(output_dir))  # a data-parallel run's one results file: rank 0's
    _on_main(ranks, require_new_results_file, path)
    components = build(cfg, ranks)
    attrs = {
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "overrides": "\n".join(overrides or []),
        "versions": _versions(),
        "seed": int(cfg.seed),
        "device": str(components.problem.x.device),
        "dtype": str(cfg.dtype),
        "group": group or "",
        "ranks": ranks.size,
    }
    writer = ResultsWriter(path, attrs=attrs) if ranks.is_main else ShardWriter(path, ranks.rank)
    dataset = components.dataset
    if dataset.W_true is not None:
        writer.write_group("data", {"W_true": dataset.W_true})
    if dataset.image_shape is not None:
        writer.write_group("data", {"image_shape": np.asarray(dataset.image_shape)})
    return _train(cfg, components, writer, None, progress, attrs, ranks)


def _on_main(ranks: Ranks, check, *arguments) -> None:
    """``check(*arguments)`` on rank 0, its user error raised on every rank (before rank 0 makes the file)."""
    error = None
    if ranks.is_main:
        try:
            check(*arguments)
        except UserError as raised:
            error = raised
    error = ranks.from_main(error)
    if error is not None:
        raise error


def _ranks(cfg: DictConfig) -> Ranks:
    """This process's place in a data-parallel run (torchrun, Slurm), or rank 0 of 1."""
    return Ranks.from_environment(resolve_device(str(cfg.get("device", "cpu"))).type)


def resume(path: str | Path, progress: bool | None = None) -> RunSummary:
    """Continue a run from ``path`` (its results.h5): the stored config is rebuilt and validated, W, σ², λ,
    the posteriors, the trainer's state (optimiser memory, annealing position = epoch, stop-rule
    bookkeeping), the RNG state and the epoch are restored, and training goes on in the same file."""
    path = Path(str(path))
    if not path.is_file():
        raise MissingFileError(f"resume={str(path)!r}: no such results file")
    stored = read_results(path)
    cfg = OmegaConf.create(stored.config)
    ranks, trained_on = _ranks(cfg), int(stored.attrs.get("ranks", 1))
    if ranks.size != trained_on:
        raise ConfigError(
            f"resume={str(path)!r}: the run was trained on {trained_on} rank(s) and continues only on as many "
            f"(torchrun --nproc_per_node={trained_on} -m sparse_elbo.train resume=...), not on {ranks.size}"
        )
    state = read_checkpoint_state(path, ranks.rank)
    components = build(cfg, ranks)
    saved = restore(state, components.problem)
    writer = ResultsWriter(path, resume=True) if ranks.is_main else ShardWriter(path, ranks.rank)
    writer.truncate_to_epoch(saved["loop"]["epoch"])
    return _train(cfg, components, writer, saved, progress, stored.attrs, ranks)


def _logger(cfg: DictConfig, components: Components, path: Path, start_epoch: int, attrs: dict) -> RunLogger | None:
    """The run's logger (``loggers.py``), opened; None for ``logger=none``."""
    backend = components.logger
    if not backend.active:
        return None
    logger = RunLogger(backend, backend.option)
    overrides = [line for line in str(attrs.get("overrides", "")).splitlines() if line]
    context = LogContext(
        results_path=path,
        config=OmegaConf.to_container(cfg, resolve=True),
        overrides=overrides,
        group=str(attrs.get("group", "")) or None,
        first_epoch=start_epoch,
        image_shape=components.dataset.image_shape,
    )
    logger.open(context)
    return logger


def _train(
    cfg: DictConfig, components: Components, writer, saved: dict | None, progress, attrs: dict, ranks: Ranks
) -> RunSummary:
    """Train, evaluate and close the results file; in a data-parallel run every rank trains its shard (sums
    over every rank's data: ``parallel.Ranks.sharing``), rank 0 alone writes, logs and shows progress."""
    with ranks.sharing():
        return _train_sharing(cfg, components, writer, saved, progress if ranks.is_main else False, attrs, ranks)


def _train_sharing(
    cfg: DictConfig, components: Components, writer, saved: dict | None, progress, attrs: dict, ranks: Ranks
) -> RunSummary:
    problem, trainer = components.problem, components.trainer
    start_epoch = 0 if saved is None else saved["loop"]["epoch"] + 1
    logger = _logger(cfg, components, writer.path, start_epoch, attrs) if ranks.is_main else None
    bar = tqdm(
        total=trainer.max_epochs,
        initial=start_epoch,
        desc="epochs",
        disable=None if progress is None else not progress,
        leave=False,
    )
    guard = SignalGuard()
    previous_handler = (
        signal.signal(signal.SIGTERM, guard.handler) if threading.current_thread() is threading.main_thread() else None
    )
    evaluate = EpochRecorder(cfg, components, writer, guard, bar, logger)
    try:
        outcome = fit(trainer, problem, evaluate, Checkpointer(cfg, problem, writer, guard, ranks), saved)
        bar.close()
        final, summary = final_evaluation(cfg, components, outcome, writer.path)
        with guard.writing():
            writer.write_group("final", final)
            write_posterior(cfg, problem.posterior, writer)
    except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM as RunInterrupted
        _close(writer, guard, bar, "interrupted", repr(error))
        _close_logger(logger, "interrupted", evaluate.last)
        signum = error.signum if isinstance(error, RunInterrupted) else signal.SIGINT
        raise RunInterrupted(signum, writer.path) from error
    except BaseException as error:
        _close(writer, guard, bar, "failed", f"{type(error).__name__}: {error}")
        _close_logger(logger, "failed", evaluate.last)
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    with guard.writing():
        writer.close("finished")
    _close_logger(logger, "finished", evaluate.last)
    return summary


def _close_logger(logger: RunLogger | None, status: str, last) -> None:
    """After the results file is closed (so that a finished file is complete when a backend copies it)."""
    if logger is not None:
        logger.close(status, last)


def _close(writer: ResultsWriter, guard: SignalGuard, bar, status: str, reason: str) -> None:
    bar.close()
    guard.depth += 1  # a second SIGTERM must not cut the status write short
    writer.close(status, reason=reason)
