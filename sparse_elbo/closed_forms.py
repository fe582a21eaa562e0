"""Closed-form expectations of probabilistic sparse coding (SPEC §3).

Model: ``p(z) = Π_h Laplace(z_h; 0, λ_h)``, ``p(x|z) = N(x; W z, σ² I_D)``;
posterior ``q(z) = N(μ, Σ)``, ``Σ = L Lᵀ``, marginal stds ``s_h = sqrt(Σ_hh)``.
Every function works per data point (leading batch axis ``N``) in natural log units (nats)
and is differentiable in all of its tensor arguments.
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2.0 * math.pi)
LOG_2PIE = math.log(2.0 * math.pi * math.e)


class _FoldedNormalMean(torch.autograd.Function):
    """``E|z|`` with hand-written gradients that stay finite for ``s → 0`` and ``|μ|/s → ∞``:

        ∂E|z|/∂μ = erf(μ / (sqrt(2) s)),     ∂E|z|/∂s = sqrt(2/π) exp(-μ²/(2 s²))

    The backward pass is itself built from differentiable operations on the inputs, so Hessians
    (double backward) are exact too.
    """

    @staticmethod
    def forward(ctx, mean, std):
        ctx.save_for_backward(mean, std)
        density, sign_mass = folded_normal_parts(mean, std)
        return std.clamp_min(torch.finfo(std.dtype).tiny) * density + mean * sign_mass

    @staticmethod
    def backward(ctx, grad_output):
        grad_std, grad_mean = folded_normal_parts(*ctx.saved_tensors)
        return grad_output * grad_mean, grad_output * grad_std


def folded_normal_parts(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``z ~ N(μ, s²)``: ``2φ(μ/s) = √(2/π) exp(-μ²/(2s²)) = ∂E|z|/∂s`` and
    ``erf(μ/(√2 s)) = P(z>0) - P(z<0) = ∂E|z|/∂μ``, so that ``E|z| = s · first + μ · second``
    (std clamped at the dtype's smallest normal number)."""
    ratio = mean / std.clamp_min(torch.finfo(std.dtype).tiny)
    return math.sqrt(2.0 / math.pi) * torch.exp(-0.5 * ratio**2), torch.erf(ratio / math.sqrt(2.0))


def folded_normal_mean(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``E|z|`` for ``z ~ N(μ, s²)``, elementwise::

        E|z| = s sqrt(2/π) exp(-μ²/(2 s²)) + μ erf(μ / (sqrt(2) s))

    mean, std: broadcastable tensors, std > 0 (clamped at the dtype's smallest normal number).
    """
    mean, std = torch.broadcast_tensors(mean, std)
    return _FoldedNormalMean.apply(mean, std)


def expected_abs_given_variance(mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """``E|z|`` from the marginal variance ``s²`` (used by low-rank covariances)."""
    return folded_normal_mean(mean, variance.sqrt())


def residual_energy(
    x: torch.Tensor, W: torch.Tensor, mean: torch.Tensor, trace_term: torch.Tensor
) -> torch.Tensor:
    """``E_q ||x - W z||² = ||x - W μ||² + tr(WᵀW Σ)``.

    x (N,D), W (D,H), mean (N,H), trace_term (N,) = tr(WᵀW Σ_n)  ->  (N,)
    """
    residual = x - mean @ W.T  # (N,D)
    return residual.pow(2).sum(-1) + trace_term


def log_likelihood(x: torch.Tensor, W: torch.Tensor, z: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """``log N(x; W z, σ² I) = -(D/2) log(2πσ²) - ||x - W z||² / (2σ²)`` for samples z.

    x (N,D), W (D,H), z (...,N,H), sigma2 scalar  ->  (...,N)
    """
    D = x.shape[-1]
    residual = (x - z @ W.T).pow(2).sum(-1)  # (...,N)
    return -0.5 * D * (LOG_2PI + torch.log(sigma2)) - residual / (2.0 * sigma2)


def expected_log_likelihood(
    x: torch.Tensor,
    W: torch.Tensor,
    mean: torch.Tensor,
    trace_term: torch.Tensor,
    sigma2: torch.Tensor,
) -> torch.Tensor:
    """``E_q[log N(x; W z, σ² I)] = -(D/2) log(2πσ²) - (||x - Wμ||² + tr(WᵀWΣ)) / (2σ²)``.

    x (N,D), W (D,H), mean (N,H), trace_term (N,), sigma2 scalar  ->  (N,)
    """
    D = x.shape[-1]
    energy = residual_energy(x, W, mean, trace_term)
    return -0.5 * D * (LOG_2PI + torch.log(sigma2)) - energy / (2.0 * sigma2)


def expected_log_laplace_prior(expected_abs: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``E_q[log p(z)] = -Σ_h [ log(2λ_h) + E_q|z_h| / λ_h ]``.

    expected_abs (N,H) = E_q|z_h|, lam (H,)  ->  (N,)
    """
    return -(torch.log(2.0 * lam) + expected_abs / lam).sum(-1)


def expected_log_gaussian_prior(
    mean: torch.Tensor, variance: torch.Tensor, prior_variance: torch.Tensor
) -> torch.Tensor:
    """``E_q[log N(z; 0, diag(v))] = -½ Σ_h [ log(2π v_h) + (μ_h² + s_h²)/v_h ]`` (Gaussian-prior baseline).

    mean, variance (N,H), prior_variance (H,)  ->  (N,)
    """
    return -0.5 * (LOG_2PI + torch.log(prior_variance) + (mean**2 + variance) / prior_variance).sum(-1)


def gaussian_entropy_from_log_diag(log_diag: torch.Tensor) -> torch.Tensor:
    """``H[N(μ, LLᵀ)] = (H/2) log(2πe) + Σ_h log|L_hh|``.

    log_diag (N,H) = log|L_hh|  ->  (N,)
    """
    H = log_diag.shape[-1]
    return 0.5 * H * LOG_2PIE + log_diag.sum(-1)


def gaussian_entropy_from_logdet(logdet: torch.Tensor, n_latents: int) -> torch.Tensor:
    """``H[N(μ, Σ)] = ½ log det(2πe Σ)``;  logdet (N,) = log det Σ  ->  (N,)"""
    return 0.5 * (n_latents * LOG_2PIE + logdet)


def laplace_entropy(lam: torch.Tensor) -> torch.Tensor:
    """Entropy of the factorised Laplace prior, ``Σ_h log(2 e λ_h)``;  lam (H,)  ->  scalar"""
    return torch.log(2.0 * math.e * lam).sum(-1)


def gaussian_noise_entropy(sigma2: torch.Tensor, n_observed: int) -> torch.Tensor:
    """Entropy of the likelihood noise, ``(D/2) log(2πe σ²)``;  sigma2 scalar  ->  scalar"""
    return 0.5 * n_observed * (LOG_2PIE + torch.log(sigma2))


def optimal_lambda(expected_abs: torch.Tensor) -> torch.Tensor:
    """Stationary point of the ELBO in λ: ``λ_h* = (1/N) Σ_n E_{q_n}|z_h|``;  (N,H) -> (H,)"""
    return expected_abs.mean(0)


def optimal_sigma2(residual: torch.Tensor, n_observed: int) -> torch.Tensor:
    """Stationary point in σ²: ``σ²* = (1/(N D)) Σ_n (||x_n - W μ_n||² + tr(WᵀW Σ_n))``;  (N,) -> scalar"""
    return residual.mean(0) / n_observed
