"""Every closed form of probabilistic sparse coding, written once (docs/design.md §2–§4).

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


def residual_energy(x: torch.Tensor, W: torch.Tensor, mean: torch.Tensor, trace_term: torch.Tensor) -> torch.Tensor:
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


def expected_log_gaussian_prior(mean: torch.Tensor, variance: torch.Tensor, prior_variance: torch.Tensor) -> torch.Tensor:
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


def optimal_lambda(statistic_sum: torch.Tensor, n_data: int | torch.Tensor = 1) -> torch.Tensor:
    """Stationary point of the ELBO in λ: ``λ_h* = (1/N) Σ_n t_nh`` (``t = E_q|z_h|`` for the Laplace prior).

    statistic_sum (H,) = Σ_n t_n over N = n_data points (or their mean, with n_data = 1)  ->  (H,)
    """
    return statistic_sum / n_data


def optimal_sigma2(residual_sum: torch.Tensor, n_observed: int, n_data: int | torch.Tensor = 1) -> torch.Tensor:
    """Stationary point in σ²: ``σ²* = (1/(N D)) Σ_n (||x_n - W μ_n||² + tr(WᵀW Σ_n))``.

    residual_sum () = Σ_n E||x_n - W z||² over N = n_data points (or their mean, with n_data = 1)  ->  ()
    """
    return residual_sum / n_data / n_observed


def expected_residual_from_sums(
    x_energy: torch.Tensor, cross: torch.Tensor, second_moment: torch.Tensor, W: torch.Tensor
) -> torch.Tensor:
    """``Σ_n E||x_n - W z||² = Σ_n ||x_n||² - 2 tr(Wᵀ C) + tr(WᵀW S)`` for any dictionary W, from the sums
    ``C = Σ_n x_n μ_nᵀ`` and ``S = Σ_n (μ_n μ_nᵀ + Σ_n)``.

    x_energy (), cross C (D,H), second_moment S (H,H), W (D,H)  ->  ()
    """
    return x_energy - 2.0 * (W * cross).sum() + ((W.T @ W) * second_moment).sum()


def expected_residual_from_projections(
    x_energy: torch.Tensor, projection: torch.Tensor, mean: torch.Tensor, gram: torch.Tensor, covariance: torch.Tensor
) -> torch.Tensor:
    """The same sum in terms of the projections ``b_n = Wᵀ x_n`` (no (D,H) product):
    ``Σ_n E||x_n - W z||² = Σ_n ||x_n||² - 2 Σ_n b_nᵀ μ_n + Σ_n μ_nᵀ G μ_n + Σ_n tr(G Σ_n)``, ``G = WᵀW``.

    x_energy (), projection b (N,H), mean μ (N,H), gram G (H,H), covariance Σ (N,H,H)  ->  ()
    """
    return x_energy - 2.0 * (projection * mean).sum() + ((mean @ gram) * mean).sum() + (covariance * gram).sum()


def least_squares_codes(x: torch.Tensor, W: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """``μ_n = (WᵀW + εI)⁻¹ Wᵀ x_n``.  x (N,D), W (D,H)  ->  (N,H)"""
    gram = W.T @ W + ridge * torch.eye(W.shape[1], dtype=W.dtype, device=W.device)  # (H,H)
    return torch.linalg.solve(gram, W.T @ x.T).T


def dictionary_gradient(cross: torch.Tensor, second_moment: torch.Tensor, W: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """``∂/∂W Σ_n E_qn[log p(x_n|z)] = (C - W S) / σ²`` with ``C = Σ_n x_n μ_nᵀ``, ``S = Σ_n (μ_n μ_nᵀ + Σ_n)``;
    at ``σ² = σ²*`` also ``∂(N L_H)/∂W`` for fixed q (only σ²* depends on W). Zero at ``W* = C S⁻¹``.

    cross C (D,H), second_moment S (H,H), W (D,H), sigma2 ()  ->  (D,H)
    """
    return (cross - W @ second_moment) / sigma2


def optimal_dictionary(cross: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
    """The M-step: for fixed q the expected log-likelihood is quadratic in W, maximised by
    ``W* = C S⁻¹`` with ``C = Σ_n x_n μ_nᵀ``, ``S = Σ_n (μ_n μ_nᵀ + Σ_n)`` (symmetric).

    cross C (D,H), second_moment S (H,H)  ->  (D,H)
    """
    return torch.linalg.solve(second_moment, cross.T).T


def code_gradient(
    code_residual: torch.Tensor,
    sigma2: torch.Tensor,
    prior_gradient: torch.Tensor,
    lam: torch.Tensor,
    likelihood_weight: float = 1.0,
    prior_weight: float = 1.0,
) -> torch.Tensor:
    """``∂F_n/∂μ_n = β_lik Wᵀ(x_n - W μ_n) / σ² + β_prior E_q[∂ log p/∂z]`` of the (weighted) ELBO of one data
    point, where the prior gives ``E_q[∂ log p/∂z_h] = g_h / λ_h`` (Bonnet's theorem; ``priors.py``).

    code_residual (N,H) = Wᵀ(x - Wμ) = b - Gμ, sigma2 (), prior_gradient g (N,H), lam (H,)  ->  (N,H)
    """
    return (likelihood_weight * code_residual) / sigma2 + (prior_weight * prior_gradient) / lam


def prior_variance_gradient(prior_curvature: torch.Tensor, lam: torch.Tensor, prior_weight: float = 1.0) -> torch.Tensor:
    """The prior's part of ``∂F_n/∂(s_nh²)``: ``-(β_prior/2) E_q[-∂² log p/∂z_h²] = -(β_prior/2) c_h / λ_h``
    (Price's theorem; the prior gives its expected curvature as ``c_h / λ_h``).

    prior_curvature c (N,H), lam (H,)  ->  (N,H)
    """
    return (-0.5 * prior_weight / lam) * prior_curvature


def variance_gradient(
    gram_diagonal: torch.Tensor,
    sigma2: torch.Tensor,
    prior_curvature: torch.Tensor,
    lam: torch.Tensor,
    likelihood_weight: float = 1.0,
    prior_weight: float = 1.0,
) -> torch.Tensor:
    """``∂F_n/∂(s_nh²) = -β_lik G_hh / (2σ²) - (β_prior/2) E_q[-∂² log p/∂z_h²]`` for a diagonal q (the
    posterior entropy's term ``β_q / (2 s²)`` not included).

    gram_diagonal (H,) = G_hh, sigma2 (), prior_curvature c (N,H), lam (H,)  ->  (N,H)
    """
    likelihood = (-0.5 * likelihood_weight) * gram_diagonal / sigma2  # (H,)
    return likelihood + prior_variance_gradient(prior_curvature, lam, prior_weight)


def entropy_elbo(
    posterior_entropy: torch.Tensor,
    prior_entropy: torch.Tensor,
    likelihood_entropy: torch.Tensor,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> torch.Tensor:
    """The entropy ELBO ``L_H = mean_n H[q_n] - H[p(z; λ*)] - H[N(0, σ²* I_D)]`` (three entropies), or with
    weights ``(β_q, β_prior, β_lik)`` on the three terms its annealed version.  ->  ()"""
    entropy_weight, prior_weight, likelihood_weight = weights
    return entropy_weight * posterior_entropy - prior_weight * prior_entropy - likelihood_weight * likelihood_entropy
