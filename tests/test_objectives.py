"""The three objectives of docs/design.md §3 in float64: analytic vs Monte Carlo per term, the entropy identity
(value, maximum, stationarity, envelope theorem), gradchecks, latent permutation / sign invariance,
annealing weights and data statistics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from sparse_elbo import closed_forms
from sparse_elbo.annealing import AnnealingWeights
from sparse_elbo.model import SparseCodingModel
from sparse_elbo.objectives import AnalyticELBO, DataStatistics, EntropyELBO, SampledELBO
from sparse_elbo.posteriors import DiagonalPosterior, FullCovariancePosterior
from sparse_elbo.priors import GaussianPrior, LaplacePrior

F64 = torch.float64
Z_MAX = 5.0
FAMILIES = {"diag": DiagonalPosterior, "full": FullCovariancePosterior}
PRIORS = {"laplace": LaplacePrior, "gaussian": GaussianPrior}


def _num(value) -> float:
    """Python float of a (possibly graph-attached) scalar tensor."""
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_problem(family="diag", prior="laplace", N=5, D=4, H=3, seed=0):
    """Random float64 data, unit-norm-gauge model and posterior (all parameters randomised)."""
    g = _gen(seed)
    model = SparseCodingModel(D, H, prior=PRIORS[prior](), gauge="unit_norm", generator=g).double()
    posterior = FAMILIES[family](N, H).double()
    with torch.no_grad():
        model.W_raw.copy_(torch.randn(D, H, dtype=F64, generator=g))
        model.log_sigma2.fill_(math.log(0.4) + 0.3 * _num(torch.randn((), dtype=F64, generator=g)))
        model.log_lambda.copy_(0.4 * torch.randn(H, dtype=F64, generator=g))
        posterior.mean.copy_(torch.randn(N, H, dtype=F64, generator=g))
        if family == "diag":
            posterior.log_std.copy_(math.log(0.5) + 0.4 * torch.randn(N, H, dtype=F64, generator=g))
        else:
            posterior.lower.copy_(0.4 * torch.randn(posterior.lower.shape, dtype=F64, generator=g))
            posterior.log_diag.copy_(math.log(0.5) + 0.4 * torch.randn(N, H, dtype=F64, generator=g))
    z = torch.randn(N, H, dtype=F64, generator=g)
    x = z @ model.W.detach().T + 0.5 * torch.randn(N, D, dtype=F64, generator=g)
    for p in list(model.parameters()) + list(posterior.parameters()):
        assert p.dtype == F64
    return x, model, posterior


def _posterior_parameters(posterior):
    return dict(posterior.named_parameters())


def _set_optimum(x, model, posterior):
    """Put σ²*, λ* (from EntropyELBO) into the model; returns the entropy objective's value."""
    value = EntropyELBO()(x, posterior(), model)
    model.set_noise_and_prior_scale(value.sigma2.detach(), value.lam.detach())
    return value


# --------------------------------------------------------------------------------------------------
# analytic vs Monte Carlo
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_elbo_terms_agree_with_analytic_within_standard_errors(family, prior):
    x, model, posterior = make_problem(family, prior, seed=1)
    q = posterior()
    with torch.no_grad():
        exact = AnalyticELBO()(x, q, model)
        replicates = [SampledELBO(n_samples=2_000)(x, q, model, generator=_gen(100 + r)) for r in range(48)]

    def mean_and_se(values):
        stacked = torch.stack(values)
        return stacked.mean(0), stacked.std(0) / math.sqrt(len(values))

    for name in ("expected_log_likelihood", "expected_log_prior"):
        estimate, se = mean_and_se([v.terms[name] for v in replicates])
        assert se > 0
        z = abs(_num(estimate - exact.terms[name])) / _num(se)
        assert z < Z_MAX, f"{name}: MC {_num(estimate)} ± {_num(se)} vs analytic {_num(exact.terms[name])}"
        assert _num(se) < 1e-2 * max(1.0, abs(_num(exact.terms[name])))  # the comparison is sharp
    # the entropy term is exact in both
    torch.testing.assert_close(
        torch.stack([v.terms["posterior_entropy"] for v in replicates]),
        exact.terms["posterior_entropy"].expand(len(replicates)),
        rtol=1e-14,
        atol=1e-14,
    )
    # per data point and the ELBO itself
    estimate, se = mean_and_se([v.per_point for v in replicates])
    assert torch.all((estimate - exact.per_point).abs() < Z_MAX * se)
    estimate, se = mean_and_se([v.elbo for v in replicates])
    assert abs(_num(estimate - exact.elbo)) < Z_MAX * _num(se)
    # the analytic and sampled objectives report the same σ², λ
    torch.testing.assert_close(replicates[0].sigma2, exact.sigma2)
    torch.testing.assert_close(replicates[0].lam, exact.lam)


def test_sampled_elbo_is_reproducible_with_a_generator_and_noisy_across_seeds():
    x, model, posterior = make_problem("full", seed=2)
    objective = SampledELBO(n_samples=3)
    with torch.no_grad():
        a = objective(x, posterior(), model, generator=_gen(5)).elbo
        b = objective(x, posterior(), model, generator=_gen(5)).elbo
        c = objective(x, posterior(), model, generator=_gen(6)).elbo
    assert _num(a) == _num(b) and _num(a) != _num(c)


def test_sampled_elbo_rejects_zero_samples():
    with pytest.raises(ValueError, match="n_samples"):
        SampledELBO(n_samples=0)


# --------------------------------------------------------------------------------------------------
# the entropy identity (docs/design.md §3)
# --------------------------------------------------------------------------------------------------

IDENTITY_CASES = [("diag", "laplace"), ("full", "laplace"), ("diag", "gaussian"), ("full", "gaussian")]


@pytest.mark.parametrize("family, prior", IDENTITY_CASES)
def test_entropy_elbo_optima_are_the_closed_form_scales(family, prior):
    x, model, posterior = make_problem(family, prior, seed=3)
    q = posterior()
    value = EntropyELBO()(x, q, model)
    W = model.W
    trace = q.trace_term(W.T @ W)
    N, D = x.shape
    sigma2 = closed_forms.optimal_sigma2(closed_forms.residual_energy(x, W, q.mean, trace).sum(), D, N)
    if prior == "laplace":
        lam = closed_forms.optimal_lambda(closed_forms.folded_normal_mean(q.mean, q.variance.sqrt()).sum(0), N)
    else:  # Gaussian prior with variance λ: λ* = mean_n E z_h² = mean_n (μ² + s²)
        lam = (q.mean**2 + q.variance).mean(0)
    torch.testing.assert_close(value.sigma2, sigma2, rtol=1e-13, atol=0)
    torch.testing.assert_close(value.lam, lam, rtol=1e-13, atol=0)


@pytest.mark.parametrize("family, prior", IDENTITY_CASES)
def test_entropy_elbo_equals_analytic_elbo_at_the_optimal_scales(family, prior):
    x, model, posterior = make_problem(family, prior, seed=4)
    before = AnalyticELBO()(x, posterior(), model).elbo.detach()
    entropy_value = _set_optimum(x, model, posterior)
    analytic = AnalyticELBO()(x, posterior(), model)
    assert abs(_num(analytic.elbo - entropy_value.elbo)) < 1e-10
    assert _num(before) < _num(entropy_value.elbo) - 1e-3  # the random start was not already optimal
    # term by term: E log p(x|z) = -likelihood entropy, E log p(z) = -prior entropy, same H[q]
    t_a, t_e = analytic.terms, entropy_value.terms
    assert abs(_num(t_a["expected_log_likelihood"] + t_e["likelihood_entropy"])) < 1e-10
    assert abs(_num(t_a["expected_log_prior"] + t_e["prior_entropy"])) < 1e-10
    assert abs(_num(t_a["posterior_entropy"] - t_e["posterior_entropy"])) < 1e-12


@pytest.mark.parametrize("family, prior", IDENTITY_CASES)
def test_entropy_elbo_is_the_maximum_over_noise_and_prior_scale(family, prior):
    x, model, posterior = make_problem(family, prior, seed=5)
    best = _set_optimum(x, model, posterior).elbo.detach()
    log_sigma2, log_lambda = model.log_sigma2.detach().clone(), model.log_lambda.detach().clone()
    g = _gen(6)
    with torch.no_grad():
        for scale in (1e-3, 0.1, 0.5):
            for _ in range(8):
                model.log_sigma2.copy_(log_sigma2 + scale * torch.randn((), dtype=F64, generator=g))
                model.log_lambda.copy_(log_lambda + scale * torch.randn(log_lambda.shape, dtype=F64, generator=g))
                assert _num(AnalyticELBO()(x, posterior(), model).elbo) < _num(best)


@pytest.mark.parametrize("family, prior", IDENTITY_CASES)
def test_analytic_elbo_is_stationary_in_noise_and_prior_scale_at_the_optimum(family, prior):
    x, model, posterior = make_problem(family, prior, seed=7)
    _set_optimum(x, model, posterior)
    elbo = AnalyticELBO()(x, posterior(), model).elbo
    g_sigma2, g_lambda = torch.autograd.grad(elbo, (model.log_sigma2, model.log_lambda))
    torch.testing.assert_close(g_sigma2, torch.zeros_like(g_sigma2), rtol=0, atol=1e-10)
    torch.testing.assert_close(g_lambda, torch.zeros_like(g_lambda), rtol=0, atol=1e-10)
    # away from the optimum the gradients are not zero
    with torch.no_grad():
        model.log_sigma2.add_(0.2)
        model.log_lambda.sub_(0.2)
    elbo = AnalyticELBO()(x, posterior(), model).elbo
    g_sigma2, g_lambda = torch.autograd.grad(elbo, (model.log_sigma2, model.log_lambda))
    assert abs(_num(g_sigma2)) > 1e-3 and _num(g_lambda.abs().min()) > 1e-3


@pytest.mark.parametrize("family, prior", IDENTITY_CASES)
def test_envelope_theorem_entropy_gradients_equal_analytic_gradients(family, prior):
    x, model, posterior = make_problem(family, prior, seed=8)
    _set_optimum(x, model, posterior)
    params = {"W_raw": model.W_raw, **_posterior_parameters(posterior)}
    names = list(params)
    g_entropy = torch.autograd.grad(EntropyELBO()(x, posterior(), model).elbo, [params[n] for n in names])
    g_analytic = torch.autograd.grad(AnalyticELBO()(x, posterior(), model).elbo, [params[n] for n in names])
    for name, ge, ga in zip(names, g_entropy, g_analytic):
        assert _num(ga.abs().max()) > 1e-4, f"{name}: vanishing gradient makes the check vacuous"
        torch.testing.assert_close(ge, ga, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")
    # the identity needs the optimum: with σ² held off it the W gradients differ
    with torch.no_grad():
        model.log_sigma2.add_(0.3)
    g_off = torch.autograd.grad(AnalyticELBO()(x, posterior(), model).elbo, model.W_raw)[0]
    assert not torch.allclose(g_off, g_entropy[0], rtol=1e-6, atol=1e-6)


def test_entropy_elbo_does_not_depend_on_the_model_noise_and_prior_scale():
    x, model, posterior = make_problem("full", seed=9)
    a = EntropyELBO()(x, posterior(), model).elbo.detach()
    with torch.no_grad():
        model.log_sigma2.add_(1.0)
        model.log_lambda.mul_(-2.0)
    assert _num(EntropyELBO()(x, posterior(), model).elbo) == _num(a)


# --------------------------------------------------------------------------------------------------
# gradcheck of every objective × posterior family
# --------------------------------------------------------------------------------------------------


class _Wrapped(nn.Module):
    """objective(x, posterior(), model) as a module, so that functional_call can substitute parameters."""

    def __init__(self, objective, model, posterior, seed=None):
        super().__init__()
        self.objective, self.model, self.posterior, self.seed = objective, model, posterior, seed

    def forward(self, x):
        generator = None if self.seed is None else _gen(self.seed)  # re-seeded: deterministic function
        weights = AnnealingWeights(likelihood=1.5, prior=2.0, entropy=0.5)
        value = self.objective(x, self.posterior(), self.model, weights, generator=generator)
        return (value.elbo, value.weighted, *value.terms.values())


OBJECTIVES = {
    "analytic": lambda: AnalyticELBO(),
    "sampled": lambda: SampledELBO(n_samples=4),
    "entropy": lambda: EntropyELBO(),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objective_gradcheck(objective, family):
    x, model, posterior = make_problem(family, N=3, D=4, H=3, seed=10)
    wrapped = _Wrapped(OBJECTIVES[objective](), model, posterior, seed=11 if objective == "sampled" else None)
    params = {name: p.detach().clone().requires_grad_(True) for name, p in wrapped.named_parameters()}
    if objective == "entropy":  # L_H does not involve the model's σ², λ
        params = {k: v for k, v in params.items() if k not in ("model.log_sigma2", "model.log_lambda")}
    names = list(params)

    def function(*tensors):
        return functional_call(wrapped, dict(zip(names, tensors)), (x,))

    assert torch.autograd.gradcheck(function, tuple(params[n] for n in names), eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# invariance under latent permutation and sign flips
# --------------------------------------------------------------------------------------------------


def _dense_sigma(posterior) -> torch.Tensor:
    L = posterior.scale_tril()
    return L @ L.transpose(-1, -2)


@torch.no_grad()
def _transform_latents(model, posterior, perm: torch.Tensor, signs: torch.Tensor):
    """New latent h' = signs[h'] · old latent perm[h'] (for W, λ, μ and Σ consistently)."""
    if isinstance(posterior, FullCovariancePosterior):
        Sigma = _dense_sigma(posterior)
        transform = torch.diag(signs) @ torch.eye(len(perm), dtype=F64)[perm]  # T z_old = z_new
        new_Sigma = transform @ Sigma @ transform.T
        new_L = torch.linalg.cholesky(new_Sigma)  # positive diagonal by construction
        posterior.set_scale_tril(new_L)
        torch.testing.assert_close(_dense_sigma(posterior), new_Sigma, rtol=1e-12, atol=1e-12)
    else:
        posterior.log_std.copy_(posterior.log_std[:, perm])
    posterior.mean.copy_(posterior.mean[:, perm] * signs)
    model.W_raw.copy_(model.W_raw[:, perm] * signs)
    model.log_lambda.copy_(model.log_lambda[perm])


def _elbo_estimate(objective_name, x, model, posterior):
    """Exact value for the deterministic objectives; for the sampled one a mean over replicates with its SE."""
    with torch.no_grad():
        if objective_name != "sampled":
            return _num(OBJECTIVES[objective_name]()(x, posterior(), model).elbo), 0.0
        values = torch.stack(
            [SampledELBO(n_samples=1_000)(x, posterior(), model, generator=_gen(200 + r)).elbo for r in range(16)]
        )
        return _num(values.mean()), _num(values.std() / math.sqrt(len(values)))


@pytest.mark.parametrize("transformation", ["permutation", "sign_flip", "both"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objectives_are_invariant_to_latent_permutation_and_sign(objective, family, transformation):
    H = 4
    x, model, posterior = make_problem(family, N=4, D=5, H=H, seed=12)
    before, se_before = _elbo_estimate(objective, x, model, posterior)
    perm = torch.tensor([1, 2, 0, 3]) if transformation != "sign_flip" else torch.arange(H)
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=F64) if transformation != "permutation" else torch.ones(H, dtype=F64)
    lam_before = EntropyELBO()(x, posterior(), model).lam.detach()
    _transform_latents(model, posterior, perm, signs)
    after, se_after = _elbo_estimate(objective, x, model, posterior)
    if objective == "sampled":
        assert abs(after - before) < Z_MAX * math.hypot(se_before, se_after)
    else:
        assert after == pytest.approx(before, rel=1e-12, abs=1e-12)
    # λ* follows the latents
    torch.testing.assert_close(EntropyELBO()(x, posterior(), model).lam, lam_before[perm], rtol=1e-12, atol=0)


def test_invariance_check_is_sensitive_to_an_inconsistent_transformation():
    """Permuting W's columns without the posterior changes the ELBO (so the invariance test can fail)."""
    x, model, posterior = make_problem("full", N=4, D=5, H=4, seed=12)
    before = _num(AnalyticELBO()(x, posterior(), model).elbo)
    with torch.no_grad():
        model.W_raw.copy_(model.W_raw[:, [2, 0, 3, 1]])
    assert abs(_num(AnalyticELBO()(x, posterior(), model).elbo) - before) > 1e-3


@pytest.mark.parametrize("objective", ["analytic", "entropy"])
def test_unit_norm_gauge_ignores_positive_column_scaling_of_w_raw(objective):
    x, model, posterior = make_problem("full", seed=13)
    before = _num(OBJECTIVES[objective]()(x, posterior(), model).elbo)
    with torch.no_grad():
        model.W_raw.mul_(torch.tensor([0.1, 3.0, 7.0], dtype=F64))
    assert _num(OBJECTIVES[objective]()(x, posterior(), model).elbo) == pytest.approx(before, rel=1e-12)


# --------------------------------------------------------------------------------------------------
# annealing weights
# --------------------------------------------------------------------------------------------------


def _evaluate(objective_name, x, model, posterior, weights):
    generator = _gen(21) if objective_name == "sampled" else None  # same noise for every call
    return OBJECTIVES[objective_name]()(x, posterior(), model, weights, generator=generator)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_unit_weights_give_the_elbo_and_terms_sum_to_it(objective, family):
    x, model, posterior = make_problem(family, seed=14)
    value = _evaluate(objective, x, model, posterior, AnnealingWeights(1.0, 1.0, 1.0))
    assert _num(value.weighted) == pytest.approx(_num(value.elbo), rel=1e-14, abs=1e-14)
    t = value.terms
    if objective == "entropy":  # L_H = H[q] - H[prior] - H[likelihood]
        assert set(t) == {"posterior_entropy", "prior_entropy", "likelihood_entropy"}
        combined = t["posterior_entropy"] - t["prior_entropy"] - t["likelihood_entropy"]
    else:
        assert set(t) == {"expected_log_likelihood", "expected_log_prior", "posterior_entropy"}
        combined = sum(t.values())
    assert _num(combined) == pytest.approx(_num(value.elbo), rel=1e-14, abs=1e-14)
    assert value.elbo.shape == () and all(v.shape == () for v in t.values())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("term", ["likelihood", "prior", "entropy"])
def test_non_unit_weight_changes_weighted_but_never_the_elbo(objective, family, term):
    x, model, posterior = make_problem(family, seed=15)
    unit = _evaluate(objective, x, model, posterior, AnnealingWeights())
    weights = AnnealingWeights(**{term: 3.0})
    annealed = _evaluate(objective, x, model, posterior, weights)
    assert _num(annealed.elbo) == _num(unit.elbo)
    for name in unit.terms:
        assert _num(annealed.terms[name]) == _num(unit.terms[name])
    assert abs(_num(annealed.weighted - unit.weighted)) > 1e-6
    # the weighted value is the weighted combination of the terms
    t = annealed.terms
    if objective == "entropy":
        expected = (
            weights.entropy * t["posterior_entropy"]
            - weights.prior * t["prior_entropy"]
            - weights.likelihood * t["likelihood_entropy"]
        )
    else:
        expected = (
            weights.likelihood * t["expected_log_likelihood"]
            + weights.prior * t["expected_log_prior"]
            + weights.entropy * t["posterior_entropy"]
        )
    assert _num(annealed.weighted) == pytest.approx(_num(expected), rel=1e-13, abs=1e-13)


@pytest.mark.parametrize("family", FAMILIES)
def test_weighted_entropy_and_analytic_objectives_agree_at_the_optimum(family):
    """At (σ²*, λ*) each analytic term equals minus the matching entropy, so any weights agree."""
    x, model, posterior = make_problem(family, seed=16)
    _set_optimum(x, model, posterior)
    weights = AnnealingWeights(likelihood=0.7, prior=4.0, entropy=1.3)
    analytic = AnalyticELBO()(x, posterior(), model, weights)
    entropy = EntropyELBO()(x, posterior(), model, weights)
    assert _num(analytic.weighted) == pytest.approx(_num(entropy.weighted), rel=1e-11, abs=1e-11)


# --------------------------------------------------------------------------------------------------
# full-data statistics for the entropy objective
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("family", FAMILIES)
def test_entropy_elbo_with_full_data_statistics_equals_batch_value_on_full_data(family, prior):
    x, model, posterior = make_problem(family, prior, N=8, seed=17)
    objective = EntropyELBO()
    residual, prior_statistic = objective.batch_statistics(x, posterior(), model)
    assert residual.shape == (8,) and prior_statistic.shape == (8, 3)
    statistics = DataStatistics(residual.mean(), prior_statistic.mean(0))
    with_stats = objective(x, posterior(), model, statistics=statistics)
    batch = objective(x, posterior(), model)
    assert _num(with_stats.elbo) == pytest.approx(_num(batch.elbo), rel=1e-14, abs=1e-14)
    torch.testing.assert_close(with_stats.sigma2, batch.sigma2, rtol=1e-14, atol=0)
    torch.testing.assert_close(with_stats.lam, batch.lam, rtol=1e-14, atol=0)
    for name in batch.terms:
        assert _num(with_stats.terms[name]) == pytest.approx(_num(batch.terms[name]), rel=1e-14, abs=1e-14)


@pytest.mark.parametrize("family", FAMILIES)
def test_entropy_elbo_on_minibatches_with_full_data_statistics(family):
    """Minibatch values with full-data σ²*, λ* use the full-data prior/likelihood entropies and the batch's
    posterior entropy, so the mean over an equal-size partition is the full-data L_H exactly."""
    x, model, posterior = make_problem(family, N=8, seed=18)
    objective = EntropyELBO()
    full = objective(x, posterior(), model)
    residual, prior_statistic = objective.batch_statistics(x, posterior(), model)
    statistics = DataStatistics(residual.mean(), prior_statistic.mean(0))
    batches = [torch.tensor([0, 5, 2, 7]), torch.tensor([1, 3, 4, 6])]
    values = [objective(x[i], posterior(i), model, statistics=statistics) for i in batches]
    for value, index in zip(values, batches):
        torch.testing.assert_close(value.sigma2, full.sigma2, rtol=1e-14, atol=0)
        torch.testing.assert_close(value.lam, full.lam, rtol=1e-14, atol=0)
        expected_entropy = posterior().entropy()[index].mean()
        assert _num(value.terms["posterior_entropy"]) == pytest.approx(_num(expected_entropy), rel=1e-14)
    mean_value = sum(_num(v.elbo) for v in values) / len(values)
    assert mean_value == pytest.approx(_num(full.elbo), rel=1e-13, abs=1e-13)
    # the biased `batch` estimate differs from the exact full-data value
    batch_only = objective(x[batches[0]], posterior(batches[0]), model)
    assert abs(_num(batch_only.terms["likelihood_entropy"] - full.terms["likelihood_entropy"])) > 1e-6


@pytest.mark.parametrize(
    "weights", [AnnealingWeights(), AnnealingWeights(likelihood=0.7, prior=0.3, entropy=1.6)], ids=["unit", "annealed"]
)
@pytest.mark.parametrize("prior", sorted(PRIORS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_entropy_elbo_closed_form_gradient_equals_autograd(family, prior, weights):
    """The hand-written gradient of N·L_H,β (what the L-BFGS trainer uses) against autograd through the
    independent closed forms of ``EntropyELBO.__call__``, for every per-data-point parameter and W_raw."""
    N = 7
    x, model, posterior = make_problem(family, prior, N=N, D=5, H=4, seed=61)
    with torch.no_grad():
        model.W_raw.mul_(torch.linspace(0.5, 2.0, 4, dtype=F64))  # non-unit raw columns: the gauge chain matters
    objective = EntropyELBO()
    assert objective.has_closed_form_gradient(posterior)
    reference = objective(x, posterior(), model, weights)
    (N * reference.weighted).backward()
    value, gradients = objective.value_and_gradient(x, posterior, model, weights)
    torch.testing.assert_close(value.weighted, reference.weighted.detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(value.elbo, reference.elbo.detach(), rtol=1e-13, atol=1e-13)
    assert set(gradients) == {*posterior.parameters(), model.W_raw}
    for parameter, gradient in gradients.items():
        assert gradient.shape == parameter.shape
        torch.testing.assert_close(gradient, parameter.grad, rtol=1e-10, atol=1e-11)


def test_closed_form_gradient_check_is_sensitive_to_a_wrong_chain_rule(monkeypatch):
    """The comparison above fails when the covariance pullback is off (here: its gram gradient halved)."""
    x, model, posterior = make_problem("full", "laplace", N=6, D=5, H=4, seed=62)
    objective = EntropyELBO()
    (6 * objective(x, posterior(), model).weighted).backward()
    moments = FullCovariancePosterior.moments_with_pullback

    def halved_gram(self, gram):
        variance, trace, entropy, pullback = moments(self, gram)
        return variance, trace, entropy, lambda *g: (pullback(*g)[0], 0.5 * pullback(*g)[1])

    monkeypatch.setattr(FullCovariancePosterior, "moments_with_pullback", halved_gram)
    _, gradients = objective.value_and_gradient(x, posterior, model)
    assert not torch.allclose(gradients[model.W_raw], model.W_raw.grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gradients[posterior.mean], posterior.mean.grad, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_problem_loss_and_gradients_closed_form_and_autograd_agree(family):
    """``Problem.loss_and_gradients`` takes the closed form for the entropy ELBO and autograd for the analytic
    ELBO (which also learns sigma^2 and lambda); both set the same gradients as a plain backward pass."""
    from sparse_elbo.annealing import NoAnnealing
    from sparse_elbo.problem import Problem

    for objective in (EntropyELBO(), AnalyticELBO()):
        x, model, posterior = make_problem(family, "laplace", N=6, D=5, H=4, seed=63)
        problem = Problem(x=x, model=model, posterior=posterior, objective=objective, annealing=NoAnnealing())
        loss = problem.loss_and_gradients(AnnealingWeights())
        got = {
            name: p.grad.clone() for name, p in [*model.named_parameters(), *posterior.named_parameters()] if p.grad is not None
        }
        for p in [*model.parameters(), *posterior.parameters()]:
            p.grad = None
        reference = -6 * objective(x, posterior(), model).weighted
        reference.backward()
        torch.testing.assert_close(loss, reference.detach(), rtol=1e-13, atol=1e-12)
        for name, p in [*model.named_parameters(), *posterior.named_parameters()]:
            if name in got:
                torch.testing.assert_close(got[name], p.grad, rtol=1e-10, atol=1e-11)
        assert {"W_raw", "mean"} <= set(got)
        assert ("log_sigma2" in got) == objective.learns_noise_and_prior_scale


@pytest.mark.parametrize("gauge", ["unit_norm", "unit_lambda"])
def test_model_raw_gradient_is_the_chain_rule_of_the_gauge(gauge):
    model = SparseCodingModel(5, 3, gauge=gauge, generator=_gen(64)).double()
    with torch.no_grad():
        model.W_raw.mul_(torch.tensor([0.3, 1.0, 2.5], dtype=F64))
    grad_W = torch.randn(5, 3, dtype=F64, generator=_gen(65))
    (reference,) = torch.autograd.grad(model.W, model.W_raw, grad_W)
    torch.testing.assert_close(model.raw_gradient(grad_W), reference, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_posterior_moments_and_pullback_match_autograd(family):
    """``moments_with_pullback`` against the Gaussians' own variance, trace term and entropy, differentiated
    by autograd, for random output weights (one weight on tr(G Σ_n) shared by every point)."""
    N, H = 6, 4
    _, _, posterior = make_problem(family, "laplace", N=N, D=5, H=H, seed=66)
    g = _gen(67)
    A = torch.randn(H, H, dtype=F64, generator=g)
    gram = (A @ A.T).requires_grad_(True)
    grad_variance = torch.randn(N, H, dtype=F64, generator=g)
    grad_trace = torch.tensor(0.7, dtype=F64)
    grad_entropy = 1.3
    q = posterior()
    variance, trace, entropy, pullback = posterior.moments_with_pullback(gram.detach())
    torch.testing.assert_close(variance, q.variance.detach(), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(trace, q.trace_term(gram).detach(), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(entropy, q.entropy().detach(), rtol=1e-13, atol=1e-14)
    scalar = (grad_variance * q.variance).sum() + (grad_trace * q.trace_term(gram)).sum() + grad_entropy * q.entropy().sum()
    scalar.backward()
    grads, grad_gram = pullback(grad_variance, grad_trace, grad_entropy)
    torch.testing.assert_close(grad_gram, gram.grad, rtol=1e-12, atol=1e-12)
    named = dict(posterior.named_parameters())
    assert set(grads) == set(named) - {"mean"}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, named[name].grad, rtol=1e-12, atol=1e-12)
