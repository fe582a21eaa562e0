"""Factorised priors ``p(z) = Π_h p(z_h; λ_h)`` with the closed forms the objectives need.

Each prior gives, for a Gaussian ``q``: the per-latent sufficient statistic ``t_nh`` whose data
mean is the optimal scale (``λ_h* = (1/N) Σ_n t_nh``), ``E_q[log p(z)]`` at a scale, the prior's
entropy at a scale, the cross-entropy ``-mean_n E_qn[log p(z; λ)]`` at a scale from the mean statistic,
and ``log p(z)`` for Monte Carlo; and, for the closed-form gradient of the entropy
ELBO and the fixed-point posterior fit, ``statistic_and_derivatives(μ, s) = (t, g, c)``: the statistic
together with the expected gradient ``E_q[∂ log p/∂z_h] = g_h / λ_h`` and the expected curvature
``E_q[-∂² log p/∂z_h²] = c_h / λ_h`` (both priors' derivatives scale as 1/λ), computed from shared
pieces. By Bonnet's and Price's theorems these are ``∂/∂μ_h`` and ``-2 ∂/∂(s_h²)`` of ``E_q[log p(z)]``.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from sparse_elbo import closed_forms


class Prior(Protocol):
    """The contract of a factorised prior (module docstring)."""

    name: str
    statistic_degree: int

    def statistic(self, mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor: ...

    def entropy(self, scale: torch.Tensor) -> torch.Tensor: ...


class LaplacePrior:
    """``p(z_h) = exp(-|z_h|/λ_h) / (2λ_h)``; statistic ``E_q|z_h|``; entropy ``Σ_h log(2eλ_h)``."""

    name = "laplace"
    statistic_degree = 1  # t(c z) = c^degree t(z)

    def statistic(self, mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
        return closed_forms.expected_abs_given_variance(mean, variance)

    def expected_log_prob(self, mean: torch.Tensor, variance: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return closed_forms.expected_log_laplace_prior(self.statistic(mean, variance), scale)

    def entropy(self, scale: torch.Tensor) -> torch.Tensor:
        return closed_forms.laplace_entropy(scale)

    def cross_entropy(self, statistic: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``-mean_n E_qn[log p(z; λ)] = Σ_h [log(2λ_h) + t̄_h/λ_h]`` from the mean statistic ``t̄ (...,H)``
        (linear in it); at ``λ = t̄ = λ*`` it is the entropy."""
        return -closed_forms.expected_log_laplace_prior(statistic, scale)

    def statistic_and_derivatives(self, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``t = E|z_h|``, ``g = λ E_q[-sign(z_h)/λ] = -erf(μ_h / (√2 s_h))``,
        ``c = λ E_q[2 δ(z_h)/λ] = √(2/π) exp(-μ_h²/(2 s_h²)) / s_h``: one exp and one erf  (N,H) each"""
        density, sign_mass = closed_forms.folded_normal_parts(mean, std)
        return std * density + mean * sign_mass, -sign_mass, density / std

    def log_prob(self, z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``log p(z)`` summed over latents; z (...,H) -> (...)"""
        return -(torch.log(2.0 * scale) + z.abs() / scale).sum(-1)

    def sample(self, shape: tuple[int, ...], generator) -> torch.Tensor:
        u = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5
        return -torch.sign(u) * torch.log1p(-2.0 * u.abs())


class GaussianPrior:
    """Baseline ``p(z_h) = N(0, λ_h)`` (λ is the variance): the linear-Gaussian, PCA-like model.

    Statistic ``E_q z_h² = μ_h² + s_h²``; entropy ``Σ_h ½ log(2πe λ_h)``.
    """

    name = "gaussian"
    statistic_degree = 2  # t(c z) = c^degree t(z)

    def statistic(self, mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
        return mean**2 + variance

    def expected_log_prob(self, mean: torch.Tensor, variance: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return closed_forms.expected_log_gaussian_prior(mean, variance, scale)

    def entropy(self, scale: torch.Tensor) -> torch.Tensor:
        return 0.5 * (math.log(2.0 * math.pi * math.e) + torch.log(scale)).sum(-1)

    def cross_entropy(self, statistic: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``-mean_n E_qn[log p(z; λ)] = ½ Σ_h [log(2πλ_h) + t̄_h/λ_h]`` from the mean statistic ``t̄ (...,H)``."""
        return 0.5 * (math.log(2.0 * math.pi) + torch.log(scale) + statistic / scale).sum(-1)

    def statistic_and_derivatives(self, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``t = μ_h² + s_h²``, ``g = λ E_q[-z_h/λ] = -μ_h``, ``c = λ · (1/λ) = 1`` whatever q  (N,H) each"""
        return mean**2 + std**2, -mean, torch.ones_like(mean)

    def log_prob(self, z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return -0.5 * (math.log(2.0 * math.pi) + torch.log(scale) + z**2 / scale).sum(-1)

    def sample(self, shape: tuple[int, ...], generator) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64)
