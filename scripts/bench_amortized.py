"""Benchmark amortised learning (issue #4): the same amortised model trained with each objective.

For every objective (sampled with K=1 and K=10 samples, analytic, entropy) one run of the named setting
(default ``experiment=patches_amortized_small``) is made with the gradient variance measured each epoch
on a fixed minibatch; printed per objective: the training time per epoch, the exact full-data ELBO
against training wall time, the gradient variance (trace of the gradient covariance over 10 noise draws,
and relative to ||mean gradient||²), and the held-out numbers: the encoder's ELBO, the ELBO after
refining q per data point, the amortisation gap, and the importance-sampled log p(x) ± its standard error.

    python scripts/bench_amortized.py [--epochs 10] [--objectives sampled1,sampled10,analytic,entropy] [overrides ...]

``--time-epochs E`` instead only times E training epochs (no evaluation, no held-out metrics) of the
setting, e.g. the full-size one:

    python scripts/bench_amortized.py --time-epochs 1 experiment=patches_amortized

``--breakdown S`` says where an epoch's time goes: S minibatch steps of the setting (from a random dictionary)
timed in cumulative stages — the encoder's forward pass, its forward and backward pass, the trainer's step
without Adam's update (objective and full-data statistics), the whole step — each the best of three passes,
scaled to one epoch of the setting and set against the floor of its matrix products:

    python scripts/bench_amortized.py --breakdown 100 experiment=patches_amortized
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import sparse_elbo
from sparse_elbo.runner import build
from sparse_elbo.trainers.base import fit

OBJECTIVES = {
    "sampled1": ["objective=sampled", "objective.n_samples=1"],
    "sampled10": ["objective=sampled", "objective.n_samples=10"],
    "analytic": ["objective=analytic"],
    "entropy": ["objective=entropy"],
}


def encoder_floor(encoder: torch.nn.Module, x: torch.Tensor, batch_size: int, n_data: int | None = None) -> str:
    """The encoder's matrix products per epoch of ``n_data`` points (default: x's; forward, and backward's two
    products per layer less the first layer's input gradient) against this machine's measured rate for its
    (B, hidden) @ (hidden, block) product."""
    layers = [m for m in encoder.modules() if isinstance(m, torch.nn.Linear)]
    if len(layers) < 2:
        return "no encoder: per-data-point posteriors"
    n_data, device, dtype = n_data or x.shape[0], x.device, encoder.matmul_dtype(x)
    macs = sum(m.in_features * m.out_features for m in layers)  # per data point, forward
    flops = 2 * n_data * (3 * macs - layers[0].in_features * layers[0].out_features)
    hidden, block = layers[1].in_features, layers[1].out_features
    a = torch.randn(batch_size, hidden, device=device, dtype=dtype)
    b = torch.randn(hidden, block, device=device, dtype=dtype)
    for _ in range(5):
        a @ b
    if device.type == "cuda":  # the warm-up's kernels finish before the clock starts
        torch.cuda.synchronize()
    repeats, began = 50, time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = 2 * batch_size * hidden * block * repeats / (time.perf_counter() - began)
    return (
        f"encoder matrix products: {flops / 1e12:.2f} TFLOP per epoch; {str(dtype).removeprefix('torch.')} "
        f"({batch_size},{hidden})@({hidden},{block}) at {rate / 1e9:.0f} GFLOP/s: floor {flops / rate:.2f} s per epoch"
    )


def time_epochs(overrides: list[str], epochs: int) -> None:
    cfg = sparse_elbo.compose([*overrides, f"trainer.max_epochs={epochs}"])
    start = time.perf_counter()
    components = build(cfg)
    problem, trainer = components.problem, components.trainer
    print(
        f"built in {time.perf_counter() - start:.1f} s: N={problem.x.shape[0]}, D={problem.x.shape[1]}, "
        f"H={problem.model.n_latents}, device={problem.x.device}, dtype={problem.x.dtype}, "
        f"encoder parameters={sum(p.numel() for p in problem.posterior.parameters())}"
    )
    print(encoder_floor(problem.posterior, problem.x, trainer.batch_size))
    times, start_time = [], []

    def evaluate(epoch, weights, train_time):
        times.append(train_time)
        print(f"epoch {epoch}: cumulative training time {train_time:.2f} s (the start included)", flush=True)
        return SimpleNamespace(elbo=float("nan"))  # no evaluation: time only

    def checkpoint(epoch, state):  # the loop's public bookkeeping: how long the trainer's start took
        start_time[:] = [state["loop"]["start_time"]]

    fit(trainer, problem, evaluate, checkpoint=checkpoint)
    print(f"start (initial dictionary): {start_time[0]:.2f} s")
    times = [t - start_time[0] for t in times]
    per_epoch = np.diff([0.0, *times])
    print(
        f"training time per epoch: mean {per_epoch.mean():.2f} s, min {per_epoch.min():.2f} s over {len(per_epoch)} "
        f"epochs ({problem.x.shape[0] / per_epoch.mean():.0f} data points / s)"
    )


def breakdown(overrides: list[str], steps: int, repeats: int = 3) -> None:
    """Time ``steps`` minibatch steps in cumulative stages (module docstring), at the first epoch's annealing
    weights, each stage the best of ``repeats`` passes, scaled to an epoch of the setting's data."""
    setting = sparse_elbo.compose(overrides)
    batch_size, n_data = int(setting.trainer.batch_size), int(setting.dataset.n_patches)
    cfg = sparse_elbo.compose([*overrides, f"dataset.n_patches={steps * batch_size}", "trainer/initialisation=random"])
    components = build(cfg)
    problem, trainer = components.problem, components.trainer
    encoder, x = problem.posterior, problem.x
    state, weights = trainer.start(problem, None), problem.annealing(0)
    trainer.train_epoch(problem, state, 0, weights)  # fills the full-data statistics, warms every kernel
    batches = torch.randperm(x.shape[0]).split(batch_size)
    scale = math.ceil(n_data / batch_size) / len(batches)  # the steps of one epoch of the setting per step timed
    print(encoder_floor(encoder, x, batch_size, n_data))

    def forward():
        with torch.no_grad():
            for index in batches:
                encoder(x[index])

    def forward_backward():
        for index in batches:
            encoder.zero_grad(set_to_none=True)
            q = encoder(x[index])
            (q.mean.sum() + q.variance.sum()).backward()

    adam_step = state.optimizer.step

    def without_update():
        state.optimizer.step = lambda: None
        try:
            trainer.train_epoch(problem, state, 1, weights)
        finally:
            state.optimizer.step = adam_step

    stages = {
        "encoder forward": forward,
        "encoder forward + backward": forward_backward,
        "+ objective and statistics (the step without Adam's update)": without_update,
        "+ Adam's update (the whole step)": lambda: trainer.train_epoch(problem, state, 1, weights),
    }
    for name, stage in stages.items():
        best = math.inf
        for _ in range(repeats):
            began = time.perf_counter()
            stage()
            best = min(best, time.perf_counter() - began)
        print(f"{name}: {best * scale:.2f} s per epoch", flush=True)


def compare_objectives(overrides: list[str], objectives: list[str], epochs: int) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in objectives:
            cfg = sparse_elbo.compose(
                [
                    *overrides,
                    *OBJECTIVES[name],
                    f"trainer.max_epochs={epochs}",
                    "evaluation.gradient_variance_repeats=10",
                    "results.snapshot_every=0",
                ]
            )
            summary = sparse_elbo.run(cfg, Path(tmp) / name, progress=False)
            res = sparse_elbo.read_results(summary.results_path)
            rows.append((name, summary, res))
            m, f = res.metrics, res.final
            print(
                f"\n== objective {name}: {summary.epochs} epochs, {summary.train_time:.2f} s training "
                f"({summary.train_time / summary.epochs:.2f} s per epoch)"
            )
            print(
                "   wall time [s] -> full-data ELBO: " + ", ".join(f"{t:.1f}->{e:.3f}" for t, e in zip(m["wall_time"], m["elbo"]))
            )
            print(
                f"   gradient variance (fixed batch, 10 draws): trace median {np.median(m['gradient_variance']):.4g}, "
                f"relative median {np.median(m['gradient_variance_relative']):.4g}"
            )
            print(
                f"   held-out ({int(f['held_out_n'])} points): encoder ELBO {float(f['held_out_elbo_encoder']):.4f}, "
                f"refined {float(f['held_out_elbo_refined']):.4f}, amortisation gap {float(f['amortization_gap']):.4f} nats, "
                f"log p(x) {float(f['held_out_log_px']):.4f} +- {float(f['held_out_log_px_stderr']):.4f} "
                f"(over points +- {float(f['held_out_log_px_data_stderr']):.4f})",
                flush=True,
            )
    print(
        "\nobjective   s/epoch  final ELBO  grad var (trace)  rel. var   held-out: encoder  refined    gap     log p(x) +- s.e."
    )
    for name, summary, res in rows:
        m, f = res.metrics, res.final
        print(
            f"{name:10s} {summary.train_time / summary.epochs:7.2f} {summary.elbo:11.4f} {np.median(m['gradient_variance']):16.4g} "
            f"{np.median(m['gradient_variance_relative']):9.3g}  {float(f['held_out_elbo_encoder']):16.4f} "
            f"{float(f['held_out_elbo_refined']):8.4f} {float(f['amortization_gap']):7.4f}  "
            f"{float(f['held_out_log_px']):8.4f} +- {float(f['held_out_log_px_stderr']):.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help=f"comma-separated subset of {list(OBJECTIVES)}")
    parser.add_argument("--time-epochs", type=int, default=0, help="only time this many training epochs")
    parser.add_argument("--breakdown", type=int, default=0, help="time this many steps in stages (module docstring)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides; default experiment=patches_amortized_small")
    args = parser.parse_args()
    sparse_elbo.retain_freed_memory()  # as the command line does (sparse_elbo/runner/memory.py)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = (
        args.overrides
        if any(o.startswith("experiment=") for o in args.overrides)
        else ["experiment=patches_amortized_small", *args.overrides]
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}, overrides={overrides}"
    )
    if args.time_epochs:
        time_epochs(overrides, args.time_epochs)
        return
    if args.breakdown:
        breakdown(overrides, args.breakdown)
        return
    unknown = set(args.objectives.split(",")) - set(OBJECTIVES)
    if unknown:
        parser.error(f"--objectives: unknown {sorted(unknown)}; allowed: {list(OBJECTIVES)}")
    compare_objectives(overrides, args.objectives.split(","), args.epochs)


if __name__ == "__main__":
    main()
