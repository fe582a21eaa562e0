"""Held-out evaluation (docs/design.md §10.4): the ELBO of the encoder's q, the ELBO after refining q per data point,
the amortisation gap, and an importance-sampled estimate of ``log p(x)``.

Importance sampling with q as proposal, per data point, ``K`` samples ``z_k ~ q_n``:

    log w_nk  = log p(x_n|z_k) + log p(z_k) - log q_n(z_k)
    log p̂(x_n) = logmeanexp_k log w_nk                    (E[p̂] = p(x_n); E[log p̂] ≤ log p(x_n), → as K → ∞)

Its Monte Carlo standard error by the delta method, ``se_n = std_k(w_nk) / (√K · mean_k(w_nk))``
(computed from ``w / max_k w``, so it never overflows). The data-set value is the mean over the held-out
points, ``mean_n log p̂(x_n)``, with Monte Carlo standard error ``sqrt(Σ_n se_n²) / M`` (independent
across points) — the uncertainty of the number for *these* held-out points, reported as
``held_out_log_px_stderr``. The spread over data points, ``std_n log p̂(x_n) / √M`` (the uncertainty
about the population value), is reported beside it as ``held_out_log_px_data_stderr``.

Every value uses the model's ``W, σ², λ`` as they are (for the entropy objective the runner has set
``σ², λ`` to the training data's optima ``σ²*, λ*``): nothing is re-fitted to the held-out data except q.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparse_elbo import closed_forms
from sparse_elbo.inference.fit import fit_new_data
from sparse_elbo.inference.statistics import data_blocks
from sparse_elbo.objectives import AnalyticELBO
from sparse_elbo.validation import require_at_least


@dataclass
class ImportanceEstimate:
    """per_point (M,): log p̂(x_n); stderr_per_point (M,): delta-method s.e. of each;
    mean, stderr (Monte Carlo s.e. of the mean), data_stderr (std over points / √M)."""

    per_point: torch.Tensor
    stderr_per_point: torch.Tensor
    mean: float
    stderr: float
    data_stderr: float


def log_joint(x: torch.Tensor, z: torch.Tensor, model) -> torch.Tensor:
    """``log p(x|z) + log p(z)``;  x (N,D), z (K,N,H)  ->  (K,N)"""
    return closed_forms.log_likelihood(x, model.W, z, model.sigma2) + model.prior.log_prob(z, model.lam)


@torch.no_grad()
def importance_log_weights(x: torch.Tensor, q, model, n_samples: int, generator=None, max_chunk: int = 2**22) -> torch.Tensor:
    """``log w (K,N)`` for ``z_k ~ q`` (samples drawn in chunks of at most ``max_chunk`` numbers z·x)."""
    D, H = x.shape[-1], q.mean.shape[-1]
    per_sample = max(1, x.shape[0] * max(D, H))
    chunk = max(1, max_chunk // per_sample)
    out = []
    for start in range(0, n_samples, chunk):
        z = q.rsample(min(chunk, n_samples - start), generator=generator)  # (k,N,H)
        out.append(log_joint(x, z, model) - q.log_prob(z))
    return torch.cat(out, 0)


@torch.no_grad()
def importance_sampled_log_px(
    x: torch.Tensor, q, model, n_samples: int = 100, generator=None, block_size: int = 1024
) -> ImportanceEstimate:
    """``log p̂(x_n) = logmeanexp_k log w_nk`` and its standard errors (module docstring);
    x (M,D), q a Gaussian batch of M posteriors (the proposal)."""
    require_at_least(2, n_samples=n_samples)
    estimates, errors = [], []
    for index in data_blocks(x.shape[0], block_size, x.device):
        q_block = q[index]
        log_w = importance_log_weights(x[index], q_block, model, n_samples, generator)  # (K,B)
        estimates.append(torch.logsumexp(log_w, 0) - math.log(n_samples))
        scaled = torch.exp(log_w - log_w.max(0).values)  # w / max_k w (K,B)
        errors.append(scaled.std(0) / (math.sqrt(n_samples) * scaled.mean(0)))
    per_point, stderr = torch.cat(estimates), torch.cat(errors)
    M = per_point.shape[0]
    return ImportanceEstimate(
        per_point=per_point,
        stderr_per_point=stderr,
        mean=float(per_point.mean()),
        stderr=float(stderr.pow(2).sum().sqrt() / M),
        data_stderr=float(per_point.std() / math.sqrt(M)) if M > 1 else float("nan"),
    )


@torch.no_grad()
def encoder_elbo(x: torch.Tensor, posterior, model, block_size: int = 4096) -> float:
    """The analytic ELBO per data point of the encoder's q for data ``x``, at the model's ``W, σ², λ``."""
    return _blocked_elbo(x, lambda index: posterior(x[index]), model, block_size)


def held_out_metrics(
    x: torch.Tensor,
    posterior,
    model,
    refine_iterations: int = 200,
    importance_samples: int = 100,
    seed: int = 0,
    block_size: int = 4096,
) -> dict[str, float]:
    """The held-out numbers stored under ``/final`` (nats per data point):

    - ``held_out_elbo_encoder``: ELBO of the encoder's q (amortised posteriors only);
    - ``held_out_elbo_refined``: ELBO after refining q per data point (from the encoder's output, or from
      a fresh q for per-data-point families); ``amortization_gap`` = refined − encoder ≥ 0 (up to the
      optimiser's tolerance);
    - ``held_out_log_px`` ± ``held_out_log_px_stderr`` (and ``held_out_log_px_data_stderr``): importance
      sampling with the refined q as proposal; ``held_out_log_px - held_out_elbo_refined`` is the
      remaining ELBO gap (the KL from the refined Gaussian q to the true posterior).
    """
    out: dict[str, float] = {"held_out_n": float(x.shape[0])}
    if posterior.amortized:
        out["held_out_elbo_encoder"] = encoder_elbo(x, posterior, model, block_size)
    refined = fit_new_data(x, posterior, model, refine_iterations, block_size)
    with torch.no_grad():
        out["held_out_elbo_refined"] = _blocked_elbo(x, lambda index: refined(index), model, block_size)
        if posterior.amortized:
            out["amortization_gap"] = out["held_out_elbo_refined"] - out["held_out_elbo_encoder"]
        generator = torch.Generator(device=x.device).manual_seed(seed + 11)
        estimate = importance_sampled_log_px(x, refined(), model, importance_samples, generator)
    out.update(
        held_out_log_px=estimate.mean,
        held_out_log_px_stderr=estimate.stderr,
        held_out_log_px_data_stderr=estimate.data_stderr,
        held_out_elbo_gap=estimate.mean - out["held_out_elbo_refined"],
    )
    return out


def _blocked_elbo(x, q_of, model, block_size: int) -> float:
    total = 0.0
    for index in data_blocks(x.shape[0], block_size, x.device):
        total += float(AnalyticELBO()(x[index], q_of(index), model).per_point.sum())
    return total / x.shape[0]
