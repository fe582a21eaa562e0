"""Fitting diagonal posteriors at a fixed dictionary in O(N·H²) per iteration: coordinate ascent with
Newton steps (docs/design.md §6.4).

For a diagonal ``q_n = N(μ_n, diag s_n²)`` under the Laplace prior, at fixed ``W`` (unit-norm columns),
``σ²`` and ``λ``, the analytic ELBO of one data point,

    F_n = -(μᵀGμ - 2bᵀμ + Σ_h G_hh s_h²)/(2σ²) - Σ_h E|z_h|/λ_h + Σ_h log s_h + c_n,
    G = WᵀW (H,H),  b = Wᵀx_n (H,),  E|z_h| = s_h √(2/π) e^{-r_h²/2} + μ_h erf(r_h/√2),  r = μ/s,

is jointly concave in ``(μ_n, s_n)`` (``E|μ + sε|`` is convex, the quadratic and ``-log s`` are concave).
``L_H = max_{σ²,λ} F`` (the sum over points), so ascent on ``F`` in turns over the scales, the means and
``(σ², λ)`` is ascent on ``L_H``. One iteration, for all data points at once, in blocks:

1. **scales**: each ``s_nh`` maximises ``F_n`` at fixed ``μ`` — a 1-D problem, strictly concave in
   ``ρ = log s`` with (``a_h = G_hh/σ²``, ``e = √(2/π) e^{-r²/2}``)

       ∂F/∂ρ = 1 - a s² - s e/λ,     ∂²F/∂ρ² = -2 a s² - s e (1 + r²)/λ  < 0,

   solved by ``scale_steps`` Newton steps (each at most ±2 in ρ); an element whose value fell keeps its
   old scale;
2. **means**: a Newton step ``μ ← μ + t δ`` at fixed ``s``: ``δ ≈ A⁻¹ g`` with ``g = (b - Gμ)/σ² - erf(r/√2)/λ``
   the gradient and ``A = G/σ² + diag(e/(s λ))`` the negated Hessian of ``F_n`` in ``μ`` (Price's theorem),
   by conjugate gradients preconditioned by ``A``'s diagonal — one (N,H)@(H,H) product per iteration, never
   an (N,H,H) array — run until every row's preconditioned residual is below ``cg_tolerance`` of its
   gradient's (at most ``cg_iterations``; a fixed handful is too few where W's columns are correlated and
   ``A`` ill-conditioned), and ``t`` halved per point until ``F_n`` rises (Armijo);
3. ``σ², λ ← σ²*, λ*`` of the new ``q``.

Truncated CG gives an ascent direction (``gᵀδ > 0``) for any number of iterations, so every step raises
``L_H``. Start: the least-squares codes ``μ = x W⁺ᵀ``, ``σ²`` their residual (plus 10⁻³ of the data's mean
square) and ``λ`` their mean ``|μ|``; or a given ``q`` with its ``σ²*, λ*``.
"""

from __future__ import annotations

import math

import torch

from sparse_elbo import closed_forms, parallel
from sparse_elbo.data import cross_products, products, row_energies
from sparse_elbo.inference.kernels import capped_density
from sparse_elbo.inference.registry import POSTERIOR_FITS
from sparse_elbo.inference.statistics import block_size as default_block_size
from sparse_elbo.inference.statistics import start_scales
from sparse_elbo.objectives import DataStatistics, EntropyELBO
from sparse_elbo.posteriors import DiagonalPosterior
from sparse_elbo.priors import LaplacePrior

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_ARMIJO = 1e-4
_MAX_SCALE_STEP = 2.0  # largest change of log s in one Newton step
_RESOLVABLE = 1  # in rounding units of Σ_h E|z_h|/λ_h: a smaller predicted rise cannot be verified


def _density_and_sign_mass(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ``e = √(2/π) e^{-r²/2}``, ``erf(r/√2)`` and ``r = μ/s`` (N,H) each: ``closed_forms.folded_normal_parts``
    computed in place (no autograd here), which keeps the fit's inner loop up to a third faster, with r²
    capped as in the fused kernel (``kernels.capped_density``)."""
    ratio = mean / std
    return capped_density(ratio), (ratio * _INV_SQRT_2).erf_(), ratio


class DiagonalNewtonFit:
    """The iteration's state for data ``x (N,D)`` at the dictionary ``W (D,H)``: mean and log-std (N,H),
    σ² () and λ (H,); after each iteration ``value``, the ``L_H`` of the current q (float64)."""

    def __init__(
        self,
        x: torch.Tensor,
        W: torch.Tensor,
        block_size: int = 16384,
        cg_iterations: int = 50,
        cg_tolerance: float = 0.1,
        scale_steps: int = 3,
        line_search_steps: int = 30,
        mean: torch.Tensor | None = None,
        log_std: torch.Tensor | None = None,
    ):
        self.x, self.n_observed = x, x.shape[1]
        self.cg_iterations, self.scale_steps, self.line_search_steps = cg_iterations, scale_steps, line_search_steps
        self.cg_tolerance = cg_tolerance
        self.set_dictionary(W)
        self.row_energy = row_energies(x)  # ||x_n||² (N,)
        self.blocks = [slice(start, start + block_size) for start in range(0, x.shape[0], block_size)]
        self.value = None
        self.n_total = parallel.count(x.shape[0])  # data points over every rank
        if mean is None:
            self.mean = products(x, torch.linalg.pinv(W).T)  # least-squares codes (N,H)
            self.sigma2, self.lam = start_scales(x, self.mean, W, self.mean.abs())  # λ: mean |μ|
            self.log_std = (-0.5 * torch.log(self.gram_diagonal / self.sigma2 + self.lam**-2)).expand_as(self.mean).clone()
        else:
            self.mean, self.log_std = mean.clone(), log_std.clone()
            self.value = self._statistics_pass()

    def set_dictionary(self, W: torch.Tensor) -> None:
        """Move to the dictionary ``W (D,H)``, keeping q, σ², λ as the warm start of the next iterations."""
        self.gram = W.T @ W  # G (H,H)
        self.gram_diagonal = torch.diagonal(self.gram).clone()  # (H,)
        self.projection = products(self.x, W)  # b (N,H)

    def state(self) -> tuple[torch.Tensor, ...]:
        """What a warm start needs: mean, log-std, σ², λ."""
        return self.mean, self.log_std, self.sigma2, self.lam

    def load_state(self, state: tuple[torch.Tensor, ...]) -> None:
        self.mean, self.log_std, self.sigma2, self.lam = state

    def dictionary_gradient(self, W: torch.Tensor) -> torch.Tensor:
        """``∂(N L_H)/∂W`` (D,H) at the current q (σ²*, λ* following it): only σ²* depends on W."""
        second_moment = self.mean.T @ self.mean + torch.diag(self.log_std.exp().square().sum(0))  # Σ_n E[z zᵀ] (H,H)
        cross = parallel.total(cross_products(self.x, self.mean))  # Σ_n x_n μ_nᵀ (D,H)
        return closed_forms.dictionary_gradient(cross, parallel.total(second_moment), W, self.sigma2)

    # ------------------------------------------------------------------------------------ the pieces
    def _update_scales(self, mean: torch.Tensor, log_std: torch.Tensor, inverse_lambda: torch.Tensor) -> torch.Tensor:
        """Step 1: Newton in ρ = log s on each element's concave 1-D problem  -> the new ρ (N,H)"""
        likelihood_curvature = self.gram_diagonal / self.sigma2  # a (H,)

        def value(rho):
            std = rho.exp()
            density, sign_mass, _ = _density_and_sign_mass(mean, std)
            return rho - 0.5 * likelihood_curvature * std.square() - (std * density + mean * sign_mass) * inverse_lambda

        rho = log_std
        for _ in range(self.scale_steps):
            std = rho.exp()
            density, _, ratio = _density_and_sign_mass(mean, std)
            prior_part = std * density * inverse_lambda  # s e / λ
            likelihood_part = likelihood_curvature * std.square()  # a s²
            gradient = 1.0 - likelihood_part - prior_part
            curvature = 2.0 * likelihood_part + prior_part * (1.0 + ratio.square())  # -∂²F/∂ρ² > 0
            rho = rho + (gradient / curvature).clamp(-_MAX_SCALE_STEP, _MAX_SCALE_STEP)
        return torch.where(value(rho) >= value(log_std), rho, log_std)

    def _conjugate_gradients(self, gradient, prior_curvature):
        """Step 2's direction: ``δ ≈ A⁻¹ g`` with ``A = G/σ² + diag(prior_curvature)``, by CG per row
        preconditioned by A's diagonal  -> δ and Gδ (N,H) each"""
        diagonal = self.gram_diagonal / self.sigma2 + prior_curvature
        tiny = torch.finfo(gradient.dtype).tiny
        direction, gram_direction = torch.zeros_like(gradient), torch.zeros_like(gradient)
        residual = gradient.clone()
        search = residual / diagonal
        rz = (residual * search).sum(-1, keepdim=True)  # (N,1)
        target = self.cg_tolerance**2 * rz  # stop once every row's rᵀM⁻¹r is below η² gᵀM⁻¹g
        for iteration in range(self.cg_iterations):
            if iteration > 0 and iteration % 4 == 0 and not bool((rz > target).any()):  # a host sync every 4
                break
            gram_search = search @ self.gram
            product = gram_search / self.sigma2 + prior_curvature * search  # A p (N,H)
            curvature = (search * product).sum(-1, keepdim=True)
            step = torch.where(curvature > 0, rz / curvature.clamp_min(tiny), 0.0)
            direction.add_(step * search)
            gram_direction.add_(step * gram_search)
            residual.sub_(step * product)
            preconditioned = residual / diagonal
            rz_next = (residual * preconditioned).sum(-1, keepdim=True)
            search = preconditioned + torch.where(rz > 0, rz_next / rz.clamp_min(tiny), 0.0) * search
            rz = rz_next
        return direction, gram_direction

    def _update_means(self, index, mean, std, inverse_lambda):
        """Step 2 on one block  -> the new μ (B,H), Gμ (B,H) and E|z| (B,H) there.

        The rise of ``F_n`` along ``μ + tδ`` is evaluated as a difference, ``-(2t δᵀ(Gμ - b) + t² δᵀGδ)/(2σ²)
        - Σ_h (E|z_h(t)| - E|z_h|)/λ_h``, not as ``F_n(μ + tδ) - F_n(μ)``: along a direction the likelihood
        leaves flat (a rank-deficient W) the latter's rounding grows with ``|μ|`` and can fake a rise."""
        projection = self.projection[index]
        density, sign_mass, _ = _density_and_sign_mass(mean, std)
        gram_mean = mean @ self.gram
        gradient = (projection - gram_mean) / self.sigma2 - sign_mass * inverse_lambda  # g (B,H)
        # e/(s λ), floored so that A stays positive definite where W is singular (as in the fixed-point fit)
        floor = torch.finfo(mean.dtype).eps ** 0.5 * self.gram_diagonal.max() / self.sigma2
        direction, gram_direction = self._conjugate_gradients(gradient, (density / std * inverse_lambda).clamp_min(floor))
        expected_abs = std * density + mean * sign_mass
        linear = 2.0 * (direction * (gram_mean - projection)).sum(-1)  # 2 δᵀ(Gμ - b) (B,)
        quadratic = (direction * gram_direction).sum(-1)  # δᵀGδ ≥ 0 (B,)
        slope = (gradient * direction).sum(-1)  # gᵀδ > 0 (B,)
        scale = expected_abs @ inverse_lambda  # Σ_h E|z_h|/λ_h: what the rise is rounded against (B,)
        resolvable = slope > _RESOLVABLE * torch.finfo(slope.dtype).eps * scale.clamp_min(1.0)
        step = resolvable.to(mean.dtype)
        accepted_step = torch.zeros_like(step)
        for _ in range(self.line_search_steps):
            trial = mean + step.unsqueeze(-1) * direction
            trial_density, trial_sign_mass, _ = _density_and_sign_mass(trial, std)
            trial_abs = std * trial_density + trial * trial_sign_mass
            rise = (
                -(step * linear + step.square() * quadratic) / (2.0 * self.sigma2) - (trial_abs - expected_abs) @ inverse_lambda
            )
            accepted = (step > 0) & (accepted_step == 0) & (rise >= _ARMIJO * step * slope)
            accepted_step = torch.where(accepted, step, accepted_step)
            expected_abs = torch.where(accepted.unsqueeze(-1), trial_abs, expected_abs)
            if not bool(((accepted_step == 0) & (step > 0) & resolvable).any()):
                break
            step = 0.5 * step
        mean = mean + accepted_step.unsqueeze(-1) * direction
        return mean, gram_mean + accepted_step.unsqueeze(-1) * gram_direction, expected_abs

    def _block_sums(self, index, mean, log_std, gram_mean, expected_abs):
        """Σ_n E||x_n - Wz||², Σ_n E|z_n| (H,) and Σ_n Σ_h log s_nh of one block, in float64."""
        f64 = torch.float64
        quadratic = (gram_mean - 2.0 * self.projection[index]) * mean + log_std.exp().square() * self.gram_diagonal
        residual = self.row_energy[index].sum(dtype=f64) + quadratic.sum(dtype=f64)
        return residual, expected_abs.sum(0, dtype=f64), log_std.sum(dtype=f64)

    def _finish(self, residual, prior_sum, log_std_sum):
        """Step 3: σ², λ ← σ²*, λ* and ``L_H`` from the full-data sums (of this rank's points: completed here)."""
        residual, prior_sum, log_std_sum = parallel.summed(residual, prior_sum, log_std_sum)
        n, H = self.n_total, self.mean.shape[1]
        entropy = log_std_sum / n + 0.5 * H * closed_forms.LOG_2PIE
        value = EntropyELBO.from_statistics(entropy, DataStatistics(residual / n, prior_sum / n), self.n_observed, LaplacePrior())
        self.sigma2 = value.sigma2.to(self.x.dtype)
        self.lam = value.lam.to(self.x.dtype).clamp_min(torch.finfo(self.x.dtype).tiny)
        return value.elbo

    def _statistics_pass(self) -> torch.Tensor:
        sums = [0.0, 0.0, 0.0]
        for index in self.blocks:
            mean, log_std = self.mean[index], self.log_std[index]
            density, sign_mass, _ = _density_and_sign_mass(mean, log_std.exp())
            expected_abs = log_std.exp() * density + mean * sign_mass
            block = self._block_sums(index, mean, log_std, mean @ self.gram, expected_abs)
            sums = [total + part for total, part in zip(sums, block)]
        return self._finish(*sums)

    # ------------------------------------------------------------------------------------ the iteration
    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One iteration (steps 1-3, module docstring); returns ``L_H`` of the new q (nats per data point)."""
        inverse_lambda = self.lam.reciprocal()
        sums = [0.0, 0.0, 0.0]
        for index in self.blocks:
            log_std = self._update_scales(self.mean[index], self.log_std[index], inverse_lambda)
            mean, gram_mean, expected_abs = self._update_means(index, self.mean[index], log_std.exp(), inverse_lambda)
            self.mean[index], self.log_std[index] = mean, log_std
            block = self._block_sums(index, mean, log_std, gram_mean, expected_abs)
            sums = [total + part for total, part in zip(sums, block)]
        self.value = self._finish(*sums)
        return self.value

    def run(self, max_iterations: int, tolerance: float, line_search_steps: int | None = None) -> bool:
        """Iterate until ``L_H`` changes by less than ``tolerance · max(1, |L_H|)`` (floored at a hundred
        rounding units of the data's dtype) (True) or ``max_iterations`` is reached (False)."""
        tolerance = max(tolerance, 100.0 * torch.finfo(self.x.dtype).eps)
        self.line_search_steps = line_search_steps or self.line_search_steps
        previous = None
        for _ in range(max_iterations):
            value = float(self.step())
            if previous is not None and abs(value - previous) <= tolerance * max(1.0, abs(value)):
                return True
            previous = value
        return False

    @torch.no_grad()
    def write_to(self, posterior, model) -> None:
        """Store the current q in the diagonal ``posterior`` and σ²*, λ* in ``model``."""
        posterior.mean.copy_(self.mean)
        posterior.set_std(self.log_std.exp())
        model.set_noise_and_prior_scale(self.sigma2, self.lam)


@POSTERIOR_FITS.register(DiagonalPosterior, LaplacePrior)
def _diagonal_laplace_fit(x: torch.Tensor, W: torch.Tensor, prior, posterior, block_size: int | None) -> DiagonalNewtonFit:
    """Diagonal posteriors under the Laplace prior: this fit, in blocks of ``block_size`` points (None: all on
    CUDA, 16,384 on a CPU)."""
    return DiagonalNewtonFit(x, W, default_block_size(x, block_size))
