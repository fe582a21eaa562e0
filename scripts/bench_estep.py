"""The E-step of the fast EM against this machine's floor (docs/benchmarks.md, "E-step floor").

Measures, in float32 on the chosen device:

1. the matmul rate, ``(N,H) @ (H,H)``, and the memory bandwidth, ``c = a + b`` over (N,H) arrays;
2. one evaluation of the fused E-step objective and its gradient (``DiagonalLaplaceEntropyEStep``) over the
   whole data in blocks, against its floor: ``max(2NH² / matmul rate, 5·4NH bytes / bandwidth)`` — the
   product ``μ G`` and, for a perfectly fused kernel, reading μ, log s, ``Wᵀx`` and writing two gradients;
3. ``sparse_elbo.score_dictionary`` (``max_q L_H`` at a fixed W, O(N·H²) per iteration) at the initial W;
4. one unannealed epoch of ``experiment=patches_em_prior_annealing`` (``patches_em``'s EM from its random start)
   over all of the same data (overrides after ``--``): its time, how many objective evaluations it made (the
   E-step driver's own count), and how that time splits, at the measured time of one evaluation, between the
   evaluations and everything else (L-BFGS's own vector work, the sufficient statistics, the M-step).

    python scripts/bench_estep.py                       # N = 40,960 (the epoch part scales linearly in N)
    python scripts/bench_estep.py --n-patches 204800 --skip-epoch
"""

from __future__ import annotations

import argparse
import time

import torch

import sparse_elbo
from sparse_elbo.annealing import AnnealingWeights
from sparse_elbo.inference import kernels
from sparse_elbo.inference.statistics import SufficientStatistics, data_blocks, total
from sparse_elbo.runner.build import build


def synchronize() -> None:
    """Wait for the GPU's queued work (a CUDA clock reads the launches, not the work, otherwise)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds(function, repeats: int = 5) -> float:
    """Best of ``repeats`` wall times of ``function()`` (after one warm-up call), its device work included."""
    function()
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        function()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def machine_rates(n: int, h: int, device: str) -> tuple[float, float]:
    """-> matmul FLOP/s and memory bandwidth in bytes/s, float32."""
    a, b = torch.randn(n, h, device=device), torch.randn(n, h, device=device)
    gram, out = torch.randn(h, h, device=device), torch.empty(n, h, device=device)
    matmul = seconds(lambda: torch.mm(a, gram, out=out))
    add = seconds(lambda: torch.add(a, b, out=out))
    return 2 * n * h * h / matmul, 3 * 4 * n * h / add


def one_evaluation(components, block: int) -> float:
    """Seconds for one value-and-gradient evaluation of the entropy E-step over all the data."""
    problem = components.problem
    x, model = problem.x, problem.model
    blocks = list(data_blocks(x.shape[0], block, x.device))
    statistics = [SufficientStatistics.of(x[i], problem.q(i), model.prior, x.shape[0]) for i in blocks]
    summed = total(statistics)
    steps = [
        kernels.DiagonalLaplaceEntropyEStep(
            x[i], model, AnnealingWeights(), (summed - s).residual(model.W.detach()), (summed - s).prior, x.shape[0], s.x_energy
        )
        for i, s in zip(blocks, statistics)
    ]
    params = [(problem.posterior.mean[i].detach(), problem.posterior.log_std[i].detach()) for i in blocks]
    return seconds(lambda: [step.loss_and_gradients(m, s) for step, (m, s) in zip(steps, params)], repeats=3)


def one_epoch(components) -> tuple[float, int]:
    """-> seconds for one unannealed epoch, and the objective evaluations in it (the E-step driver's count)."""
    trainer, problem = components.trainer, components.problem
    state = trainer.start(problem, None)
    before = trainer.driver.counts.evaluations
    synchronize()
    start = time.perf_counter()
    trainer.train_epoch(problem, state, trainer.max_epochs, AnnealingWeights())
    synchronize()
    return time.perf_counter() - start, trainer.driver.counts.evaluations - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-patches", type=int, default=40960)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-epoch", action="store_true")
    parser.add_argument("--skip-score", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    sparse_elbo.retain_freed_memory()  # as the command line does (sparse_elbo/runner/memory.py)
    cfg = sparse_elbo.compose(
        [
            "experiment=patches_em_prior_annealing",  # no start to learn before the epoch
            "trainer.subset_size=null",  # an epoch over every point: the evaluations counted are whole-data ones
            "trainer.average_last_epochs=1",
            f"dataset.n_patches={args.n_patches}",
            f"device={args.device}",
            *args.overrides,
        ]
    )
    components = build(cfg)
    n, h = components.problem.x.shape[0], cfg.n_latents
    block = int(cfg.trainer.driver.block_size or n)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; N={n}, H={h}, blocks of {block}")
    flops, bandwidth = machine_rates(n, h, args.device)
    print(f"matmul (N,H)@(H,H): {flops / 1e9:.1f} GFLOP/s;  memory bandwidth (c = a + b): {bandwidth / 1e9:.1f} GB/s")
    floor = max(2 * n * h * h / flops, 5 * 4 * n * h / bandwidth)
    evaluation = one_evaluation(components, block)
    print(
        f"one whole-data evaluation: {evaluation * 1e3:.1f} ms;  floor {floor * 1e3:.1f} ms "
        f"(matmul {2 * n * h * h / flops * 1e3:.1f} ms, 5 arrays of N×H {5 * 4 * n * h / bandwidth * 1e3:.1f} ms);  "
        f"ratio {evaluation / floor:.1f}"
    )
    if not args.skip_score:
        synchronize()
        start = time.perf_counter()
        score = sparse_elbo.score_dictionary(components.problem.x, components.problem.model.W.detach())
        print(f"score_dictionary at the initial W: max_q L_H = {score.elbo:.4f} in {time.perf_counter() - start:.1f} s")
    if not args.skip_epoch:
        epoch, calls = one_epoch(components)
        per_point = calls * block / n
        inside = per_point * evaluation  # at the measured time of one whole-data evaluation
        print(
            f"one epoch ({cfg.trainer.em_iterations_per_epoch} EM iterations): {epoch:.2f} s; {calls} block evaluations "
            f"= {per_point:.0f} whole-data evaluations; about {inside:.2f} s in them ({inside / epoch:.0%}), "
            f"{epoch - inside:.2f} s elsewhere; epoch / (evaluations × floor) = {epoch / (per_point * floor):.1f}"
        )


if __name__ == "__main__":
    main()
