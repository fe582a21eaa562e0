"""What watching a run costs (docs/benchmarks.md, "Loggers"): the time each ``logger=`` backend adds per epoch.

For a setting, each logger (none, csv, tensorboard, mlflow) runs ``--short`` and ``--long`` epochs, the loggers
interleaved and every run repeated ``--repeats`` times, each timed from the call of ``sparse_elbo.run`` to its
return (so the backends' work on their worker thread and the wait for it at the end are counted). A run's time
grows by the same one-off cost (building, the start, opening and closing the backend) at both lengths, so the
time per epoch is the slope ``(T_long - T_short) / (long - short)`` of the medians; the overhead is a logger's
slope against ``logger=none``'s. Stop rules are off, so both lengths run every epoch. The backends work on their
own thread, so on a busy machine the slope is noisy; the script also prints each backend's CPU time per epoch,
measured on its thread (``time.thread_time``) by replaying the long run's records through it.

    python scripts/bench_loggers.py                                   # the default bars run
    python scripts/bench_loggers.py --short 2 --long 6 experiment=patches_em_small
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import sparse_elbo
from sparse_elbo.runner.loggers import CSVLogger, LogContext, epoch_record
from sparse_elbo.runner.tracking import MLflowLogger, TensorBoardLogger

LOGGERS = ("none", "csv", "tensorboard", "mlflow")
BACKENDS = {"csv": CSVLogger, "tensorboard": TensorBoardLogger, "mlflow": MLflowLogger}


def records(results_path: Path) -> list:
    """The epoch records of a finished run, as the runner hands them to a logger."""
    results = sparse_elbo.read_results(results_path)
    metrics, snapshots = results.metrics, results.snapshots["W"]
    return [epoch_record({key: values[e] for key, values in metrics.items()}, snapshots[e]) for e in range(len(snapshots))]


def cpu_per_epoch(results_path: Path, folder: Path) -> dict[str, float]:
    """Seconds of CPU per epoch of each backend, replaying the run's records on this thread."""
    replay, out = records(results_path), {}
    for name, backend_class in BACKENDS.items():
        backend = backend_class()
        (folder / name).mkdir(parents=True)
        backend.open(LogContext(folder / name / "results.h5", {"replay": True}, [name]))
        start = time.thread_time()
        for record in replay:
            backend.epoch(record)
        out[name] = (time.thread_time() - start) / len(replay)
        backend.close("replayed", replay[-1])
    return out


def seconds(overrides: list[str], epochs: int, logger: str, folder: Path) -> float:
    cfg = sparse_elbo.compose([*overrides, f"trainer.max_epochs={epochs}", f"logger={logger}"])
    start = time.perf_counter()
    sparse_elbo.run(cfg, folder, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", type=int, default=4)
    parser.add_argument("--long", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=patches_em_small")
    args = parser.parse_args()
    sparse_elbo.retain_freed_memory()  # as the command line does
    setting = sparse_elbo.compose(args.overrides)
    no_stop = ["trainer.relative_tolerance=0"] if "relative_tolerance" in setting.trainer else []
    overrides = [*args.overrides, *no_stop, "results.checkpoint_interval_s=0"]
    times = {(logger, n): [] for logger in LOGGERS for n in (args.short, args.long)}
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # MLflow's default store, mlruns/, goes under the working directory
        for repeat in range(args.repeats):
            for n in (args.short, args.long):
                for logger in LOGGERS:
                    folder = Path(tmp) / f"{logger}_{n}_{repeat}"
                    times[(logger, n)].append(seconds(overrides, n, logger, folder))
                    print(f"{logger:12s} {n:3d} epochs: {times[(logger, n)][-1]:7.2f} s", flush=True)
        cpu = cpu_per_epoch(Path(tmp) / f"none_{args.long}_0" / "results.h5", Path(tmp) / "replay")
    median = {key: statistics.median(values) for key, values in times.items()}
    slope = {
        logger: (median[(logger, args.long)] - median[(logger, args.short)]) / (args.long - args.short) for logger in LOGGERS
    }
    print(f"\noverrides {args.overrides}; medians of {args.repeats}; epochs {args.short} and {args.long}")
    print("| logger | run, short | run, long | time per epoch | overhead per epoch (wall) | backend CPU per epoch |")
    print("|---|---|---|---|---|---|")
    for logger in LOGGERS:
        extra, busy = slope[logger] - slope["none"], cpu.get(logger, 0.0)
        print(
            f"| {logger} | {median[(logger, args.short)]:.2f} s | {median[(logger, args.long)]:.2f} s | {slope[logger]:.3f} s | "
            f"{extra * 1000:+.1f} ms ({extra / slope['none']:+.1%}) | {busy * 1000:.2f} ms ({busy / slope['none']:.1%}) |"
        )


if __name__ == "__main__":
    main()
