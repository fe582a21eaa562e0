"""Benchmark the default bars run (the authors' setting: 5x5 bars, H=10, N=1000) over seeds.

Prints, per seed, the training time to convergence (the trainer's own clock: for the default, the
sparse-coding start, the posterior fits and L-BFGS on W; for trainer=lbfgs, L-BFGS; no interpreter start,
no evaluation, no ground-truth fit),
the final ELBO, the ground-truth ELBO (W fixed to the generator's), min matched |cosine| and recovery,
and the training time at the end of the first epoch that already met the targets (all bars recovered and
ELBO >= ground truth - 0.05: what an oracle stop rule would have spent); then the recovery rate and the
time distributions.

    python scripts/bench_bars.py --seeds 20 [overrides ...]     # e.g. trainer=lbfgs: the authors' joint L-BFGS
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import sparse_elbo

ELBO_MARGIN = 0.05  # the target: final ELBO >= ground-truth ELBO - 0.05 nats


def first_on_target(results_path: Path, threshold: float) -> tuple[int, float] | None:
    """(epoch, training time) at the end of the first epoch with every matched |cos| >= threshold and
    ELBO >= ground-truth ELBO - ELBO_MARGIN, from the per-epoch metrics; None if no epoch met both."""
    results = sparse_elbo.read_results(results_path)
    metrics, target = results.metrics, results.final["ground_truth_elbo"] - ELBO_MARGIN
    for epoch, cosine, elbo, wall in zip(metrics["epoch"], metrics["min_matched_cosine"], metrics["elbo"], metrics["wall_time"]):
        if cosine >= threshold and elbo >= target:
            return int(epoch), float(wall)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. posterior=diag")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, overrides={args.overrides}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            cfg = sparse_elbo.compose([*args.overrides, f"seed={seed}"])
            start = time.perf_counter()
            summary = sparse_elbo.run(cfg, Path(tmp) / f"seed{seed}", progress=False)
            total = time.perf_counter() - start
            gap = summary.elbo - summary.ground_truth_elbo
            on_target = first_on_target(summary.results_path, float(cfg.evaluation.recovery_threshold))
            rows.append((summary, gap, on_target))
            first = "never" if on_target is None else f"epoch {on_target[0] + 1:3d} at {on_target[1]:6.2f} s"
            print(
                f"seed {seed:3d}  train {summary.train_time:6.2f} s  (run incl. eval {total:6.2f} s)  "
                f"epochs {summary.epochs:3d} {summary.stop_reason:9s}  "
                f"ELBO {summary.elbo:.10f}  GT {summary.ground_truth_elbo:.10f}  ELBO-GT {gap:+.4f}  "
                f"min|cos| {summary.min_cosine:.4f}  {'recovered' if summary.recovered else 'NOT recovered'}  "
                f"first on target: {first}",
                flush=True,
            )
    times = [s.train_time for s, _, _ in rows]
    recovered = sum(bool(s.recovered) for s, _, _ in rows)
    good = sum(bool(s.recovered) and gap >= -ELBO_MARGIN for s, gap, _ in rows)
    on_target = [first[1] for _, _, first in rows if first is not None]
    print(
        f"\nrecovered all bars: {recovered}/{len(rows)} seeds; recovered and ELBO >= GT - 0.05: {good}/{len(rows)}\n"
        f"training time: median {statistics.median(times):.2f} s, mean {statistics.mean(times):.2f} s, "
        f"min {min(times):.2f} s, max {max(times):.2f} s"
    )
    if on_target:
        print(
            f"training time until first on target ({len(on_target)}/{len(rows)} seeds): median {statistics.median(on_target):.2f} s, "
            f"min {min(on_target):.2f} s, max {max(on_target):.2f} s"
        )


if __name__ == "__main__":
    sparse_elbo.retain_freed_memory()  # as the command line does (sparse_elbo/runner/memory.py)
    main()
