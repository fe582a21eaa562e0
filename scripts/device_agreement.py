"""Does an accelerator compute what the CPU computes? Short runs in float64 on the CPU and on ``--device``,
side by side, their final numbers compared (the GPU check of ``scripts/device_check.sh``).

Each case runs once per device with the same seed; float64 leaves only the devices' different summation
orders, so the final ELBOs must agree to the case's relative tolerance:

- ``bars`` (1e-9): the default run (full covariances, profile L-BFGS from a sparse-coding start) — to its
  optimum, where rounding does not accumulate (1 against 2 CPU threads: 6e-13);
- ``amortized`` (1e-9): ``experiment=patches_amortized_small`` for two epochs, the encoder in float64
  (``posterior.compute_dtype=null``), batches in data order (minibatch Adam, the closed-form batch gradient);
- ``score`` (1e-9): ``score_dictionary`` (the diagonal Newton fit, 50 iterations) of a random dictionary on
  4,096 whitened patches;
- ``patches_em`` (1e-3): ``experiment=patches_em_small_prior_annealing annealing=none`` for one epoch (diagonal q, the fused
  E-step kernels, block L-BFGS, the closed-form M-step). Its line searches branch on rounding, so the
  tolerance is loose: 1 against 2 CPU threads move this epoch's ELBO by 3e-5, and the annealed epochs of
  the same setting by 2e-3.

Runs whose start draws random numbers on the device (epoch subsets, a MAP start from a random subset,
shuffled batches) are left out: a device's generator gives other numbers than the CPU's.

    python scripts/device_agreement.py --device cuda        # exit status 1 if any case disagrees

With ``--device cpu`` both sides are the CPU (a check of the script itself).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import sparse_elbo
from sparse_elbo.runner.build import build

CASES = {  # name: (overrides, relative tolerance); "score" is score_dictionary, not a run
    "bars": ([], 1e-9),
    "amortized": (
        [
            "experiment=patches_amortized_small",
            "dtype=float64",
            "posterior.compute_dtype=null",
            "trainer.max_epochs=2",
            "trainer.shuffle=false",  # the batches in data order: a device's own random permutation would differ
            "dataset.held_out=0",
        ],
        1e-9,
    ),
    "score": ([], 1e-9),
    "patches_em": (
        ["experiment=patches_em_small_prior_annealing", "dtype=float64", "trainer.max_epochs=1", "annealing=none"],
        1e-3,
    ),
}


def run_elbo(overrides: list[str], device: str, out: Path) -> tuple[float, float]:
    """-> the final full-data ELBO of a run with ``overrides`` on ``device`` (its results in ``out``), and
    its training time."""
    cfg = sparse_elbo.compose([*overrides, f"device={device}"])
    summary = sparse_elbo.run(cfg, out, overrides=overrides, progress=False)
    return summary.elbo, summary.train_time


def score_elbo(device: str) -> tuple[float, float]:
    """-> ``score_dictionary`` (50 Newton iterations) of a random unit-norm dictionary on 4,096 patches of
    ``patches_em_small_prior_annealing``, and its time."""
    problem = build(
        sparse_elbo.compose(["experiment=patches_em_small_prior_annealing", "dtype=float64", "dataset.n_patches=4096"])
    ).problem
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(problem.x.shape[1], problem.model.W.shape[1], generator=generator, dtype=torch.float64)
    W = W / W.norm(dim=0)
    start = time.perf_counter()
    score = sparse_elbo.score_dictionary(problem.x.to(device), W.to(device), max_iterations=50)
    return score.elbo, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset")
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = [case for case in cases if case not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; allowed: {list(CASES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} but torch {torch.__version__} sees no CUDA device")
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            overrides, tolerance = CASES[case]
            out = Path(tmp) / case
            if case == "score":
                (cpu, cpu_time), (dev, dev_time) = score_elbo("cpu"), score_elbo(args.device)
            else:
                (cpu, cpu_time) = run_elbo(overrides, "cpu", out / "reference")
                (dev, dev_time) = run_elbo(overrides, args.device, out / "device")
            difference = abs(dev - cpu) / max(abs(cpu), 1e-300)
            verdict = "agree" if difference <= tolerance else "DISAGREE"
            if verdict != "agree":
                failed.append(case)
            print(
                f"{case:11s} cpu {cpu:.10f} ({cpu_time:.2f} s)  {args.device} {dev:.10f} ({dev_time:.2f} s)  "
                f"relative difference {difference:.1e} (tolerance {tolerance:.0e}): {verdict}",
                flush=True,
            )
    print("all cases agree" if not failed else f"cases that disagree: {', '.join(failed)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    sparse_elbo.retain_freed_memory()  # as the command line does (sparse_elbo/runner/memory.py)
    main()
