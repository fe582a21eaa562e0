"""Closed forms of docs/design.md §2 against independent float64 references: quadrature, Monte Carlo with
noise-aware (z-score) tolerances, dense-matrix formulas and torch.distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch.distributions import Laplace, LowRankMultivariateNormal, MultivariateNormal, Normal

from sparse_elbo import closed_forms
from sparse_elbo.gaussians import DiagonalGaussian, FullGaussian, LowRankGaussian

F64 = torch.float64
Z_MAX = 5.0  # Monte Carlo tolerance in standard errors


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=_gen(seed))


def _random_scale_tril(N: int, H: int, seed: int) -> torch.Tensor:
    """Lower-triangular (N,H,H) with positive diagonal and sizeable off-diagonal entries."""
    g = _gen(seed)
    L = torch.randn(N, H, H, dtype=F64, generator=g).tril(-1) * 0.5
    diag = torch.rand(N, H, dtype=F64, generator=g) * 0.8 + 0.2
    return L + torch.diag_embed(diag)


def _assert_within_standard_errors(estimate, standard_error, exact, z_max=Z_MAX):
    estimate, standard_error, exact = (torch.as_tensor(t, dtype=F64) for t in (estimate, standard_error, exact))
    assert torch.all(standard_error > 0), "degenerate Monte Carlo standard error"
    z = (estimate - exact).abs() / standard_error
    assert torch.all(z < z_max), f"z-scores {z.tolist()} (estimate {estimate.tolist()}, exact {exact.tolist()})"


def _mc_mean_and_se(samples: torch.Tensor):
    """samples (K, ...) -> mean and standard error of the mean over the first axis."""
    K = samples.shape[0]
    return samples.mean(0), samples.std(0) / math.sqrt(K)


# --------------------------------------------------------------------------------------------------
# folded normal mean E|z|, z ~ N(μ, s²)
# --------------------------------------------------------------------------------------------------


def _quad_folded_normal_mean(mu: float, s: float) -> float:
    """∫ |z| N(z; μ, s²) dz by adaptive quadrature on [μ - 40s, μ + 40s], split at 0 and μ."""

    def integrand(z):
        return abs(z) * stats.norm.pdf(z, loc=mu, scale=s)

    a, b = mu - 40.0 * s, mu + 40.0 * s
    breaks = sorted({a, b, mu} | ({0.0} if a < 0.0 < b else set()))
    total = 0.0
    for lo, hi in zip(breaks[:-1], breaks[1:]):
        value, _ = integrate.quad(integrand, lo, hi, epsabs=0.0, epsrel=1e-13, limit=200)
        total += value
    return total


MUS = [-50.0, -3.0, -1.0, -0.1, 0.0, 0.2, 1.5, 4.0, 30.0]
STDS = [1e-3, 0.1, 1.0, 3.0]


@pytest.mark.parametrize("s", STDS)
def test_folded_normal_mean_matches_quadrature(s):
    mu = torch.tensor(MUS, dtype=F64)
    value = closed_forms.folded_normal_mean(mu, torch.full_like(mu, s))
    reference = torch.tensor([_quad_folded_normal_mean(m, s) for m in MUS], dtype=F64)
    torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-14)
    # |μ|/s up to 5e4 is in the grid: there E|z| must be |μ| to machine precision
    assert value.dtype == F64


def test_folded_normal_mean_matches_scipy_foldnorm_and_broadcasts():
    mu = _randn(5, 1, seed=1) * 2.0  # (5,1)
    s = torch.tensor([0.05, 0.5, 2.0], dtype=F64)  # (3,)
    value = closed_forms.folded_normal_mean(mu, s)
    assert value.shape == (5, 3)
    mu_np, s_np = np.broadcast_arrays(mu.numpy(), s.numpy())
    reference = stats.foldnorm(c=np.abs(mu_np) / s_np, scale=s_np).mean()
    np.testing.assert_allclose(value.numpy(), reference, rtol=1e-10)
    # gradients flow back to the broadcast (un-expanded) shapes
    mu.requires_grad_(True), s.requires_grad_(True)
    closed_forms.folded_normal_mean(mu, s).sum().backward()
    assert mu.grad.shape == (5, 1) and s.grad.shape == (3,)


def test_folded_normal_mean_gradcheck():
    mu = (_randn(4, 3, seed=2) * 1.5).requires_grad_(True)
    s = (torch.rand(4, 3, dtype=F64, generator=_gen(3)) + 0.05).requires_grad_(True)
    assert torch.autograd.gradcheck(closed_forms.folded_normal_mean, (mu, s), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_folded_normal_mean_gradients_match_central_differences():
    mu = torch.tensor([-2.0, -0.3, 0.0, 0.7, 5.0], dtype=F64)
    s = torch.tensor([0.4, 1.3, 0.2, 0.01, 2.0], dtype=F64)
    mu_, s_ = mu.clone().requires_grad_(True), s.clone().requires_grad_(True)
    closed_forms.folded_normal_mean(mu_, s_).sum().backward()
    h = 1e-6
    f = closed_forms.folded_normal_mean
    d_mu = (f(mu + h, s) - f(mu - h, s)) / (2 * h)
    d_s = (f(mu, s + h * s) - f(mu, s - h * s)) / (2 * h * s)
    torch.testing.assert_close(mu_.grad, d_mu, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(s_.grad, d_s, rtol=1e-6, atol=1e-8)
    # and the textbook derivatives ∂/∂μ = erf(μ/(√2 s)), ∂/∂s = 2 φ(μ/s)
    torch.testing.assert_close(mu_.grad, torch.erf(mu / (math.sqrt(2) * s)), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(s_.grad, 2 * torch.exp(Normal(0.0, 1.0).log_prob(mu / s)), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "mu, s, value, d_mu, d_s",
    [
        (1e-4, 1e-8, 1e-4, 1.0, 0.0),  # |μ|/s = 1e4
        (-1e-4, 1e-8, 1e-4, -1.0, 0.0),
        (1e4, 1.0, 1e4, 1.0, 0.0),
        (-1e4, 1.0, 1e4, -1.0, 0.0),
        (0.0, 1e-8, 1e-8 * math.sqrt(2 / math.pi), 0.0, math.sqrt(2 / math.pi)),
        (3e-8, 1e-8, None, math.erf(3 / math.sqrt(2)), math.sqrt(2 / math.pi) * math.exp(-4.5)),
    ],
)
def test_folded_normal_mean_is_finite_and_correct_for_extreme_inputs(mu, s, value, d_mu, d_s):
    mu_t = torch.tensor(mu, dtype=F64, requires_grad=True)
    s_t = torch.tensor(s, dtype=F64, requires_grad=True)
    out = closed_forms.folded_normal_mean(mu_t, s_t)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(mu_t.grad) and torch.isfinite(s_t.grad)
    if value is None:
        value = _quad_folded_normal_mean(mu, s)
    assert out.item() == pytest.approx(value, rel=1e-10, abs=1e-300)
    assert float(mu_t.grad) == pytest.approx(d_mu, rel=1e-10, abs=1e-300)
    assert float(s_t.grad) == pytest.approx(d_s, rel=1e-10, abs=1e-300)


def test_folded_normal_mean_second_derivatives():
    """The module promises differentiability in every argument; second derivatives (Newton steps,
    torch.func.hessian, gradient penalties) must be right too, not silently zero:
    ∂²E|z|/∂μ² = 2φ(r)/s,  ∂²/∂μ∂s = -r 2φ(r)/s,  ∂²/∂s² = r² 2φ(r)/s,  r = μ/s."""
    mu = torch.tensor([0.3, -1.1], dtype=F64, requires_grad=True)
    s = torch.tensor([0.7, 0.5], dtype=F64, requires_grad=True)
    hessian = torch.autograd.functional.hessian(lambda m, t: closed_forms.folded_normal_mean(m, t).sum(), (mu, s))
    (d_mu_mu, d_mu_s), (d_s_mu, d_s_s) = ((torch.diagonal(block) for block in row) for row in hessian)
    r = (mu / s).detach()
    two_phi_over_s = 2 * torch.exp(Normal(0.0, 1.0).log_prob(r)) / s.detach()
    torch.testing.assert_close(d_mu_mu, two_phi_over_s, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d_mu_s, -r * two_phi_over_s, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d_s_mu, -r * two_phi_over_s, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d_s_s, r**2 * two_phi_over_s, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# expected log-likelihood
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def likelihood_problem():
    N, D, H = 3, 4, 3
    x = _randn(N, D, seed=10)
    W = _randn(D, H, seed=11)
    mean = _randn(N, H, seed=12)
    L = _random_scale_tril(N, H, seed=13)
    sigma2 = torch.tensor(0.7, dtype=F64)
    return x, W, mean, L, sigma2


def test_expected_log_likelihood_matches_monte_carlo(likelihood_problem):
    x, W, mean, L, sigma2 = likelihood_problem
    K = 100_000
    z = MultivariateNormal(mean, scale_tril=L).sample((K,))  # (K,N,H), seeded by the autouse fixture
    log_lik = Normal(z @ W.T, sigma2.sqrt()).log_prob(x).sum(-1)  # (K,N)
    estimate, se = _mc_mean_and_se(log_lik)
    Sigma = L @ L.transpose(-1, -2)
    trace = torch.einsum("ij,nji->n", W.T @ W, Sigma)
    exact = closed_forms.expected_log_likelihood(x, W, mean, trace, sigma2)
    _assert_within_standard_errors(estimate, se, exact)
    # the test discriminates: dropping the trace term would be far outside the tolerance
    assert torch.all(trace / (2 * sigma2) > 20 * se)


def test_expected_log_likelihood_matches_dense_expansion(likelihood_problem):
    """E||x - Wz||² = xᵀx - 2 xᵀWμ + tr(WᵀW (Σ + μμᵀ)) with dense matrices."""
    x, W, mean, L, sigma2 = likelihood_problem
    N, D = x.shape
    Sigma = L @ L.transpose(-1, -2)
    gram = W.T @ W
    trace = torch.stack([torch.trace(gram @ Sigma[n]) for n in range(N)])
    second_moment = Sigma + mean.unsqueeze(-1) * mean.unsqueeze(-2)  # (N,H,H)
    energy = torch.stack([x[n] @ x[n] - 2 * x[n] @ W @ mean[n] + torch.trace(gram @ second_moment[n]) for n in range(N)])
    reference = -0.5 * D * torch.log(2 * math.pi * sigma2) - energy / (2 * sigma2)
    value = closed_forms.expected_log_likelihood(x, W, mean, trace, sigma2)
    torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(closed_forms.residual_energy(x, W, mean, trace), energy, rtol=1e-12, atol=1e-12)


def test_residual_sums_from_sufficient_statistics_and_from_projections_equal_the_dense_per_point_sum(likelihood_problem):
    """Σ_n E||x_n - W z||² three ways for a dictionary the sums were not computed with: per point with dense
    matrices (the reference), from (Σ||x||², Σ x μᵀ, Σ (μμᵀ + Σ)) and from the projections b = Wᵀx."""
    x, W_sums, mean, L, _ = likelihood_problem
    W = W_sums + 0.3 * _randn(*W_sums.shape, seed=14)
    N = x.shape[0]
    Sigma = L @ L.transpose(-1, -2)
    reference = sum(float(((x[n] - W @ mean[n]) ** 2).sum() + torch.trace(W @ Sigma[n] @ W.T)) for n in range(N))
    x_energy, second_moment = x.pow(2).sum(), mean.T @ mean + Sigma.sum(0)
    from_sums = closed_forms.expected_residual_from_sums(x_energy, x.T @ mean, second_moment, W)
    from_projections = closed_forms.expected_residual_from_projections(x_energy, x @ W, mean, W.T @ W, Sigma)
    assert float(from_sums) == pytest.approx(reference, rel=1e-12)
    assert float(from_projections) == pytest.approx(reference, rel=1e-12)


def test_the_closed_form_dictionary_zeroes_the_dictionary_gradient_which_is_autograd_of_the_likelihood(likelihood_problem):
    """∂/∂W Σ_n E_q[log p(x_n|z)] = (C - W S)/σ² against autograd of the expected log-likelihood (W free), and
    W* = C S⁻¹ is where it vanishes and the expected log-likelihood is largest."""
    x, W0, mean, L, sigma2 = likelihood_problem
    x, mean, L = x.repeat(3, 1), mean.repeat(3, 1) + _randn(9, 3, seed=15), L.repeat(3, 1, 1)  # S of full rank
    Sigma = L @ L.transpose(-1, -2)
    cross, second_moment = x.T @ mean, mean.T @ mean + Sigma.sum(0)

    def expected_log_likelihood(W):
        trace = torch.einsum("ij,nji->n", W.T @ W, Sigma)
        return closed_forms.expected_log_likelihood(x, W, mean, trace, sigma2).sum()

    W = (W0 + 0.1).requires_grad_(True)
    (autograd,) = torch.autograd.grad(expected_log_likelihood(W), W)
    torch.testing.assert_close(
        closed_forms.dictionary_gradient(cross, second_moment, W.detach(), sigma2), autograd, rtol=1e-10, atol=1e-12
    )
    W_star = closed_forms.optimal_dictionary(cross, second_moment)
    torch.testing.assert_close(
        closed_forms.dictionary_gradient(cross, second_moment, W_star, sigma2), torch.zeros_like(W_star), rtol=0, atol=1e-10
    )
    best = float(expected_log_likelihood(W_star))
    for seed in range(5):
        assert float(expected_log_likelihood(W_star + 1e-3 * _randn(*W_star.shape, seed=seed))) < best


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.7, 6.0)], ids=["unit", "annealed"])
def test_code_and_variance_gradients_are_autograd_of_the_weighted_elbo_of_a_diagonal_posterior(weights):
    """``code_gradient`` and ``variance_gradient`` against autograd of β_lik E_q[log p(x|z)] + β_prior E_q[log p(z)]
    (closed forms of §2) with respect to μ and s² of a diagonal q, at fixed σ², λ."""
    from sparse_elbo.priors import LaplacePrior

    likelihood_weight, prior_weight = weights
    N, D, H = 6, 5, 4
    x, W = _randn(N, D, seed=30), _randn(D, H, seed=31)
    mean = (2.0 * _randn(N, H, seed=32)).requires_grad_(True)
    variance = (0.05 + torch.rand(N, H, dtype=F64, generator=_gen(33))).requires_grad_(True)
    sigma2, lam = torch.tensor(0.4, dtype=F64), 0.5 + torch.rand(H, dtype=F64, generator=_gen(34))
    prior = LaplacePrior()
    value = (
        likelihood_weight * closed_forms.expected_log_likelihood(x, W, mean, variance @ torch.diagonal(W.T @ W), sigma2)
        + prior_weight * prior.expected_log_prob(mean, variance, lam)
    ).sum()
    grad_mean, grad_variance = torch.autograd.grad(value, (mean, variance))
    _, prior_gradient, prior_curvature = prior.statistic_and_derivatives(mean.detach(), variance.detach().sqrt())
    code_residual = (x - mean.detach() @ W.T) @ W
    torch.testing.assert_close(
        closed_forms.code_gradient(code_residual, sigma2, prior_gradient, lam, likelihood_weight, prior_weight),
        grad_mean,
        rtol=1e-10,
        atol=1e-12,
    )
    torch.testing.assert_close(
        closed_forms.variance_gradient(torch.diagonal(W.T @ W), sigma2, prior_curvature, lam, likelihood_weight, prior_weight),
        grad_variance,
        rtol=1e-10,
        atol=1e-12,
    )


# --------------------------------------------------------------------------------------------------
# expected log priors
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def prior_problem():
    N, H = 3, 4
    mean = _randn(N, H, seed=20) * 1.5
    std = torch.rand(N, H, dtype=F64, generator=_gen(21)) * 1.5 + 0.1
    lam = torch.rand(H, dtype=F64, generator=_gen(22)) * 2 + 0.3
    return mean, std, lam


def test_expected_log_laplace_prior_matches_monte_carlo(prior_problem):
    mean, std, lam = prior_problem
    K = 100_000
    z = Normal(mean, std).sample((K,))  # (K,N,H)
    log_prior = Laplace(torch.zeros_like(lam), lam).log_prob(z).sum(-1)  # (K,N)
    estimate, se = _mc_mean_and_se(log_prior)
    exact = closed_forms.expected_log_laplace_prior(closed_forms.folded_normal_mean(mean, std), lam)
    _assert_within_standard_errors(estimate, se, exact)
    # discriminates E|z| from |E z|
    wrong = closed_forms.expected_log_laplace_prior(mean.abs(), lam)
    assert torch.all((wrong - exact).abs() > 20 * se)


def test_expected_log_laplace_prior_matches_quadrature(prior_problem):
    mean, std, lam = prior_problem
    N, H = mean.shape
    reference = torch.zeros(N, dtype=F64)
    for n in range(N):
        for h in range(H):
            mu, s, b = float(mean[n, h]), float(std[n, h]), float(lam[h])

            def integrand(z):
                return stats.laplace.logpdf(z, scale=b) * stats.norm.pdf(z, loc=mu, scale=s)

            lo, hi = mu - 40 * s, mu + 40 * s
            points = sorted({lo, hi, mu} | ({0.0} if lo < 0 < hi else set()))
            reference[n] += sum(
                integrate.quad(integrand, a, c, epsabs=0.0, epsrel=1e-12, limit=200)[0] for a, c in zip(points[:-1], points[1:])
            )
    value = closed_forms.expected_log_laplace_prior(closed_forms.folded_normal_mean(mean, std), lam)
    torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["laplace", "gaussian"])
def test_prior_cross_entropy_matches_monte_carlo_and_is_the_entropy_at_the_optimal_scale(prior_problem, name):
    """``-mean_n E_qn[log p(z; λ)]`` from the mean statistic alone, against samples of every q_n scored by
    torch.distributions; at λ = t̄ (= λ*) it equals the prior's entropy."""
    from sparse_elbo.priors import GaussianPrior, LaplacePrior

    prior = {"laplace": LaplacePrior(), "gaussian": GaussianPrior()}[name]
    mean, std, lam = prior_problem
    z = Normal(mean, std).sample((100_000,))  # (K,N,H)
    reference = Laplace(torch.zeros_like(lam), lam) if name == "laplace" else Normal(torch.zeros_like(lam), lam.sqrt())
    estimate, se = _mc_mean_and_se(-reference.log_prob(z).sum(-1).mean(-1))  # (K,) -> mean over n, then samples
    statistic = prior.statistic(mean, std**2).mean(0)  # t̄ (H,)
    _assert_within_standard_errors(estimate, se, prior.cross_entropy(statistic, lam))
    torch.testing.assert_close(prior.cross_entropy(statistic, statistic), prior.entropy(statistic), rtol=1e-12, atol=1e-12)


def test_expected_log_gaussian_prior_matches_monte_carlo(prior_problem):
    mean, std, lam = prior_problem  # lam is the prior variance here
    K = 100_000
    z = Normal(mean, std).sample((K,))
    log_prior = Normal(torch.zeros_like(lam), lam.sqrt()).log_prob(z).sum(-1)
    estimate, se = _mc_mean_and_se(log_prior)
    exact = closed_forms.expected_log_gaussian_prior(mean, std**2, lam)
    _assert_within_standard_errors(estimate, se, exact)


# --------------------------------------------------------------------------------------------------
# Gaussian posterior batches
# --------------------------------------------------------------------------------------------------

N_Q, H_Q, R_Q = 3, 4, 2


def _diag_gaussian(with_log: bool):
    mean = _randn(N_Q, H_Q, seed=30)
    log_std = _randn(N_Q, H_Q, seed=31) * 0.5
    return DiagonalGaussian(mean, log_std.exp(), log_std if with_log else None)


def _full_gaussian(with_log: bool, negative_diagonal: bool = False):
    mean = _randn(N_Q, H_Q, seed=32)
    L = _random_scale_tril(N_Q, H_Q, seed=33)
    log_diag = torch.log(torch.diagonal(L, dim1=-2, dim2=-1))
    if negative_diagonal:  # L and L·diag(±1) give the same Σ; the entropy uses |L_hh|
        L = L * torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=F64)
    return FullGaussian(mean, L, log_diag if with_log else None)


def _low_rank_gaussian():
    mean = _randn(N_Q, H_Q, seed=34)
    factor = _randn(N_Q, H_Q, R_Q, seed=35) * 0.7
    diag_std = torch.rand(N_Q, H_Q, dtype=F64, generator=_gen(36)) * 0.5 + 0.2
    return LowRankGaussian(mean, factor, diag_std)


def _dense_covariance(q) -> torch.Tensor:
    """Σ (N,H,H) built independently of the class's own methods."""
    if isinstance(q, DiagonalGaussian):
        return torch.diag_embed(q.std**2)
    if isinstance(q, FullGaussian):
        return q.scale_tril @ q.scale_tril.transpose(-1, -2)
    return q.factor @ q.factor.transpose(-1, -2) + torch.diag_embed(q.diag_std**2)


GAUSSIANS = {
    "diag": lambda: _diag_gaussian(False),
    "diag_log_std": lambda: _diag_gaussian(True),
    "full": lambda: _full_gaussian(False),
    "full_log_diag": lambda: _full_gaussian(True),
    "full_negative_diagonal": lambda: _full_gaussian(False, negative_diagonal=True),
    "low_rank": _low_rank_gaussian,
}


@pytest.mark.parametrize("name", GAUSSIANS)
def test_gaussian_entropy_matches_torch_distributions(name):
    q = GAUSSIANS[name]()
    reference = MultivariateNormal(q.mean, covariance_matrix=_dense_covariance(q)).entropy()
    torch.testing.assert_close(q.entropy(), reference, rtol=1e-12, atol=1e-12)
    assert q.entropy().shape == (N_Q,)


def test_low_rank_entropy_matches_low_rank_mvn():
    q = _low_rank_gaussian()
    reference = LowRankMultivariateNormal(q.mean, q.factor, q.diag_std**2).entropy()
    torch.testing.assert_close(q.entropy(), reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", GAUSSIANS)
def test_gaussian_trace_term_and_variance_match_dense(name):
    q = GAUSSIANS[name]()
    W = _randn(5, H_Q, seed=37)
    gram = W.T @ W
    Sigma = _dense_covariance(q)
    trace_reference = torch.stack([torch.trace(gram @ Sigma[n]) for n in range(N_Q)])
    torch.testing.assert_close(q.trace_term(gram), trace_reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q.variance, torch.diagonal(Sigma, dim1=-2, dim2=-1), rtol=1e-12, atol=1e-14)
    # the gram has off-diagonal mass: full and low-rank covariances must use it
    if name.startswith(("full", "low_rank")):
        diag_only = torch.stack([torch.trace(torch.diag(torch.diagonal(gram)) @ Sigma[n]) for n in range(N_Q)])
        assert not torch.allclose(q.trace_term(gram), diag_only)


@pytest.mark.parametrize("name", ["diag", "full", "low_rank"])
def test_gaussian_rsample_moments_match_parameters(name):
    q = GAUSSIANS[name]()
    K = 40_000
    z = q.rsample(K, generator=_gen(38))
    assert z.shape == (K, N_Q, H_Q) and z.dtype == F64
    mean_hat, mean_se = _mc_mean_and_se(z)
    _assert_within_standard_errors(mean_hat, mean_se, q.mean)
    centred = z - q.mean  # exact mean known: E[(z-μ)(z-μ)ᵀ] = Σ, unbiased per element
    products = centred.unsqueeze(-1) * centred.unsqueeze(-2)  # (K,N,H,H)
    cov_hat, cov_se = _mc_mean_and_se(products)
    _assert_within_standard_errors(cov_hat, cov_se, _dense_covariance(q))  # incl. zero off-diagonals of diag
    # reproducible with a seeded generator, different with another seed
    torch.testing.assert_close(q.rsample(5, generator=_gen(7)), q.rsample(5, generator=_gen(7)), rtol=0, atol=0)
    assert not torch.equal(q.rsample(5, generator=_gen(7)), q.rsample(5, generator=_gen(8)))


# --------------------------------------------------------------------------------------------------
# prior / noise entropies and the optimal scales
# --------------------------------------------------------------------------------------------------


def test_laplace_entropy_matches_torch_distributions():
    lam = torch.tensor([0.05, 0.3, 1.0, 4.0], dtype=F64)
    reference = Laplace(torch.zeros_like(lam), lam).entropy().sum()
    torch.testing.assert_close(closed_forms.laplace_entropy(lam), reference, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("sigma2", [1e-4, 0.3, 2.5])
def test_gaussian_noise_entropy_matches_torch_distributions(sigma2):
    D = 7
    s2 = torch.tensor(sigma2, dtype=F64)
    reference = Normal(torch.zeros((), dtype=F64), s2.sqrt()).entropy() * D
    torch.testing.assert_close(closed_forms.gaussian_noise_entropy(s2, D), reference, rtol=1e-14, atol=1e-14)


@pytest.fixture
def elbo_problem():
    N, D, H = 6, 5, 3
    x = _randn(N, D, seed=40)
    W = _randn(D, H, seed=41)
    mean = _randn(N, H, seed=42)
    L = _random_scale_tril(N, H, seed=43)
    return x, W, mean, L


def _analytic_elbo(x, W, mean, L, lam, sigma2):
    """(1/N) Σ_n E[log p(x|z)] + E[log p(z)] + H[q] assembled from the closed forms."""
    q = FullGaussian(mean, L)
    trace = q.trace_term(W.T @ W)
    expected_abs = closed_forms.folded_normal_mean(mean, q.variance.sqrt())
    log_lik = closed_forms.expected_log_likelihood(x, W, mean, trace, sigma2)
    log_prior = closed_forms.expected_log_laplace_prior(expected_abs, lam)
    return (log_lik + log_prior + q.entropy()).mean()


def _optimal_scales(x, W, mean, L):
    q = FullGaussian(mean, L)
    trace = q.trace_term(W.T @ W)
    N, D = x.shape
    lam = closed_forms.optimal_lambda(closed_forms.folded_normal_mean(mean, q.variance.sqrt()).sum(0), N)
    sigma2 = closed_forms.optimal_sigma2(closed_forms.residual_energy(x, W, mean, trace).sum(), D, N)
    return lam, sigma2


def test_optimal_lambda_and_sigma2_are_stationary_points(elbo_problem):
    x, W, mean, L = elbo_problem
    lam, sigma2 = (t.detach().requires_grad_(True) for t in _optimal_scales(x, W, mean, L))
    assert lam.shape == (W.shape[1],) and sigma2.shape == ()
    grad_lam, grad_sigma2 = torch.autograd.grad(_analytic_elbo(x, W, mean, L, lam, sigma2), (lam, sigma2))
    torch.testing.assert_close(grad_lam, torch.zeros_like(grad_lam), rtol=0, atol=1e-10)
    torch.testing.assert_close(grad_sigma2, torch.zeros_like(grad_sigma2), rtol=0, atol=1e-10)
    # and not stationary elsewhere (the check can fail)
    grad_elsewhere = torch.autograd.grad(_analytic_elbo(x, W, mean, L, lam * 1.2, sigma2 * 0.8), (lam, sigma2))
    assert all(g.abs().max() > 1e-3 for g in grad_elsewhere)


def test_optimal_lambda_and_sigma2_are_maxima(elbo_problem):
    x, W, mean, L = elbo_problem
    lam, sigma2 = _optimal_scales(x, W, mean, L)
    best = _analytic_elbo(x, W, mean, L, lam, sigma2)
    g = _gen(44)
    for _ in range(30):
        log_factor_lam = torch.randn(lam.shape, dtype=F64, generator=g) * 0.2
        log_factor_sigma2 = torch.randn((), dtype=F64, generator=g) * 0.2
        other = _analytic_elbo(x, W, mean, L, lam * log_factor_lam.exp(), sigma2 * log_factor_sigma2.exp())
        assert other < best
    for h in range(lam.shape[0]):  # one coordinate at a time, both directions
        for factor in (0.99, 1.01):
            bumped = lam.clone()
            bumped[h] *= factor
            assert _analytic_elbo(x, W, mean, L, bumped, sigma2) < best
    for factor in (0.99, 1.01):
        assert _analytic_elbo(x, W, mean, L, lam, sigma2 * factor) < best


def test_optimal_scales_match_direct_formulas(elbo_problem):
    x, W, mean, L = elbo_problem
    N, D = x.shape
    lam, sigma2 = _optimal_scales(x, W, mean, L)
    Sigma = L @ L.transpose(-1, -2)
    s = torch.diagonal(Sigma, dim1=-2, dim2=-1).sqrt()
    expected_abs = torch.tensor(
        [[_quad_folded_normal_mean(float(mean[n, h]), float(s[n, h])) for h in range(W.shape[1])] for n in range(N)],
        dtype=F64,
    )
    torch.testing.assert_close(lam, expected_abs.mean(0), rtol=1e-10, atol=0)
    energy = sum(float(((x[n] - W @ mean[n]) ** 2).sum() + torch.trace(W @ Sigma[n] @ W.T)) for n in range(N))
    assert float(sigma2) == pytest.approx(energy / (N * D), rel=1e-12)


def test_log_likelihood_of_samples_matches_torch_distributions():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    W = torch.randn(4, 3, generator=g, dtype=torch.float64)
    z = torch.randn(5, 7, 3, generator=g, dtype=torch.float64)
    sigma2 = torch.tensor(0.3, dtype=torch.float64)
    reference = torch.distributions.Normal(z @ W.T, sigma2.sqrt()).log_prob(x).sum(-1)  # (K,N)
    torch.testing.assert_close(closed_forms.log_likelihood(x, W, z, sigma2), reference, rtol=1e-12, atol=1e-12)
