"""The three objectives of docs/design.md §3. Each returns the ELBO averaged per data point (nats), its named
terms and the annealing-weighted value that an optimiser maximises. Higher is better.

- ``SampledELBO``:  ``(1/K) Σ_k [log p(x|z⁽ᵏ⁾) + log p(z⁽ᵏ⁾)] + H[q]``, ``z⁽ᵏ⁾ = μ + L ε⁽ᵏ⁾``; σ², λ learned.
- ``AnalyticELBO``: ``E_q[log p(x|z)] + E_q[log p(z)] + H[q]`` in closed form; σ², λ learned.
- ``EntropyELBO``:  ``L_H = (1/N) Σ_n H[q_n] - H[p(z; λ*)] - (D/2) log(2πe σ²*)`` with
  ``λ*``, ``σ²*`` the closed-form optima (docs/design.md §2) and unit-norm dictionary columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from sparse_elbo import closed_forms, parallel
from sparse_elbo.annealing import AnnealingWeights
from sparse_elbo.validation import invalid

UNIT_WEIGHTS = AnnealingWeights()


@dataclass
class ObjectiveValue:
    """elbo: unweighted per-data-point ELBO (scalar); weighted: what the optimiser maximises;
    terms: the three named terms (scalars) — expectations that sum to elbo for the analytic and
    sampled objectives, entropies with elbo = posterior − prior − likelihood entropy for ``L_H``;
    sigma2 (), lam (H,): the values used."""

    elbo: torch.Tensor
    weighted: torch.Tensor
    terms: dict[str, torch.Tensor]
    sigma2: torch.Tensor
    lam: torch.Tensor
    per_point: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class DataStatistics:
    """Full-data means used for ``σ²*`` and ``λ*``: residual (scalar) = mean_n E||x_n - W z||²,
    prior_statistic (H,) = mean_n t_nh (e.g. E|z_h|). Trainers pass these when the batch is not the data."""

    residual: torch.Tensor
    prior_statistic: torch.Tensor


def _weighted_sum(terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor], weights: AnnealingWeights):
    likelihood, prior, entropy = terms
    return weights.likelihood * likelihood + weights.prior * prior + weights.entropy * entropy


def _expectation_value(log_lik, log_prior, entropy, weights, sigma2, lam) -> ObjectiveValue:
    """ELBO ``= E[log p(x|z)] + E[log p(z)] + H[q]`` from per-data-point terms (N,) each."""
    per_point = log_lik + log_prior + entropy  # (N,)
    terms = (parallel.batch_mean(log_lik), parallel.batch_mean(log_prior), parallel.batch_mean(entropy))
    return ObjectiveValue(
        elbo=parallel.batch_mean(per_point),
        weighted=_weighted_sum(terms, weights),
        terms=dict(zip(("expected_log_likelihood", "expected_log_prior", "posterior_entropy"), terms)),
        sigma2=sigma2,
        lam=lam,
        per_point=per_point,
    )


def _detached(value: ObjectiveValue) -> ObjectiveValue:
    return ObjectiveValue(
        elbo=value.elbo.detach(),
        weighted=value.weighted.detach(),
        terms={name: term.detach() for name, term in value.terms.items()},
        sigma2=value.sigma2.detach(),
        lam=value.lam.detach(),
    )


def _autograd_only(posterior) -> bool:
    """``has_closed_form_gradient`` of the objectives without one: trainers use autograd."""
    return False


class Objective(Protocol):
    """The contract of an objective: ``objective(x, q, model, weights, generator, statistics)`` returns the
    ``ObjectiveValue`` of the data ``x (N,D)`` with Gaussians ``q`` under ``model``; it declares its ``name``
    (what trainers list in their capabilities), whether it learns σ², λ as parameters or uses their optima,
    whether it needs the unit-norm gauge, and whether it has a closed-form gradient for a posterior (a whole
    per-data-point posterior) or for a minibatch of Gaussians ``q`` (what minibatch trainers step on)."""

    name: str
    learns_noise_and_prior_scale: bool
    requires_unit_norm: bool
    prior_scales: tuple[str, ...]  # the annealing.prior_scale settings it can weigh (docs/design.md §8)

    def __call__(self, x, q, model, weights: AnnealingWeights = ..., generator=None, statistics=None) -> ObjectiveValue: ...

    def has_closed_form_gradient(self, posterior) -> bool: ...

    def has_closed_form_batch_gradient(self, q) -> bool: ...


class AnalyticELBO:
    """Closed-form ELBO with σ² and λ as learned model parameters."""

    name = "analytic"
    learns_noise_and_prior_scale = True
    requires_unit_norm = False
    prior_scales = ("optimal",)
    has_closed_form_gradient = staticmethod(_autograd_only)
    has_closed_form_batch_gradient = staticmethod(_autograd_only)

    def __call__(self, x, q, model, weights: AnnealingWeights = UNIT_WEIGHTS, generator=None, statistics=None):
        W = model.W  # (D,H)
        sigma2, lam = model.sigma2, model.lam
        trace = q.trace_term(W.T @ W)  # (N,)
        log_lik = closed_forms.expected_log_likelihood(x, W, q.mean, trace, sigma2)  # (N,)
        log_prior = model.prior.expected_log_prob(q.mean, q.variance, lam)  # (N,)
        return _expectation_value(log_lik, log_prior, q.entropy(), weights, sigma2, lam)


class SampledELBO:
    """Reparameterised Monte Carlo ELBO with ``n_samples`` samples per data point; entropy exact."""

    name = "sampled"
    learns_noise_and_prior_scale = True
    requires_unit_norm = False
    prior_scales = ("optimal",)
    has_closed_form_gradient = staticmethod(_autograd_only)
    has_closed_form_batch_gradient = staticmethod(_autograd_only)

    def __init__(self, n_samples: int = 1):
        if int(n_samples) < 1:
            raise invalid("n_samples", f"must be >= 1 for the sampled objective, got {n_samples}")
        self.n_samples = int(n_samples)

    def __call__(self, x, q, model, weights: AnnealingWeights = UNIT_WEIGHTS, generator=None, statistics=None):
        W = model.W  # (D,H)
        sigma2, lam = model.sigma2, model.lam
        z = q.rsample(self.n_samples, generator=generator)  # (K,N,H)
        log_lik = closed_forms.log_likelihood(x, W, z, sigma2).mean(0)  # (N,)
        log_prior = model.prior.log_prob(z, lam).mean(0)  # (N,)
        return _expectation_value(log_lik, log_prior, q.entropy(), weights, sigma2, lam)


class EntropyELBO:
    """The paper's entropy objective ``L_H`` (three entropies) at ``λ*``, ``σ²*``.

    ``statistics=None`` takes the optima from the batch itself (exact when the batch is the data);
    trainers that see minibatches pass full-data ``DataStatistics`` (docs/design.md §3 ``full``).
    """

    name = "entropy"
    learns_noise_and_prior_scale = False
    requires_unit_norm = True
    prior_scales = ("optimal", "fixed")

    def batch_statistics(self, x, q, model) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-data-point residual energy (N,) and prior statistic (N,H)."""
        W = model.W
        trace = q.trace_term(W.T @ W)
        residual = closed_forms.residual_energy(x, W, q.mean, trace)  # (N,)
        return residual, model.prior.statistic(q.mean, q.variance)  # (N,), (N,H)

    @staticmethod
    def has_closed_form_gradient(posterior) -> bool:
        """Where the posterior family gives its moments' pullback (``Posterior.closed_form_moments``); others
        are left to autograd."""
        return posterior.closed_form_moments

    def value_and_gradient(self, x, posterior, model, weights: AnnealingWeights = UNIT_WEIGHTS):
        """``L_H`` at the current parameters and the gradient of ``N · L_H,β`` (the weighted objective summed
        over data points) in closed form: what an autograd pass gives, for a fraction of its cost.

        With ``e_n = x_n - W μ_n``, ``r_n = ||e_n||² + tr(G Σ_n)``, ``R = mean_n r_n = D σ²*``, ``λ* = mean_n t_n``
        and weights (a, b, c) on the posterior, prior and likelihood entropies:

            ∂(N L)/∂r_n = -c / (2σ²*) =: α,       ∂(N L)/∂μ_n = -2α Wᵀe_n + b E_qn[∂ log p/∂z],
            ∂(N L)/∂s²_nh = -(b/2) E_qn[-∂² log p/∂z_h²],     ∂(N L)/∂W = -2α Σ_n e_n μ_nᵀ + 2 W ∂/∂G,     ∂(N L)/∂H[q_n] = a

        The prior terms hold because ``-N H[p(·; λ*)] = Σ_n E_qn[log p(z; λ)]`` at ``λ = λ*`` and λ* is its
        stationary point (envelope theorem); the expectations are the prior's Bonnet/Price closed forms.
        The covariance parameters and ``∂/∂G`` come from ``posterior.moments_with_pullback``, the step from
        ``W`` to the stored ``W_raw`` from ``model.raw_gradient``.

        Returns the ``ObjectiveValue`` and ``{parameter: gradient}`` for the posterior's parameters and ``W_raw``.
        """
        D = x.shape[1]
        with torch.no_grad():
            W_value, mean = model.W, posterior.mean.detach()  # (D,H), (N,H)
            variance, trace, entropy, pullback = posterior.moments_with_pullback(W_value.T @ W_value)
            error = x - mean @ W_value.T  # (N,D)
            residual = error.pow(2).sum(-1).add_(trace).mean()  # R = D σ²*
            statistic, prior_gradient, prior_curvature = model.prior.statistic_and_derivatives(
                mean, variance.sqrt()
            )  # (N,H) each
            value = self.from_statistics(entropy.mean(), DataStatistics(residual, statistic.mean(0)), D, model.prior, weights)
            lam = value.lam  # λ* (H,)
            alpha = -weights.likelihood / (2.0 * value.sigma2)  # ∂(N L)/∂r_n, the same for every point
            # -N H[p(λ*)] = Σ_n E_qn[log p(z; λ)] at λ = λ* (envelope theorem): Bonnet's and Price's theorems
            grad_mean = closed_forms.code_gradient(
                error @ W_value, value.sigma2, prior_gradient, lam, weights.likelihood, weights.prior
            )  # (N,H)
            # the likelihood's part of ∂/∂s² goes through tr(G Σ_n), in the pullback: here the prior's alone
            grad_variance = closed_forms.prior_variance_gradient(prior_curvature, lam, weights.prior)  # (N,H)
            grads, grad_gram = pullback(grad_variance, alpha, weights.entropy)
            grad_W = (-2.0 * alpha) * (error.T @ mean) + W_value @ (grad_gram + grad_gram.T)  # (D,H)
        named = dict(posterior.named_parameters())
        gradients = {named["mean"]: grad_mean, model.W_raw: model.raw_gradient(grad_W)}
        gradients.update({named[name]: grad for name, grad in grads.items()})
        return value, gradients

    @staticmethod
    def has_closed_form_batch_gradient(q) -> bool:
        """Minibatches of diagonal Gaussians (an encoder's output, or rows of per-data-point posteriors)."""
        return q.diagonal

    def batch_value_and_gradient(self, x, q, model, weights=UNIT_WEIGHTS, statistics_of=None):
        """The value of the minibatch ``x (B,D)`` with diagonal Gaussians ``q`` (what ``__call__`` returns) and
        the gradient of its weighted value with respect to ``q.mean``, ``q.std`` (B,H) and ``W`` (D,H) in closed
        form, so that a minibatch step backpropagates from ``q`` alone (an encoder's own backward pass).

        ``statistics_of(r (B,), t (B,H)) -> DataStatistics`` gives the means behind ``σ²*, λ*`` from the batch's
        rows (a trainer's full-data store, whose gradient is that of the batch means); None: the batch's means.
        Either way (``B``: the minibatch's size over every rank, ``parallel.minibatch``) the weighted value ``F`` sees the batch through ``Hq = mean_n H[q_n]``, ``R = mean r`` and
        ``t̄ = mean t`` with the batch means' gradients. With ``(a, ρ, τ) = ∂F/∂(Hq, R, t̄)`` (from the small
        graph of ``from_statistics``: any prior, a fixed ``weights.prior_scale`` or not), ``e_n = x_n - W μ_n`` and
        ``r_n = ||e_n||² + Σ_h G_hh s_nh²``:

            ∂F/∂μ_n = (1/B) (-2ρ Wᵀe_n + τ ⊙ ∂t_n/∂μ_n),
            ∂F/∂s_n = (1/B) (2ρ G_hh s_n + τ ⊙ ∂t_n/∂s_n + a / s_n),
            ∂F/∂W   = (2ρ/B) (-Σ_n e_n μ_nᵀ + W diag(Σ_n s_n²)),

        where the prior's ``statistic_and_derivatives`` gives ``∂t/∂μ = -k g`` and ``∂t/∂s = k c s`` (``k`` its
        statistic degree: ``E_q[log p(z; λ)] = -t/(kλ) + const``).

        Returns the ``ObjectiveValue`` (detached) and ``(grad_mean, grad_std, grad_W)``.
        """
        B, D = x.shape  # B: this rank's part of the minibatch (parallel.minibatch)
        with torch.no_grad():
            W, mean, std = model.W, q.mean.detach(), q.std.detach()  # (D,H), (B,H), (B,H)
            gram_diagonal, variance = W.pow(2).sum(0), std * std  # G_hh (H,), s² (B,H)
            error = x - mean @ W.T  # e (B,D)
            residual = error.pow(2).sum(-1) + variance @ gram_diagonal  # r (B,)
            statistic, prior_gradient, prior_curvature = model.prior.statistic_and_derivatives(mean, std)  # t, g, c (B,H)
            if statistics_of is None:
                means = DataStatistics(parallel.batch_mean(residual), parallel.batch_mean(statistic))
            else:
                means = statistics_of(residual, statistic)
            leaves = (parallel.batch_mean(q.entropy()), means.residual, means.prior_statistic)
        leaves = tuple(leaf.detach().requires_grad_(True) for leaf in leaves)
        with torch.enable_grad():
            value = self.from_statistics(leaves[0], DataStatistics(*leaves[1:]), D, model.prior, weights)
            a, rho, tau = torch.autograd.grad(value.weighted, leaves)
        with torch.no_grad():
            k = model.prior.statistic_degree
            a, rho, tau = (derivative.to(mean.dtype) / parallel.batch_size(B) for derivative in (a, rho, tau))
            grad_mean = (error @ W).mul_(-2.0 * rho).sub_(prior_gradient * (k * tau))
            grad_std = std * (2.0 * rho * gram_diagonal + (k * tau) * prior_curvature) + a / std
            grad_W = (error.T @ mean).mul_(-2.0 * rho).add_(W * (2.0 * rho * variance.sum(0)))
        return _detached(value), (grad_mean, grad_std, grad_W)

    def __call__(self, x, q, model, weights: AnnealingWeights = UNIT_WEIGHTS, generator=None, statistics=None):
        if statistics is None:
            residual, prior_stat = self.batch_statistics(x, q, model)
            statistics = DataStatistics(parallel.batch_mean(residual), parallel.batch_mean(prior_stat))
        return self.from_statistics(parallel.batch_mean(q.entropy()), statistics, x.shape[-1], model.prior, weights)

    @staticmethod
    def from_statistics(
        posterior_entropy: torch.Tensor, statistics: DataStatistics, n_observed: int, prior, weights=UNIT_WEIGHTS
    ) -> ObjectiveValue:
        """``L_H`` from the mean posterior entropy and the data means behind ``σ²*`` and ``λ*``.

        With ``weights.prior_scale = λ_0`` (fixed-scale annealing, docs/design.md §8) the weighted value's prior
        term is the cross-entropy ``-mean_n E_qn[log p(z; λ_0)]`` at that fixed scale instead of ``H[p(z; λ*)]``
        (the two agree at ``λ_0 = λ*``), so that ``β_prior > 1`` weights a bounded term; ``elbo`` stays ``L_H``."""
        sigma2 = closed_forms.optimal_sigma2(statistics.residual, n_observed)  # σ²*
        lam = closed_forms.optimal_lambda(statistics.prior_statistic)  # λ*
        terms = {
            "posterior_entropy": posterior_entropy,
            "prior_entropy": prior.entropy(lam),
            "likelihood_entropy": closed_forms.gaussian_noise_entropy(sigma2, n_observed),
        }
        entropies = tuple(terms.values())
        weighted_terms = entropies
        if weights.prior_scale is not None:
            held = torch.full_like(statistics.prior_statistic, weights.prior_scale)  # λ_0 (H,)
            weighted_terms = (posterior_entropy, prior.cross_entropy(statistics.prior_statistic, held), entropies[2])
        return ObjectiveValue(
            elbo=closed_forms.entropy_elbo(*entropies),
            weighted=closed_forms.entropy_elbo(*weighted_terms, (weights.entropy, weights.prior, weights.likelihood)),
            terms=terms,
            sigma2=sigma2,
            lam=lam,
        )


def _blocks(n: int, points: torch.Tensor | None, block_size: int, device) -> list[torch.Tensor]:
    """``points`` (all ``n`` data points when None) in blocks of ``block_size``."""
    if points is None:
        return [torch.arange(start, min(start + block_size, n), device=device) for start in range(0, n, block_size)]
    return list(torch.split(points, block_size))


@torch.no_grad()
def entropy_statistics(x, q_of, model, block_size: int = 16384, points=None) -> tuple[DataStatistics, torch.Tensor]:
    """The means over the data points ``points`` of ``x`` (all when None) behind ``σ²* = residual / D`` and
    ``λ* = prior_statistic``, and the mean posterior entropy, accumulated over blocks of points so that memory
    stays bounded; ``q_of(index)``: the Gaussians of data points ``index``."""
    n = x.shape[0] if points is None else len(points)
    residual, prior_stat, entropy = x.new_zeros(()), x.new_zeros(model.lam.shape[-1]), x.new_zeros(())
    for index in _blocks(x.shape[0], points, block_size, x.device):
        q = q_of(index)
        r, t = EntropyELBO().batch_statistics(x[index], q, model)  # (B,), (B,H)
        residual, prior_stat, entropy = residual + r.sum(), prior_stat + t.sum(0), entropy + q.entropy().sum()
    if parallel.sharing() is not None:  # the data points of every rank
        n = parallel.count(n)
        residual, prior_stat, entropy = (part.to(x.dtype) for part in parallel.summed(residual, prior_stat, entropy))
    return DataStatistics(residual / n, prior_stat / n), entropy / n


@torch.no_grad()
def exact_value(objective, x, q_of, model, weights=UNIT_WEIGHTS, block_size: int = 16384, points=None) -> ObjectiveValue:
    """The closed-form ``objective`` (``EntropyELBO`` or ``AnalyticELBO``) over the data points ``points`` of ``x``
    (all when None), accumulated over blocks of points; ``weighted`` uses ``weights``, ``elbo`` never does;
    ``q_of(index)``: the Gaussians of data points ``index`` (all when None)."""
    n = x.shape[0] if points is None else len(points)
    if n <= block_size and parallel.sharing() is None:
        if points is None and not torch.is_tensor(x):  # rows left in their file (data.StreamedRows): one block, read
            points = torch.arange(n, device=x.device)
        return objective(x if points is None else x[points], q_of(points), model, weights)
    if isinstance(objective, EntropyELBO):
        statistics, mean_entropy = entropy_statistics(x, q_of, model, block_size, points)
        return EntropyELBO.from_statistics(mean_entropy, statistics, x.shape[1], model.prior, weights)
    values = [
        (len(index), objective(x[index], q_of(index), model, weights))
        for index in _blocks(x.shape[0], points, block_size, x.device)
    ]
    names = list(values[0][1].terms)
    sums = [sum(m * v.elbo for m, v in values), sum(m * v.weighted for m, v in values)]
    sums += [sum(m * v.terms[name] for m, v in values) for name in names]
    if parallel.sharing() is not None:  # the data points of every rank
        n = parallel.count(n)
        sums = [part.to(x.dtype) for part in parallel.summed(*sums)]
    return ObjectiveValue(
        elbo=sums[0] / n,
        weighted=sums[1] / n,
        terms=dict(zip(names, (t / n for t in sums[2:]))),
        sigma2=model.sigma2,
        lam=model.lam,
    )
