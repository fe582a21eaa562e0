"""Amortised against per-data-point posteriors on the bars, on the same held-out split (20 % of the points):
``experiment=bars_amortized`` (residual encoder, low-rank-plus-diagonal covariance, Adam from the MAP
sparse-coding dictionary, W's gradient at the encoder's output refined per point: semi-amortised), the same
with W's gradient at the encoder's output itself (``trainer=adam``, plain amortised)
and one full covariance per data point (the default profile L-BFGS). Per seed:
whether every bar is recovered (min matched |cos| ≥ 0.95), the training time, the held-out ELBO of the
encoder and after refining q per point (their difference is the amortisation gap) and the importance-sampled
held-out log p(x).

    python scripts/bench_bars_amortized.py --seeds 0 1 2 3 4 5 6 7 8 9 [-- overrides for the amortised runs]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import sparse_elbo

SETTINGS = {
    "semi-amortised": ["experiment=bars_amortized"],
    "amortised": ["experiment=bars_amortized", "trainer=adam"],
    "per-point full": ["posterior=full", "evaluation.held_out_fraction=0.2"],
}


def one(name: str, overrides: list[str], out: Path) -> dict:
    summary = sparse_elbo.run(sparse_elbo.compose(overrides), out, progress=False)
    final = sparse_elbo.read_results(summary.results_path).final
    return {
        "min_cos": float(final["min_matched_cosine"]),
        "time": summary.train_time,
        "encoder": float(final["held_out_elbo_encoder"]) if "held_out_elbo_encoder" in final else float("nan"),
        "refined": float(final["held_out_elbo_refined"]),
        "log_px": float(final["held_out_log_px"]),
        "log_px_se": float(final["held_out_log_px_stderr"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("overrides", nargs="*", help="extra overrides for the amortised runs")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    recovered = {name: 0 for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name, overrides in SETTINGS.items():
                extra = args.overrides if name != "per-point full" else []
                row = one(name, [*overrides, f"seed={seed}", *extra], Path(tmp) / f"{name}_{seed}")
                recovered[name] += row["min_cos"] >= 0.95
                gap = row["refined"] - row["encoder"]
                print(
                    f"seed {seed} {name:15s} min |cos| {row['min_cos']:.3f}  train {row['time']:6.1f} s  "
                    f"held-out ELBO encoder {row['encoder']:8.3f} refined {row['refined']:8.3f} (gap {gap:.3f})  "
                    f"log p(x) {row['log_px']:8.3f} +- {row['log_px_se']:.3f}",
                    flush=True,
                )
    for name, count in recovered.items():
        print(f"{name}: all bars on {count} / {len(args.seeds)} seeds")


if __name__ == "__main__":
    sparse_elbo.retain_freed_memory()  # as the command line does (sparse_elbo/runner/memory.py)
    main()
