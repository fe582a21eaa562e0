"""Gradient noise of an objective (issue: the benefit of an analytic objective in numbers).

For a fixed minibatch ``B`` and parameters ``θ`` (W, σ², λ where learned, and the posterior's or
encoder's parameters), the gradient ``g_r = ∇_θ F_β(B; θ, ε_r)`` is evaluated ``R`` times with
independent sample noise ``ε_r`` (seeds ``seed + r``). Reported:

    per-coordinate variance   v_i = (1/(R-1)) Σ_r (g_ri - ḡ_i)²
    total variance            Σ_i v_i            (trace of the gradient's covariance)
    mean variance             (1/P) Σ_i v_i
    relative variance         Σ_i v_i / ||ḡ||²   (noise-to-signal ratio, scale free)

The analytic and entropy objectives draw no samples, so every ``g_r`` is the same and the variance is
exactly 0; the sampled objective's variance falls like 1/K with its sample count K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_elbo.annealing import AnnealingWeights
from sparse_elbo.validation import require_at_least


@dataclass
class GradientVariance:
    total: float
    mean: float
    relative: float
    n_parameters: int
    repeats: int


def gradient_variance(
    problem,
    index: torch.Tensor,
    repeats: int = 10,
    weights: AnnealingWeights | None = None,
    seed: int = 0,
    train_dictionary: bool = True,
) -> GradientVariance:
    """Variance over ``repeats`` evaluations of the gradient of the problem's objective (minibatch ``index``,
    batch statistics for σ²*, λ*) with respect to every trainable parameter (module docstring)."""
    require_at_least(2, repeats=repeats)
    weights = weights or AnnealingWeights()
    params = problem.trainable_parameters(train_dictionary)
    x = problem.x[index]
    generator = torch.Generator(device=x.device)
    grads = []
    for r in range(repeats):
        generator.manual_seed(seed + r)
        value = problem.objective(x, problem.q(index), problem.model, weights, generator=generator)
        g = torch.autograd.grad(value.weighted, params, allow_unused=True)
        grads.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1) for p, gi in zip(params, g)]))
    G = torch.stack(grads)  # (R,P)
    variance = G.var(0, unbiased=True)  # (P,)
    total = float(variance.sum())
    return GradientVariance(
        total=total,
        mean=total / G.shape[1],
        relative=total / max(float(G.mean(0).pow(2).sum()), torch.finfo(G.dtype).tiny),
        n_parameters=G.shape[1],
        repeats=repeats,
    )
