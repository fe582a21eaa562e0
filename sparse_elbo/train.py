"""Command-line entry point: ``python -m sparse_elbo.train [overrides]`` (also ``sparse-elbo``; Hydra).

Only assembles: composes the config, hands it to ``sparse_elbo.runner.run``, prints the summary and
returns the final ELBO (so that a Hydra sweeper such as Optuna can maximise it). It keeps freed memory in
malloc's heap for reuse (``runner/memory.py``), which ``run`` itself leaves alone. User errors print one
line and exit with status 2 (``sparse_elbo.cli``); a run stopped by SIGTERM or Ctrl-C prints one line
naming its results file (marked ``interrupted``) and how to resume it, and exits with 128 + the signal.
"""

from __future__ import annotations

import os
import signal
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from sparse_elbo import parallel
from sparse_elbo.cli import exit_on_user_error, report_user_errors
from sparse_elbo.config import config_dir
from sparse_elbo.runner import memory, run
from sparse_elbo.runner.checkpoint import RunInterrupted


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    # the command line's choice for its process (runner/memory.py), here rather than in main(): launchers
    # (joblib, submitit) run this function in each job's own process
    memory.retain_freed_memory()
    hydra_cfg = HydraConfig.get()
    try:
        group = hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else None  # a sweep's jobs are logged together
        summary = run(cfg, hydra_cfg.runtime.output_dir, overrides=list(hydra_cfg.overrides.task), group=group)
    except RunInterrupted as error:
        if hydra_cfg.mode == RunMode.RUN:
            exit_interrupted(error)
        raise
    except Exception as error:
        if hydra_cfg.mode == RunMode.RUN:  # in a sweep the other jobs go on; Hydra reports the failed ones
            exit_on_user_error(error)
        raise
    finally:
        parallel.leave()  # a data-parallel run's process group, joined by run (the process's own)
    if os.environ.get("RANK", "0") == "0":  # a data-parallel run's summary is rank 0's (docs/scaling.md)
        print("\n".join(summary.lines()))
    return summary.elbo


def exit_interrupted(error: RunInterrupted) -> None:
    """One line on stderr: the signal, the results file (marked ``interrupted``) and the override that
    continues it; exit status 128 + the signal, as a shell reports a process the signal ended."""
    path = error.results_path
    print(
        f"interrupted by {signal.Signals(error.signum).name}: {path} is marked interrupted; continue it with resume={path}",
        file=sys.stderr,
    )
    sys.exit(128 + error.signum)


def main() -> None:
    report_user_errors(hydra_main)


if __name__ == "__main__":
    main()
