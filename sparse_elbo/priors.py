"""Factorised priors ``p(z) = Π_h p(z_h; λ_h)`` with the closed forms the objectives need.

Each prior gives, for a Gaussian ``q``: the per-latent sufficient statistic ``t_nh`` whose data
mean is the optimal scale (``λ_h* = (1/N) Σ_n t_nh``), ``E_q[log p(z)]`` at a scale, the prior's
entropy at a scale, and ``log p(z)`` for Monte Carlo; and, for the fixed-point posterior fit
(``trainers/fixed_point.py``), the expected gradient ``E_q[∂ log p/∂z_h]`` and the expected curvature
``E_q[-∂² log p/∂z_h²]`` per latent. By Bonnet's and Price's theorems these are ``∂/∂μ_h`` and
``-2 ∂/∂(s_h²)`` of ``E_q[log p(z)]``.
"""

from __future__ import annotations

import math

import torch

from sparse_elbo import closed_forms


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

    def expected_gradient(self, mean: torch.Tensor, std: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``E_q[-sign(z_h)] / λ_h = -erf(μ_h / (√2 s_h)) / λ_h``  (N,H)"""
        return -torch.erf(mean / (math.sqrt(2.0) * std)) / scale

    def expected_curvature(self, mean: torch.Tensor, std: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``E_q[2 δ(z_h)] / λ_h = √(2/π) exp(-μ_h²/(2 s_h²)) / (s_h λ_h)``  (N,H)"""
        return math.sqrt(2.0 / math.pi) * torch.exp(-0.5 * (mean / std) ** 2) / (std * scale)

    def log_prob(self, z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``log p(z)`` summed over latents; z (...,H) -> (...)"""
        return -(torch.log(2.0 * scale) + z.abs() / scale).sum(-1)

    def sample(self, shape: tuple[int, ...], generator) -> "torch.Tensor":
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

    def expected_gradient(self, mean: torch.Tensor, std: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``E_q[-z_h / λ_h] = -μ_h / λ_h``  (N,H)"""
        return -mean / scale

    def expected_curvature(self, mean: torch.Tensor, std: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``1 / λ_h``, whatever q  (N,H)"""
        return (1.0 / scale).expand_as(mean)

    def log_prob(self, z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return -0.5 * (math.log(2.0 * math.pi) + torch.log(scale) + z**2 / scale).sum(-1)

    def sample(self, shape: tuple[int, ...], generator) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64)
