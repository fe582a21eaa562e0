"""Benchmark natural-image-patch learning: the fast EM (``experiment=patches_em`` or any overrides) and
the authors' procedure (its sibling ``experiment=patches_em_authors``) on the same data, scaled to a subset.

Prints time per epoch, total training time, peak memory (CUDA: max allocated; CPU: peak RSS of this
process) and the final unweighted full-data ELBO of each.

    python scripts/bench_patches.py                                    # full patches_em + reference on 1/40 of the data
    python scripts/bench_patches.py --full-epochs 2                    # time per epoch of the full run only
    python scripts/bench_patches.py --reference-fraction 0.05 -- dataset.n_patches=20000
    python scripts/bench_patches.py --device cuda --reference-fraction 0              # peak CUDA memory too
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import sparse_elbo


def peak_memory(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA max allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (peak RSS)"


def bench(name: str, overrides: list[str], out: Path, progress: bool = False) -> None:
    cfg = sparse_elbo.compose(overrides)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    summary = sparse_elbo.run(cfg, out / name, overrides=overrides, progress=progress)
    wall = time.perf_counter() - start
    results = sparse_elbo.read_results(summary.results_path)
    epoch_times = np.diff(np.concatenate([[0.0], results.metrics["wall_time"]]))
    print(f"\n== {name}: {' '.join(overrides)}")
    print(
        f"   data {cfg.dataset.n_patches} patches of {cfg.dataset.patch_size}x{cfg.dataset.patch_size}, H={cfg.n_latents}, device {results.attrs['device']}, dtype {cfg.dtype}"
    )
    print(f"   time per epoch (s): {' '.join(f'{t:.2f}' for t in epoch_times)}")
    print(f"   training time {summary.train_time:.2f} s (whole run with data, evaluation, writing: {wall:.2f} s)")
    print(f"   peak memory {peak_memory(results.attrs['device'])}")
    print(
        f"   final full-data ELBO {summary.elbo:.4f} nats/patch; sigma {summary.sigma:.4f}; "
        f"median localisation {np.median(results.final['localisation']):.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="patches_em")
    parser.add_argument(
        "--reference-experiment", default=None, help="the authors' procedure on the same data; default: EXPERIMENT_authors"
    )
    parser.add_argument(
        "--reference-fraction",
        type=float,
        default=1 / 40,
        help="fraction of the patches the authors' procedure runs on (0 to skip)",
    )
    parser.add_argument(
        "--full-epochs",
        type=int,
        default=None,
        help="cap the epochs of the full-size run (its time per epoch is still measured); default: all",
    )
    parser.add_argument("--device", default=None, help="cpu | cuda | auto (default: the experiment's own, auto)")
    parser.add_argument("--progress", action="store_true", help="a progress bar per run (epochs, elapsed time, ELBO)")
    parser.add_argument("overrides", nargs="*", help="extra overrides for both runs")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, CUDA: {torch.cuda.is_available()}")
    if args.device is not None:
        args.overrides = [f"device={args.device}", *args.overrides]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        base = [f"experiment={args.experiment}", *args.overrides]
        capped = [] if args.full_epochs is None else [f"trainer.max_epochs={args.full_epochs}"]
        bench("fast_em", [*base, *capped], out, args.progress)
        if args.reference_fraction > 0:
            n = sparse_elbo.compose(base).dataset.n_patches
            subset = max(512, int(n * args.reference_fraction))
            reference = args.reference_experiment or f"{args.experiment}_authors"
            for name, experiment in (("fast_em_subset", args.experiment), ("authors_reference_subset", reference)):
                bench(name, [f"experiment={experiment}", *args.overrides, f"dataset.n_patches={subset}"], out, args.progress)


if __name__ == "__main__":
    sparse_elbo.retain_freed_memory()  # as the command line does (sparse_elbo/runner/memory.py)
    main()
