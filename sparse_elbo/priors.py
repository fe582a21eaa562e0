"""Factorised priors ``p(z) = Π_h p(z_h; λ_h)`` with the closed forms the objectives need.

Each prior gives, for a Gaussian ``q``: the per-latent sufficient statistic ``t_nh`` whose data
mean is the optimal scale (``λ_h* = (1/N) Σ_n t_nh``), ``E_q[log p(z)]`` at a scale, the prior's
entropy at a scale, and ``log p(z)`` for Monte Carlo.
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

    def log_prob(self, z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return -0.5 * (math.log(2.0 * math.pi) + torch.log(scale) + z**2 / scale).sum(-1)

    def sample(self, shape: tuple[int, ...], generator) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64)
