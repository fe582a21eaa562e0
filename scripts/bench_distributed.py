"""Data-parallel runs against one process on this machine (docs/benchmarks.md, "Data-parallel runs";
docs/scaling.md).

Runs one setting (default ``experiment=patches_em``, the paper's size) three ways — 1 process with 1 thread,
2 ranks under ``torchrun --standalone`` with 1 thread each (gloo), 1 process with 2 threads — one after the
other, and prints for each the training time (``/final/train_time``, rank 0's), the wall time of the command,
the final ELBO, the median localisation, the peak resident memory of the largest process, and the parallel
efficiency ``T(1 rank × 1 thread) / (2 · T(2 ranks))``. ``--memory`` adds the memory setting: full-covariance
posteriors at H = 400 on 1,024 patches, one epoch, on 1 and on 2 ranks (peak memory per rank).

It also prints the bytes one EM iteration all-reduces (two float64 all-reduces of the sufficient statistics,
``D·H + H² + H + 1`` numbers each, docs/scaling.md) for the setting's sizes.

    python scripts/bench_distributed.py [--ways 1x1,2x1,1x2] [--memory] [overrides ...]   (--ways "": the memory setting alone)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import sparse_elbo

MEMORY_SETTING = [
    "experiment=patches_em",
    "posterior=full",
    "n_latents=400",
    "dataset.n_patches=1024",
    "trainer.subset_size=null",
    "trainer.average_last_epochs=1",
    "trainer.max_epochs=1",
    "trainer.em_iterations_per_epoch=1",
    "annealing=none",
    "trainer.driver.iterations=2",
    "trainer.driver.history_size=2",
    "device=cpu",
]


def launch(overrides: list[str], folder: Path, ranks: int, threads: int) -> dict:
    """One run in a child process (``torchrun`` for several ranks); its measured figures."""
    train = ["-m", "sparse_elbo.train", *overrides, f"hydra.run.dir={folder}"]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *train]
    else:
        command = [sys.executable, *train]
    # the child reports the peak resident memory of its own largest descendant (a rank)
    probe = "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
    probe += "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe, *command], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed ({ranks} ranks × {threads} threads): {done.stdout[-2000:]}{done.stderr[-2000:]}")
    peak = int(done.stdout.rsplit("PEAK_RSS_KB", 1)[1].split()[0]) / 2**20  # GiB
    results = sparse_elbo.read_results(folder / "results.h5")
    final = results.final
    localisation = final.get("localisation")
    return {
        "train_time": float(final["train_time"]),
        "wall": wall,
        "elbo": float(final["elbo"]),
        "localisation": float(np.median(localisation)) if localisation is not None else float("nan"),
        "peak_gib": peak,
        "sizes": (int(results.final["W"].shape[0]), int(results.final["W"].shape[1])),
    }


def allreduced_bytes(D: int, H: int) -> int:
    """Per EM iteration: two all-reduces of float64 sums Σ‖x‖² (1), Σ x μᵀ (D·H), Σ E[z zᵀ] (H²), Σ E|z| (H)."""
    return 2 * 8 * (1 + D * H + H * H + H)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ways", default="1x1,2x1,1x2", help="ranks x threads per rank, comma-separated")
    parser.add_argument("--memory", action="store_true", help="also the full-covariance H = 400 memory setting")
    parser.add_argument("overrides", nargs="*", default=["experiment=patches_em", "device=cpu"])
    arguments = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    print(f"{os.cpu_count()} cores; overrides: {' '.join(arguments.overrides)}")
    print("| ranks × threads | training time | wall time | ELBO | median localisation | peak memory per rank | efficiency |")
    print("|---|---|---|---|---|---|---|")
    measured = {}
    for way in [way for way in arguments.ways.split(",") if way]:
        ranks, threads = (int(part) for part in way.split("x"))
        figures = launch(arguments.overrides, scratch / way, ranks, threads)
        measured[way] = figures
        base = measured.get("1x1")
        efficiency = f"{base['train_time'] / (ranks * threads * figures['train_time']):.0%}" if base else "—"
        print(
            f"| {ranks} × {threads} | {figures['train_time']:.1f} s | {figures['wall']:.1f} s | {figures['elbo']:.4f} | "
            f"{figures['localisation']:.3f} | {figures['peak_gib']:.2f} GiB | {efficiency} |",
            flush=True,
        )
    if measured:
        D, H = next(iter(measured.values()))["sizes"]
        print(f"all-reduced per EM iteration at D = {D}, H = {H}: {allreduced_bytes(D, H) / 1024:.0f} KiB")
    if arguments.memory:
        print("\nfull covariances, H = 400, 1,024 patches, one epoch:")
        print("| ranks | training time | peak memory per rank |\n|---|---|---|")
        for ranks in (1, 2):
            figures = launch(MEMORY_SETTING, scratch / f"memory{ranks}", ranks, 1)
            print(f"| {ranks} | {figures['train_time']:.1f} s | {figures['peak_gib']:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
