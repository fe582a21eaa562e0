"""The E-step objective of diagonal posteriors under the Laplace prior, value and gradient fused
(docs/design.md §6.2).

For fixed ``W, σ², λ`` and annealing weights ``β``, the E-step maximises over ``μ_n, ρ_n = log s_n``

    F_n = β_lik E_q[log p(x_n|z)] + β_prior E_q[log p(z)] + β_q H[q_n]
        = -β_lik/(2σ²) (μ_nᵀ G μ_n - 2 b_nᵀ μ_n + Σ_h G_hh s_h²)
          - β_prior Σ_h E|z_h| / λ_h  +  β_q Σ_h ρ_h  +  c_n

with ``G = WᵀW (H,H)``, ``b_n = Wᵀ x_n (H,)``, ``E|z_h| = s_h √(2/π) e^{-r_h²/2} + μ_h erf(r_h/√2)``,
``r_h = μ_h / s_h``, and ``c_n`` collecting what the E-step cannot change
(``||x_n||²``, ``log 2πσ²``, ``log 2λ_h``, ``log 2πe``). Its gradients are

    ∂F/∂μ = β_lik (b - G μ)/σ² - β_prior erf(r/√2)/λ
    ∂F/∂ρ = -β_lik G_hh s²/σ² - β_prior √(2/π) e^{-r²/2} s/λ + β_q .

Why it exists: the same value through autograd (``AnalyticELBO``) forms the residual ``x - Wμ`` (N,D)
and backpropagates some forty elementwise passes over (N,H); here ``b = Wᵀx`` is computed once per E-step,
so no (N,D) array appears in the L-BFGS loop and the elementwise work is about a dozen passes. Tests check value
(with ``c_n`` added back) and gradients against ``AnalyticELBO`` with autograd, and the gradients against
``closed_forms.code_gradient`` and ``closed_forms.variance_gradient``, in float64.
"""

from __future__ import annotations

import math

import torch

from sparse_elbo import closed_forms
from sparse_elbo.annealing import AnnealingWeights
from sparse_elbo.inference.registry import E_STEP_KERNELS
from sparse_elbo.posteriors import DiagonalPosterior
from sparse_elbo.priors import LaplacePrior

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
# r² = (μ/s)² is capped here before e^{-r²/2}: past it the density term of E|z| is below e^{-40} ≈ 4e-18 of s,
# under float64 rounding beside the |μ| > 8.9 s it is added to (and negligible in every gradient), while
# exp's underflow path, which narrow posteriors (|μ|/s > 13) would take, costs up to 9× an ordinary exp
# on the CPU. closed_forms keeps the exact tail: it is the reference the tests hold these kernels to.
NEGLIGIBLE_TAIL_RATIO_SQUARED = 80.0


def capped_density(ratio: torch.Tensor) -> torch.Tensor:
    """``√(2/π) e^{-r²/2}`` for ``r = μ/s`` (a new array, computed in place), r² capped at
    ``NEGLIGIBLE_TAIL_RATIO_SQUARED``; the fused kernel and the diagonal Newton fit share it."""
    return ratio.square().clamp_(max=NEGLIGIBLE_TAIL_RATIO_SQUARED).mul_(-0.5).exp_().mul_(_SQRT_2_OVER_PI)


@E_STEP_KERNELS.register(DiagonalPosterior, LaplacePrior)
class DiagonalLaplaceEStep:
    """``-Σ_n (F_n - c_n)`` and its gradient for the data points ``x (N,D)``; W, σ², λ, β fixed (λ: the
    model's, or ``weights.prior_scale`` when the schedule holds it at λ_0)."""

    def __init__(self, x: torch.Tensor, model, weights: AnnealingWeights):
        with torch.no_grad():
            W = model.W  # (D,H)
            self.projection = x @ W  # b (N,H)
            self.gram = W.T @ W  # G (H,H)
            self.gram_diagonal = torch.diagonal(self.gram).clone()  # (H,)
            self.sigma2 = model.sigma2.detach()
            lam = model.lam.detach()
            if weights.prior_scale is not None:
                lam = torch.full_like(lam, weights.prior_scale)
            self.inverse_lambda = lam.reciprocal()  # (H,)
        self.weights = weights
        self.x = x  # (N,D), only read by constant()

    @torch.no_grad()
    def _terms(self, mean: torch.Tensor, log_std: torch.Tensor):
        """-> E|z| (N,H), Σ_n (μᵀGμ - 2bᵀμ + Σ_h G_hh s_h²) (float64 scalar), and the pieces the gradients
        reuse: G μ - b, erf(r/√2), √(2/π) e^{-r²/2} s, s² (N,H) each."""
        std = log_std.exp().clamp_min_(torch.finfo(log_std.dtype).tiny)  # s (N,H)
        ratio = mean / std  # r (N,H)
        density = capped_density(ratio)  # √(2/π) e^{-r²/2}
        sign_mass = ratio.mul_(_INV_SQRT_2).erf_()  # erf(r/√2); ratio's storage is reused
        density_std = density.mul_(std)  # √(2/π) e^{-r²/2} s
        variance = std.square_()  # s² (std's storage is reused)
        gram_mean = mean @ self.gram  # G μ (N,H)
        expected_abs = density_std + mean * sign_mass  # E|z| (N,H)
        # The sums are accumulated in float64 even for float32 parameters: the loss is a sum over up to
        # the whole data set, and in float32 its rounding (≈ 1e-7 of ~10⁶) hides the changes that the
        # line search must compare once the E-step is nearly converged, so it stops early.
        energy = ((gram_mean - 2.0 * self.projection) * mean).sum(dtype=torch.float64) + (variance @ self.gram_diagonal).sum(
            dtype=torch.float64
        )
        return expected_abs, energy, gram_mean.sub_(self.projection), sign_mass, density_std, variance

    def _gradients(self, pieces, likelihood_scale, prior_scale):
        """∂loss/∂μ = β_lik (Gμ - b)/σ² + β_prior erf(r/√2)/λ,
        ∂loss/∂ρ = β_lik G_hh s²/σ² + β_prior √(2/π) e^{-r²/2} s/λ - β_q."""
        gram_mean_minus_b, sign_mass, density_std, variance = pieces
        grad_mean = gram_mean_minus_b.mul_(likelihood_scale).add_(sign_mass.mul_(prior_scale))
        grad_log_std = (
            variance.mul_(self.gram_diagonal * likelihood_scale).add_(density_std.mul_(prior_scale)).sub_(self.weights.entropy)
        )
        return grad_mean, grad_log_std

    @torch.no_grad()
    def loss_and_gradients(self, mean: torch.Tensor, log_std: torch.Tensor):
        """mean, log_std (N,H)  ->  loss = -Σ_n (F_n - c_n) (scalar), ∂loss/∂mean, ∂loss/∂log_std (N,H)."""
        beta = self.weights
        likelihood_scale = beta.likelihood / self.sigma2
        prior_scale = beta.prior * self.inverse_lambda  # (H,)
        expected_abs, energy, *pieces = self._terms(mean, log_std)
        loss = (
            0.5 * likelihood_scale * energy
            + (expected_abs @ prior_scale).sum(dtype=torch.float64)
            - beta.entropy * log_std.sum(dtype=torch.float64)
        )
        return (loss, *self._gradients(pieces, likelihood_scale, prior_scale))

    @torch.no_grad()
    def constant(self) -> torch.Tensor:
        """``c_n`` (N,): the terms of ``F_n`` that do not depend on ``q_n``."""
        beta = self.weights
        H = self.gram.shape[0]
        D = self.x.shape[1]
        log_lik = -0.5 * D * (closed_forms.LOG_2PI + torch.log(self.sigma2)) - self.x.pow(2).sum(-1) / (2.0 * self.sigma2)
        log_prior = (math.log(0.5) + torch.log(self.inverse_lambda)).sum()  # -Σ_h log(2λ_h)
        entropy = 0.5 * H * closed_forms.LOG_2PIE
        return beta.likelihood * log_lik + beta.prior * log_prior + beta.entropy * entropy


class DiagonalLaplaceEntropyEStep(DiagonalLaplaceEStep):
    """The E-step on the full-data entropy objective itself: ``-N L_H`` as a function of this block's
    ``q`` with every other data point's posterior fixed, so that ``σ²*, λ*`` follow the block's ``q``
    inside the E-step instead of staying at the values of the previous ``q``:

        -N L_H = -β_q Σ_n Σ_h ρ_nh + β_prior N Σ_h log λ*_h + β_lik (N D / 2) log σ²* + const,
        σ²* = (R_other + Σ_n E||x_n - W z||²) / (N D),   λ*_h = (T_other,h + Σ_n E|z_nh|) / N,

    with ``N`` the whole data set's size and ``R_other, T_other`` the other points' sums. By the envelope
    theorem its gradient is the analytic E-step's at ``σ² = σ²*, λ = λ*`` (same formulas, current values).
    """

    def __init__(
        self,
        x: torch.Tensor,
        model,
        weights: AnnealingWeights,
        other_residual: torch.Tensor,
        other_prior: torch.Tensor,
        n_total: int,
        x_energy: torch.Tensor | None = None,
    ):
        super().__init__(x, model, weights)
        with torch.no_grad():  # Σ_n ||x_n||² of the block (float64), unless the caller has it already
            self.x_energy = x.pow(2).sum(dtype=torch.float64) if x_energy is None else x_energy
        self.other_residual, self.other_prior = other_residual, other_prior  # scalar, (H,)
        self.n_total = n_total

    @torch.no_grad()
    def statistics(self, mean: torch.Tensor, log_std: torch.Tensor):
        """-> σ²*, λ* (H,) of the whole data with this block's ``q = (mean, log_std)``."""
        expected_abs, energy, *_ = self._terms(mean, log_std)
        return self._optima(expected_abs, energy)

    def _optima(self, expected_abs, energy):
        residual = self.other_residual + self.x_energy + energy  # Σ_n E||x_n - W z||² over all N points
        sigma2 = closed_forms.optimal_sigma2(residual, self.x.shape[1], self.n_total)
        lam = closed_forms.optimal_lambda(self.other_prior + expected_abs.sum(0, dtype=torch.float64), self.n_total)
        return sigma2, lam

    @torch.no_grad()
    def loss_and_gradients(self, mean: torch.Tensor, log_std: torch.Tensor):
        beta = self.weights
        expected_abs, energy, *pieces = self._terms(mean, log_std)
        sigma2, lam = self._optima(expected_abs, energy)
        n, D = self.n_total, self.x.shape[1]
        loss = (
            beta.prior * n * torch.log(lam).sum()
            + beta.likelihood * 0.5 * n * D * torch.log(sigma2)
            - beta.entropy * log_std.sum(dtype=torch.float64)
        )
        likelihood_scale = (beta.likelihood / sigma2).to(mean.dtype)
        prior_scale = (beta.prior / lam).to(mean.dtype)  # (H,)
        return (loss, *self._gradients(pieces, likelihood_scale, prior_scale))
