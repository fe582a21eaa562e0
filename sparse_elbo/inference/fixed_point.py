"""Fitting every posterior at a fixed dictionary by a batched fixed-point (natural-gradient) iteration
(docs/design.md §6.3).

For fixed ``W`` (unit-norm columns) this maximises the entropy objective ``L_H`` over all ``q_n`` and
hence over ``σ², λ`` (their closed-form optima follow ``q``). ``L_H``'s gradient in ``q_n`` is the
analytic ELBO's at ``σ² = σ²*, λ = λ*`` (envelope theorem), and the analytic ELBO of one data point,

    F_n = -(μᵀGμ - 2bᵀμ + tr(GΣ)) / (2σ²) + Σ_h E_q[log p(z_h; λ_h)] + ½ log det Σ + const,
    G = WᵀW (H,H),  b = Wᵀx_n (H,),

is stationary where (Bonnet's and Price's theorems turn the prior's terms into expectations of its
derivatives, ``priors.py``)

    μ:  (b - Gμ)/σ² + E_q[∂ log p/∂z] = 0,
    Σ:  Σ⁻¹ = G/σ² + diag(d),   d_h = E_q[-∂² log p/∂z_h²]   (diagonal q: Σ_hh⁻¹ = G_hh/σ² + d_h).

One iteration, for all data points at once:

1. ``Λ = G/σ² + diag(d)`` (N,H,H) and its Cholesky factor; ``Σ = Λ⁻¹`` (full) or ``diag(1/Λ_hh)`` (diag);
2. a Newton step in ``μ`` with ``s`` fixed, ``μ ← μ + t Λ⁻¹ g``, ``g`` the stationarity residual
   above; ``F_n`` is concave in ``μ``, and each point halves its own ``t`` until ``F_n`` rises
   (Armijo), so a step never overshoots along a direction the likelihood leaves flat (the bars
   dictionary has rank H-1). A point whose predicted rise ``gᵀΛ⁻¹g`` is below 16 rounding units of
   ``|F_n|`` cannot verify any step and keeps its mean (otherwise a few such points make every iteration
   run all halvings);
3. ``d`` moves halfway (in ``log d``) to ``E_q[-∂² log p/∂z²]`` at the new ``μ``: the full step lets some
   points cycle between two states. ``d`` is floored at ``√eps · max_h G_hh / σ²`` so that ``Λ`` stays
   positive definite where ``W`` is singular (posterior stds along a direction the likelihood leaves flat
   are capped at ~10⁴ σ);
4. ``σ²*`` and ``λ*`` from the current ``q``.

With ``learn_scales=False`` (``FixedPointFit.at_scales``) step 4 leaves σ², λ as given: each q_n then
maximises its own ``F_n`` at those values (the semi-amortised dictionary step of ``trainers/adam.py``).

``run`` stops once ``L_H`` changes by less than ``tolerance · max(1, |L_H|)`` (floored at a hundred
rounding units of the dtype) or after ``max_iterations``. Start: the least-squares codes
``μ = x W⁺ᵀ``, ``σ²`` their residual (plus 10⁻³ of the data's mean square), ``λ`` their statistic,
``d = 1/λ²``.

``L_H`` couples the data points through ``σ²*, λ*`` and can have several nearby stationary points: with
diagonal posteriors at a rank-deficient dictionary this fit and L-BFGS from its own start can end a few
1e-5 nats apart (either way), each at a point the other cannot improve.
"""

from __future__ import annotations

import torch

from sparse_elbo import closed_forms, parallel
from sparse_elbo.data import cross_products, energy, products
from sparse_elbo.inference.registry import POSTERIOR_FITS
from sparse_elbo.inference.statistics import start_scales
from sparse_elbo.objectives import DataStatistics, EntropyELBO
from sparse_elbo.posteriors import DiagonalPosterior, FullCovariancePosterior

_ARMIJO = 1e-4
_RESOLVABLE = 16  # in rounding units of |F_n|: smaller Newton decrements are noise


class FixedPointFit:
    """The iteration's state for data ``x (N,D)`` at the dictionary ``W (D,H)``: mean (N,H), the
    diagonal curvature d (N,H), σ² (), λ (H,), and after each iteration the covariance (N,H,H) and
    ``value``, the ``L_H`` of that q."""

    def __init__(self, x: torch.Tensor, W: torch.Tensor, prior, full: bool, learn_scales: bool = True):
        self.x, self.prior, self.full, self.learn_scales = x, prior, full, learn_scales
        n = x.shape[0]
        self.set_dictionary(W)
        self.x_energy = energy(x)
        self.n_total = parallel.count(n)  # data points over every rank
        self.mean = products(x, torch.linalg.pinv(W).T)  # least-squares codes (N,H)
        self.sigma2, self.lam = start_scales(x, self.mean, W, prior.statistic(self.mean, torch.zeros_like(self.mean)))
        self.curvature = (1.0 / self.lam**2).expand(n, -1).clone()  # d (N,H)
        self.covariance = None
        self.value = None

    @classmethod
    def at_scales(cls, x, W, prior, sigma2, lam, mean, std) -> FixedPointFit:
        """The fit of q alone at the given ``σ² ()`` and ``λ (H,)`` (step 4 leaves them), started from
        means (N,H) and marginal stds (N,H), e.g. an encoder's output; full covariances."""
        fit = cls(x, W, prior, full=True, learn_scales=False)
        fit.sigma2, fit.lam, fit.mean = sigma2, lam, mean.clone()
        _, _, curvature = prior.statistic_and_derivatives(mean, std)
        fit.curvature = (curvature / lam).clamp_min(torch.finfo(x.dtype).tiny)  # d (N,H)
        return fit

    def state(self) -> tuple[torch.Tensor, ...]:
        """What a warm start needs: mean, curvature, σ², λ."""
        return self.mean, self.curvature, self.sigma2, self.lam

    def load_state(self, state: tuple[torch.Tensor, ...]) -> None:
        self.mean, self.curvature, self.sigma2, self.lam = state

    def set_dictionary(self, W: torch.Tensor) -> None:
        """Move to the dictionary ``W (D,H)``, keeping q, d, σ², λ as the warm start of the next iterations."""
        self.gram = W.T @ W  # G (H,H)
        self.projection = products(self.x, W)  # b (N,H)

    @torch.no_grad()
    def write_to(self, posterior, model) -> None:
        """Store the current q in ``posterior`` (a full-covariance one, or a diagonal one for a diagonal fit)
        and σ²*, λ* in ``model``."""
        posterior.mean.copy_(self.mean)
        if self.full:
            posterior.set_scale_tril(torch.linalg.cholesky(self.covariance))
        else:
            posterior.set_std(torch.diagonal(self.covariance, dim1=-2, dim2=-1).sqrt())
        model.set_noise_and_prior_scale(self.sigma2, self.lam)

    def dictionary_gradient(self, W: torch.Tensor) -> torch.Tensor:
        """``∂(N L_H)/∂W`` (D,H) at the current q (σ²*, λ* following it): only σ²* depends on W."""
        second_moment = parallel.total(self.mean.T @ self.mean + self.covariance.sum(0))  # Σ_n E[z zᵀ] (H,H)
        return closed_forms.dictionary_gradient(parallel.total(cross_products(self.x, self.mean)), second_moment, W, self.sigma2)

    def _prior_mean_objective(self, mean, std):
        """``F_n`` in ``μ`` at fixed ``s`` (the terms that depend on μ)  ->  (N,)"""
        quadratic = ((mean @ self.gram - 2.0 * self.projection) * mean).sum(-1) / (2.0 * self.sigma2)
        return self.prior.expected_log_prob(mean, std**2, self.lam) - quadratic

    def _covariance(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step 1: Λ⁻¹ (N,H,H), the covariance of q (N,H,H) and its log-determinant (N,)."""
        H = self.mean.shape[1]
        precision = self.gram / self.sigma2 + torch.diag_embed(self.curvature)  # Λ (N,H,H)
        factor = torch.linalg.cholesky(precision)  # U (N,H,H) lower, Λ = U Uᵀ
        identity = torch.eye(H, dtype=factor.dtype, device=factor.device).expand_as(factor)
        factor_inverse = torch.linalg.solve_triangular(factor, identity, upper=False)  # U⁻¹ (N,H,H)
        inverse = factor_inverse.mT @ factor_inverse  # Λ⁻¹ = U⁻ᵀ U⁻¹ (N,H,H)
        if self.full:
            log_det = -2.0 * torch.log(torch.diagonal(factor, dim1=-2, dim2=-1)).sum(-1)  # log det Σ (N,)
            return inverse, inverse, log_det
        covariance = torch.diag_embed(1.0 / torch.diagonal(precision, dim1=-2, dim2=-1))
        return inverse, covariance, torch.log(torch.diagonal(covariance, dim1=-2, dim2=-1)).sum(-1)

    def _newton_step(self, inverse: torch.Tensor, std: torch.Tensor, line_search_steps: int) -> None:
        """Step 2: the damped Newton step in μ, each point with its own Armijo step size."""
        _, prior_gradient, _ = self.prior.statistic_and_derivatives(self.mean, std)
        gradient = closed_forms.code_gradient(self.projection - self.mean @ self.gram, self.sigma2, prior_gradient, self.lam)
        direction = (inverse @ gradient.unsqueeze(-1)).squeeze(-1)  # Newton direction (N,H)
        before = self._prior_mean_objective(self.mean, std)
        slope = (gradient * direction).sum(-1)  # gᵀΛ⁻¹g ≥ 0, twice the Newton step's predicted rise (N,)
        # a point whose predicted rise is below the rounding of F_n cannot verify any step: it stays put
        resolvable = slope > _RESOLVABLE * torch.finfo(slope.dtype).eps * before.abs().clamp_min(1.0)
        step_size = resolvable.to(slope.dtype)
        for _ in range(line_search_steps):
            trial = self._prior_mean_objective(self.mean + step_size.unsqueeze(-1) * direction, std)
            short = resolvable & (trial < before + _ARMIJO * step_size * slope)
            if not bool(short.any()):
                break
            step_size = torch.where(short, 0.5 * step_size, step_size)
        else:  # points without an accepted step stay where they are
            step_size = torch.where(short, torch.zeros_like(step_size), step_size)
        self.mean = self.mean + step_size.unsqueeze(-1) * direction

    def step(self, line_search_steps: int) -> torch.Tensor:
        """One iteration; returns ``L_H`` of the new ``q`` (nats per data point)."""
        n, H = self.mean.shape
        inverse, covariance, log_det = self._covariance()
        std = torch.diagonal(covariance, dim1=-2, dim2=-1).sqrt()  # s (N,H)
        self._newton_step(inverse, std, line_search_steps)

        # Step 3: halfway in log d, and never below √eps of the likelihood's precision
        floor = torch.finfo(std.dtype).eps ** 0.5 * torch.diagonal(self.gram).max() / self.sigma2
        statistic, _, prior_curvature = self.prior.statistic_and_derivatives(self.mean, std)  # at the new μ
        target = (prior_curvature / self.lam).clamp_min(floor)
        self.curvature = torch.exp(0.5 * (torch.log(self.curvature) + torch.log(target)))
        self.covariance = covariance

        # Step 4: σ²*, λ* and L_H of the new q
        residual = closed_forms.expected_residual_from_projections(
            self.x_energy, self.projection, self.mean, self.gram, covariance
        )
        residual, entropy = parallel.total(residual), closed_forms.gaussian_entropy_from_logdet(log_det, H)  # (), (N,)
        statistics = DataStatistics(residual / self.n_total, parallel.mean(statistic, self.n_total))
        posterior_entropy = parallel.mean(entropy, self.n_total)
        value = EntropyELBO.from_statistics(posterior_entropy, statistics, self.x.shape[1], self.prior)
        if self.learn_scales:
            self.sigma2, self.lam = value.sigma2, value.lam  # σ²*, λ*
        self.value = value.elbo
        return value.elbo

    def run(self, max_iterations: int, tolerance: float, line_search_steps: int) -> bool:
        """Iterate until ``L_H`` settles (True) or ``max_iterations`` is reached (False)."""
        tolerance = max(tolerance, 100.0 * torch.finfo(self.x.dtype).eps)
        previous = None
        for _ in range(max_iterations):
            value = float(self.step(line_search_steps))
            if previous is not None and abs(value - previous) <= tolerance * max(1.0, abs(value)):
                return True
            previous = value
        return False


@POSTERIOR_FITS.register(FullCovariancePosterior)
def _full_covariance_fit(x: torch.Tensor, W: torch.Tensor, prior, posterior, block_size: int | None) -> FixedPointFit:
    """Full covariances under any prior: the fixed-point fit (in one block)."""
    return FixedPointFit(x, W, prior, full=True)


@POSTERIOR_FITS.register(DiagonalPosterior)
def _diagonal_fit(x: torch.Tensor, W: torch.Tensor, prior, posterior, block_size: int | None) -> FixedPointFit:
    """Diagonal posteriors under a prior without a faster fit: the fixed-point fit with diagonal covariances."""
    return FixedPointFit(x, W, prior, full=False)
