"""Amortised posteriors, minibatch Adam and gradient variance (issue #4), in float64 where they are oracles:
low-rank entropy / trace / log-density against dense computation, the encoder's ELBO against the
per-data-point posterior's for the same μ, Σ, full-data statistics under minibatches, zero gradient
variance of the analytic objectives, Adam raising the held-out ELBO on tiny bars, exact resume, config checks."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import sparse_elbo
from sparse_elbo import encoders
from sparse_elbo.annealing import AnnealingWeights, NoAnnealing, initial_prior_scale
from sparse_elbo.data import make_bars, split_held_out
from sparse_elbo.encoders import AmortizedPosterior
from sparse_elbo.errors import ConfigError
from sparse_elbo.evaluation import evaluate_problem
from sparse_elbo.gaussians import LowRankGaussian
from sparse_elbo.gradients import gradient_variance
from sparse_elbo.metrics import match_fields
from sparse_elbo.model import SparseCodingModel
from sparse_elbo.objectives import AnalyticELBO, EntropyELBO, SampledELBO
from sparse_elbo.posteriors import DiagonalPosterior, FullCovariancePosterior
from sparse_elbo.priors import GaussianPrior, LaplacePrior
from sparse_elbo.problem import Problem
from sparse_elbo.results import read_results
from sparse_elbo.runner import build, run
from sparse_elbo.trainers.base import fit
from sparse_elbo.trainers.minibatch_statistics import StatisticsStore

F64 = torch.float64
TINY = [
    "dataset.grid=3",
    "dataset.n_data=200",
    "posterior=amortized",
    "trainer=adam",
    "trainer.batch_size=25",
    "evaluation.ground_truth=false",
    "evaluation.held_out_fraction=0.25",
    "evaluation.held_out_refine_iterations=30",
    "evaluation.importance_samples=20",
    "evaluation.gini_samples=2",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(covariance="diag", objective=None, N=12, D=6, H=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = SparseCodingModel(D, H, generator=g).double()
    with torch.no_grad():
        model.log_sigma2.fill_(math.log(0.3))
        model.log_lambda.copy_(0.3 * torch.randn(H, dtype=F64, generator=g))
    encoder = AmortizedPosterior(D, H, covariance=covariance, rank=2, n_blocks=1).double()
    with torch.no_grad():  # a non-trivial encoder (low-rank factors not near zero)
        for p in encoder.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=F64, generator=g))
    x = torch.randn(N, D, dtype=F64, generator=g)
    return Problem(x=x, model=model, posterior=encoder, objective=objective or EntropyELBO(), annealing=NoAnnealing())


# ------------------------------------------------------------------------------------- low-rank algebra


def test_low_rank_entropy_trace_variance_and_density_match_dense_computation():
    g = torch.Generator().manual_seed(3)
    N, H, R = 5, 4, 2
    mean = torch.randn(N, H, dtype=F64, generator=g)
    V = torch.randn(N, H, R, dtype=F64, generator=g)
    d = 0.2 + torch.rand(N, H, dtype=F64, generator=g)
    q = LowRankGaussian(mean, V, d)
    Sigma = V @ V.transpose(-1, -2) + torch.diag_embed(d**2)  # (N,H,H) dense
    dense = torch.distributions.MultivariateNormal(mean, covariance_matrix=Sigma)
    A = torch.randn(7, H, dtype=F64, generator=g)
    gram = A.T @ A
    torch.testing.assert_close(q.entropy(), dense.entropy(), rtol=0, atol=1e-12)
    torch.testing.assert_close(q.trace_term(gram), torch.einsum("ij,nji->n", gram, Sigma), rtol=0, atol=1e-12)
    torch.testing.assert_close(q.variance, torch.diagonal(Sigma, dim1=-2, dim2=-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(q.covariance_sum(), Sigma.sum(0), rtol=0, atol=1e-12)
    z = dense.sample((3,))
    torch.testing.assert_close(q.log_prob(z), dense.log_prob(z), rtol=0, atol=1e-11)
    samples = q.rsample(20000, generator=g)  # (K,N,H): moments of the reparameterised samples
    centred = samples - mean
    empirical = torch.einsum("kni,knj->nij", centred, centred) / samples.shape[0]
    assert (empirical - Sigma).abs().max() < 0.1


# ------------------------------------------------------------------------------------- encoder vs per point


@pytest.mark.parametrize("covariance,family", [("diag", DiagonalPosterior), ("lowrank", FullCovariancePosterior)])
@pytest.mark.parametrize("objective", [AnalyticELBO(), EntropyELBO()], ids=["analytic", "entropy"])
def test_encoder_elbo_equals_the_per_data_point_posteriors_for_the_same_mean_and_covariance(covariance, family, objective):
    problem = _problem(covariance, objective)
    with torch.no_grad():
        q_encoder = problem.q()
        per_point = problem.posterior.per_data_point(problem.x)
        assert isinstance(per_point, family)
        amortised = objective(problem.x, q_encoder, problem.model)
        pointwise = objective(problem.x, per_point(), problem.model)
    torch.testing.assert_close(amortised.elbo, pointwise.elbo, rtol=0, atol=1e-10)
    for name in amortised.terms:
        torch.testing.assert_close(amortised.terms[name], pointwise.terms[name], rtol=0, atol=1e-10)
    torch.testing.assert_close(per_point().mean, q_encoder.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(per_point().variance, q_encoder.variance, rtol=0, atol=1e-12)


def test_problem_q_gives_the_encoder_output_of_the_indexed_data_points():
    problem = _problem("lowrank")
    index = torch.tensor([4, 0, 7])
    with torch.no_grad():
        torch.testing.assert_close(problem.q(index).mean, problem.posterior(problem.x[index]).mean)
        torch.testing.assert_close(problem.q(index).factor, problem.q().factor[index])


def test_encoder_std_respects_the_floor_and_starts_near_init_std():
    encoder = AmortizedPosterior(8, 3, std_floor=1e-3, init_std=0.1).double()
    x = torch.randn(50, 8, dtype=F64)
    std = encoder(x).std.detach()
    assert float(std.min()) > 1e-3
    assert 0.05 < float(std.median()) < 0.2
    assert encoder.input.out_features == 16 and encoder.blocks[0].expand.out_features == 24  # 2D, 3D


@pytest.mark.parametrize("covariance", ["diag", "lowrank"])
def test_bfloat16_encoder_keeps_the_data_dtype_and_stays_near_the_float32_encoder(covariance):
    """Autocast changes the precision of the matrix products only: the same weights give the float32
    posterior to bfloat16's relative precision (2⁻⁸ per product), in float32, with float32 gradients."""
    torch.manual_seed(0)
    exact = AmortizedPosterior(32, 5, covariance=covariance)
    mixed = AmortizedPosterior(32, 5, covariance=covariance, compute_dtype="bfloat16")
    mixed.load_state_dict(exact.state_dict())
    x = torch.randn(64, 32)
    q_exact, q_mixed = exact(x), mixed(x)
    assert q_mixed.mean.dtype == q_mixed.variance.dtype == torch.float32
    for a, b in [(q_mixed.mean, q_exact.mean), (q_mixed.variance, q_exact.variance)]:
        error = float((a - b).detach().abs().max() / b.detach().abs().max())
        assert 1e-5 < error < 3e-2  # bfloat16 rounding is there, and no larger than a few of its units
    q_mixed.mean.sum().backward()
    assert mixed.input.weight.grad.dtype == torch.float32 and mixed.input.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("native", [True, False])
def test_auto_compute_dtype_uses_bfloat16_only_for_float32_data_on_native_hardware(native, monkeypatch):
    """``auto`` gives exactly the bfloat16 encoder where the device multiplies bfloat16 natively and float32
    data come in, and exactly the plain encoder otherwise (emulated bfloat16 is far slower than float32)."""
    monkeypatch.setattr(encoders, "native_bfloat16", lambda device: native)
    torch.manual_seed(0)
    plain = AmortizedPosterior(32, 5)
    mixed = AmortizedPosterior(32, 5, compute_dtype="bfloat16")
    auto = AmortizedPosterior(32, 5, compute_dtype="auto")
    mixed.load_state_dict(plain.state_dict())
    auto.load_state_dict(plain.state_dict())
    x = torch.randn(64, 32)
    expected = mixed(x) if native else plain(x)
    assert not torch.equal(mixed(x).mean, plain(x).mean)  # the two paths differ, so equality below identifies one
    assert torch.equal(auto(x).mean, expected.mean) and torch.equal(auto(x).variance, expected.variance)
    assert auto.matmul_dtype(x) == (torch.bfloat16 if native else torch.float32)
    x64 = x.double()
    plain64, auto64 = plain.double(), auto.double()
    assert auto64.matmul_dtype(x64) == torch.float64
    assert torch.equal(auto64(x64).mean, plain64(x64).mean)  # float64 data keep float64 products


def test_unknown_compute_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^compute_dtype must be one of \[None, 'bfloat16', 'auto'\], got 'float8'"):
        AmortizedPosterior(8, 3, compute_dtype="float8")


# ------------------------------------------------------------------------------------- minibatch statistics


def test_full_statistics_store_gives_full_data_values_and_the_batch_estimate_of_their_gradient():
    problem = _problem("diag")
    objective = problem.objective
    store = StatisticsStore(problem, block_size=5)
    store.refresh()
    with torch.no_grad():
        residual, prior_stat = objective.batch_statistics(problem.x, problem.q(), problem.model)
    torch.testing.assert_close(store.residual_sum / 12, residual.mean(), rtol=0, atol=1e-12)
    index = torch.tensor([1, 5, 9])
    q = problem.q(index)
    stats = store.statistics(index, *objective.batch_statistics(problem.x[index], q, problem.model))
    torch.testing.assert_close(stats.residual.detach(), residual.mean(), rtol=0, atol=1e-12)  # unchanged parameters
    torch.testing.assert_close(stats.prior_statistic.detach(), prior_stat.mean(0), rtol=0, atol=1e-12)
    # with the whole data set as the batch, the step's gradient is that of the exact full-data L_H
    store.refresh()
    everything = torch.arange(12)
    value = objective(
        problem.x,
        problem.q(),
        problem.model,
        statistics=store.statistics(everything, *objective.batch_statistics(problem.x, problem.q(), problem.model)),
    )
    exact = objective(problem.x, problem.q(), problem.model)
    params = list(problem.posterior.parameters()) + [problem.model.W_raw]
    for a, b in zip(torch.autograd.grad(value.elbo, params), torch.autograd.grad(exact.elbo, params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("prior_scale", [None, 0.7], ids=["lambda_star", "fixed_scale"])
@pytest.mark.parametrize("statistics", ["full", "batch"])
@pytest.mark.parametrize("prior", ["laplace", "gaussian"])
@pytest.mark.parametrize("family", ["amortized", "per_data_point"])
def test_closed_form_minibatch_gradient_equals_autograd(family, prior, statistics, prior_scale):
    """``EntropyELBO.batch_value_and_gradient`` (the Adam step's closed form) against autograd through
    ``__call__`` for every encoder weight (or per-point parameter) and W_raw, with annealing weights, the
    full-data store or the batch's own statistics, at λ* or a fixed prior scale; the store's rows follow."""
    problem = _problem("diag", N=12, D=6, H=3, seed=71)
    if prior == "gaussian":
        problem.model.prior = GaussianPrior()
    if family == "per_data_point":
        problem.posterior = problem.posterior.per_data_point(problem.x)
        problem.posterior.requires_grad_(True)
    x, model, objective = problem.x, problem.model, problem.objective
    with torch.no_grad():
        model.W_raw.mul_(torch.linspace(0.5, 2.0, 3, dtype=F64))  # non-unit raw columns: the gauge chain matters
    weights = AnnealingWeights(likelihood=0.7, prior=1.8, entropy=1.3, prior_scale=prior_scale)
    index = torch.tensor([1, 5, 9, 10])
    stores = [StatisticsStore(problem, block_size=5) for _ in range(2)]
    for store in stores:
        store.refresh()
    q = problem.q(index)
    params = [*problem.posterior.parameters(), model.W_raw]
    reference_statistics = None
    if statistics == "full":
        reference_statistics = stores[0].statistics(index, *objective.batch_statistics(x[index], q, model))
    reference = objective(x[index], q, model, weights, statistics=reference_statistics)
    expected = torch.autograd.grad(reference.weighted, params, retain_graph=True)
    statistics_of = functools.partial(stores[1].statistics, index) if statistics == "full" else None
    value, (grad_mean, grad_std, grad_W) = objective.batch_value_and_gradient(x[index], q, model, weights, statistics_of)
    torch.testing.assert_close(value.weighted, reference.weighted.detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(value.elbo, reference.elbo.detach(), rtol=1e-13, atol=1e-13)
    got = torch.autograd.grad((q.mean, q.std), params[:-1], (grad_mean, grad_std)) + (model.raw_gradient(grad_W),)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stores[1].residual, stores[0].residual, rtol=1e-14, atol=0)
    torch.testing.assert_close(stores[1].prior_statistic, stores[0].prior_statistic, rtol=1e-14, atol=0)


def test_minibatch_gradient_check_is_sensitive_to_the_batch_size_factor(monkeypatch):
    """Adam hides a common scale of the gradient, so the check above must see one: the prior's part of the
    closed form B times too large (per point instead of per batch mean) fails it."""
    problem = _problem("diag", N=12, D=6, H=3, seed=72)
    x, model, objective = problem.x, problem.model, problem.objective
    index = torch.tensor([0, 3, 4, 8])
    q = problem.q(index)
    params = list(problem.posterior.parameters())
    expected = torch.autograd.grad(objective(x[index], q, model).weighted, params, retain_graph=True)
    derivatives = LaplacePrior.statistic_and_derivatives
    monkeypatch.setattr(
        LaplacePrior,
        "statistic_and_derivatives",
        lambda self, m, s: (lambda t, g, c: (t, 4 * g, 4 * c))(*derivatives(self, m, s)),
    )
    _, (grad_mean, grad_std, _) = objective.batch_value_and_gradient(x[index], q, model)
    got = torch.autograd.grad((q.mean, q.std), params, (grad_mean, grad_std))
    assert not all(torch.allclose(a, b, rtol=1e-6, atol=1e-8) for a, b in zip(got, expected))


@pytest.mark.parametrize(
    "extra", [[], ["annealing=prior", "annealing.start=2", "annealing.step=1", "annealing.prior_scale=fixed"]]
)
def test_adam_with_the_closed_form_gradient_follows_the_autograd_path(extra):
    """Two epochs of Adam on tiny bars in float64 end at the same encoder, W and stored statistics whether
    the step's gradient comes from the closed form or from autograd through the objective."""
    states = []
    for fused in (True, False):
        cfg = sparse_elbo.compose(
            [*TINY, "dtype=float64", "trainer.statistics.refresh_every=0", *extra, f"trainer.fused_objective={fused}"]
        )
        components = build(cfg)
        problem, trainer = components.problem, components.trainer
        state = trainer.start(problem, None)
        scale = initial_prior_scale(problem.x, problem.model.W.detach(), problem.model.prior)
        for epoch in range(2):
            trainer.train_epoch(problem, state, epoch, problem.annealing(epoch, scale))
        states.append((problem, state))
    (fused, fused_state), (plain, plain_state) = states
    for a, b in zip([*fused.posterior.parameters(), fused.model.W_raw], [*plain.posterior.parameters(), plain.model.W_raw]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(fused_state.store.prior_statistic, plain_state.store.prior_statistic, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------------------- gradient variance


def test_gradient_variance_is_zero_for_the_analytic_objectives_and_falls_with_samples():
    index = torch.arange(8)
    for objective in (AnalyticELBO(), EntropyELBO()):
        noise = gradient_variance(_problem("lowrank", objective), index, repeats=4)
        assert noise.total == 0.0 and noise.relative == 0.0
    one = gradient_variance(_problem("diag", SampledELBO(1)), index, repeats=30)
    ten = gradient_variance(_problem("diag", SampledELBO(10)), index, repeats=30)
    assert one.total > 0 and one.n_parameters > 0
    assert ten.total < one.total / 3  # ~1/K


@pytest.mark.parametrize("every, refreshed", [(1, [0, 1, 2, 3]), (2, [0, 2]), (0, [0])])
def test_statistics_are_refreshed_every_k_epochs_and_otherwise_carried_by_the_batches(monkeypatch, every, refreshed):
    """Refreshes happen at epochs 0, k, 2k, … (only the first for k = 0); in between the batches replace their
    rows, and the running sums stay the sums of the stored rows."""
    cfg = sparse_elbo.compose([*TINY, f"trainer.statistics.refresh_every={every}"])
    components = build(cfg)
    problem, trainer = components.problem, components.trainer
    state = trainer.start(problem, None)
    calls, original = [], StatisticsStore.refresh
    monkeypatch.setattr(StatisticsStore, "refresh", lambda store: (calls.append(epoch), original(store)))
    for epoch in range(4):
        trainer.train_epoch(problem, state, epoch, NoAnnealing()(epoch))
    assert calls == refreshed
    store = state.store
    torch.testing.assert_close(store.residual_sum, store.residual.sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(store.prior_sum, store.prior_statistic.sum(0), rtol=1e-5, atol=0)


def test_fixed_scale_annealing_holds_the_mean_least_squares_statistic_while_the_prior_weight_is_above_one(monkeypatch):
    """λ_0 is the mean |μ| of the least-squares codes of the start (the same definition as EM's), computed by the
    epoch loop, and the entropy objective gets it with the weights in the annealed epochs only."""
    cfg = sparse_elbo.compose([*TINY, "annealing=prior", "annealing.start=2", "annealing.step=1", "annealing.prior_scale=fixed"])
    components = build(cfg)
    problem, trainer = components.problem, components.trainer
    seen = []

    def spy(original):
        return lambda self, *a, **k: (seen.append((a[0].shape[0], a[3].prior_scale)), original(self, *a, **k))[1]

    for method in ("__call__", "batch_value_and_gradient"):  # the autograd path and the closed form
        monkeypatch.setattr(EntropyELBO, method, spy(getattr(EntropyELBO, method)))
    trainer.max_epochs = 2  # β_prior = 2, then 1
    starts = []
    original_start = trainer.start
    trainer.start = lambda problem, saved: (starts.append(problem.model.W.detach().clone()), original_start(problem, saved))[1]
    fit(trainer, problem, lambda e, w, t: evaluate_problem(problem, w))
    W = starts[0]
    codes = torch.linalg.solve(W.T @ W + 1e-3 * torch.eye(W.shape[1], dtype=W.dtype), W.T @ problem.x.T)
    steps = [scale for rows, scale in seen if rows == 25]  # the training steps (the evaluations see all 150 points)
    batches = len(steps) // 2
    assert batches == 6  # 150 training points in batches of 25
    assert steps[:batches] == [pytest.approx(float(codes.abs().mean()), rel=1e-5)] * batches
    assert all(scale is None for scale in steps[batches:])


def test_fixed_scale_annealing_needs_the_entropy_objective():
    cfg = sparse_elbo.compose(
        [*TINY, "objective=analytic", "annealing=prior", "annealing.start=2", "annealing.step=1", "annealing.prior_scale=fixed"]
    )
    with pytest.raises(ConfigError, match="annealing.prior_scale=fixed is not supported by objective=analytic"):
        build(cfg)


# ------------------------------------------------------------------------------------- end to end


def test_adam_on_tiny_bars_raises_the_held_out_elbo_and_stores_held_out_metrics(tmp_path):
    cfg = sparse_elbo.compose(
        [*TINY, "trainer.max_epochs=15", "trainer.learning_rate=3e-3", "evaluation.gradient_variance_repeats=3"]
    )
    summary = run(cfg, tmp_path, progress=False)
    res = read_results(summary.results_path)
    curve = res.metrics["held_out_elbo_encoder"]
    assert curve.shape == (15,)
    assert curve[-1] > curve[0] + 2.0, curve  # nats per data point
    assert np.all(np.diff(curve[5:]) > -0.05), curve  # and it keeps rising once the start is over
    np.testing.assert_array_equal(res.metrics["gradient_variance"], 0.0)  # entropy objective
    final = res.final
    assert int(final["held_out_n"]) == 50
    assert float(final["amortization_gap"]) == pytest.approx(
        float(final["held_out_elbo_refined"]) - float(final["held_out_elbo_encoder"])
    )
    assert float(final["amortization_gap"]) > -1e-3  # refining from the encoder's q cannot lose (up to tolerance)
    assert float(final["held_out_log_px"]) > float(final["held_out_elbo_refined"])
    assert 0 < float(final["held_out_log_px_stderr"]) < 0.5
    assert "input_weight" in final["posterior"]  # the encoder's weights
    assert summary.held_out["held_out_log_px"] == pytest.approx(float(final["held_out_log_px"]))


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["objective=sampled", "posterior=diag"],
        ["trainer=semi_amortized_adam"],
        ["trainer.statistics.refresh_every=2"],
        ["annealing=prior", "annealing.start=2", "annealing.step=0.25", "annealing.prior_scale=fixed"],
    ],
    ids=["amortized-entropy", "diag-sampled", "semi-amortized", "refresh-every-2", "fixed-scale-annealing"],
)
def test_adam_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch, extra):
    import sparse_elbo.runner.record as record

    overrides = [*TINY, "trainer.max_epochs=5", "results.checkpoint_interval_s=0", *extra]  # a checkpoint every epoch
    reference = read_results(run(sparse_elbo.compose(overrides), tmp_path / "reference", progress=False).results_path)
    original, calls = record.evaluate_problem, {"n": 0}

    def interrupting(problem, weights, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # after the evaluations of epochs 0..2
            raise KeyboardInterrupt("simulated Ctrl-C")
        return original(problem, weights, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(record, "evaluate_problem", interrupting)
        with pytest.raises(KeyboardInterrupt):
            run(sparse_elbo.compose(overrides), tmp_path / "interrupted", progress=False)
    resumed = run(sparse_elbo.compose([f"resume={tmp_path / 'interrupted' / 'results.h5'}"]), tmp_path / "unused", progress=False)
    res = read_results(resumed.results_path)
    assert res.status == "finished"
    np.testing.assert_array_equal(res.metrics["epoch"], reference.metrics["epoch"])
    np.testing.assert_allclose(res.metrics["elbo"], reference.metrics["elbo"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(res.final["W"], reference.final["W"], rtol=0, atol=1e-5)


def test_the_semi_amortised_dictionary_gradient_is_the_one_at_each_points_own_optimum():
    """Oracle: per-point full covariances fitted by L-BFGS (autograd of the analytic ELBO) at the same W, σ², λ;
    the gradient of the batch's mean analytic ELBO in the raw dictionary, by autograd, at those posteriors."""
    components = build(
        sparse_elbo.compose([*TINY, "dtype=float64", "trainer=semi_amortized_adam", "trainer.refine_iterations=200"])
    )
    problem, trainer = components.problem, components.trainer
    state = trainer.start(problem, None)
    index = torch.arange(25)
    x, model = problem.x[index], problem.model
    means = state.refined.means()
    sigma2, lam = means.residual / x.shape[1], means.prior_statistic  # σ²*, λ* of the stored rows
    trainer._refined_dictionary_gradient(x, problem.q(index), model, state.refined, index)

    fixed = SparseCodingModel(9, 6).double()
    fixed.load_state_dict(model.state_dict())
    fixed.set_noise_and_prior_scale(sigma2, lam)
    per_point = FullCovariancePosterior(n_data=25, n_latents=6, init_std=0.1).double()
    optimizer = torch.optim.LBFGS(per_point.parameters(), max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = -AnalyticELBO()(x, per_point.q(x), fixed).elbo * 25
        loss.backward()
        return loss

    optimizer.step(closure)
    fixed.W_raw.grad = None
    (-AnalyticELBO()(x, per_point.q(x), fixed).elbo).backward()
    # a wrong q or formula is off by a percent of the largest entry; the two fits agree to ~4e-6 of it
    largest = float(fixed.W_raw.grad.abs().max())
    torch.testing.assert_close(model.W_raw.grad, fixed.W_raw.grad, rtol=0, atol=1e-5 * largest)


@pytest.mark.slow
def test_semi_amortised_adam_recovers_the_bars_where_the_plain_encoder_does_not():
    """3×3 bars, 1,000 points (20 % held out), 60 epochs from the sparse-coding start, seed 1."""
    overrides = ["experiment=bars_amortized", "dataset.grid=3", "dataset.n_data=1000", "trainer.max_epochs=60", "seed=1"]
    cosines = {}
    for trainer in ("semi_amortized_adam", "adam"):
        cfg = sparse_elbo.compose([*overrides, f"trainer={trainer}"])
        components = build(cfg)
        fit(components.trainer, components.problem, lambda e, w, t: evaluate_problem(components.problem, w))
        W = components.problem.model.W.detach().cpu().numpy()
        cosines[trainer] = match_fields(W, components.dataset.W_true).min_cosine
    assert cosines["semi_amortized_adam"] >= 0.95 > cosines["adam"], cosines


def test_held_out_split_is_seeded_and_uses_the_data_sets_own_held_out_points():
    data = make_bars(grid=3, n_data=100, seed=0)
    train, held = split_held_out(data, 0.2, seed=1)
    assert train.shape == (80, 9) and held.shape == (20, 9)
    assert {r.tobytes() for r in train}.isdisjoint({r.tobytes() for r in held})
    np.testing.assert_array_equal(split_held_out(data, 0.2, seed=1)[1], held)
    assert split_held_out(data, 0.0)[1] is None
    data.info["held_out"] = np.ones((7, 9))
    assert split_held_out(data, 0.0)[1].shape == (7, 9)
    with pytest.raises(ValueError, match="dataset.held_out"):
        split_held_out(data, 0.1)
    with pytest.raises(ValueError, match=r"evaluation.held_out_fraction must be in \[0, 1\)"):
        split_held_out(data, 1.0)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["posterior=amortized", "trainer=em"], "posterior=amortized is not supported by trainer EMTrainer"),
        (["posterior=amortized", "trainer=authors_em"], "posterior=amortized is not supported by trainer AuthorsEMTrainer"),
        (
            ["posterior=amortized", "trainer=adam", "posterior.covariance=full"],
            "posterior.covariance must be one of ['diag', 'lowrank']",
        ),
        (["posterior=amortized", "trainer=adam", "posterior.rank=0"], "posterior.rank must be >= 1"),
        (["trainer=adam", "trainer.learning_rate=0"], "trainer.learning_rate must be > 0"),
        (["trainer=adam", "trainer.statistics.refresh_every=-1"], "trainer.statistics.refresh_every must be >= 0"),
        (
            ["trainer=adam", "trainer.dictionary_posterior=refined"],
            "Could not override 'trainer.dictionary_posterior'",
        ),
        (
            ["posterior=diag", "trainer=semi_amortized_adam"],
            "posterior=diag is not supported by trainer SemiAmortizedAdam; allowed posteriors: ['amortized']",
        ),
    ],
)
def test_bad_amortized_and_adam_settings_fail_with_a_clear_message(overrides, message):
    with pytest.raises(Exception) as error:  # a ConfigError, or Hydra's InstantiationException around one
        build(sparse_elbo.compose([*overrides, "dataset.n_data=20"]))
    assert message in str(error.value)


@pytest.mark.parametrize("name", ["patches_amortized", "patches_amortized_small", "bars_amortized"])
def test_named_amortized_settings_compose(name):
    cfg = sparse_elbo.compose([f"experiment={name}"])
    assert cfg.posterior._target_.endswith("AmortizedPosterior")
    assert cfg.trainer._target_.endswith(("AdamTrainer", "SemiAmortizedAdam"))
    if name == "patches_amortized":  # the authors' setting
        assert cfg.trainer.learning_rate == 1e-3 and cfg.trainer.batch_size == 512 and cfg.trainer.max_epochs == 200
        assert cfg.dataset.n_patches == 204800 and cfg.n_latents == 100
        assert cfg.annealing.start == 2.0 and cfg.annealing.step == 0.1 and cfg.annealing.term == "prior"
        assert cfg.posterior.std_floor == 1e-3 and cfg.posterior.hidden_width is None and cfg.posterior.block_width is None


def test_gaussian_prior_baseline_runs_with_an_amortised_posterior(tmp_path):
    cfg = sparse_elbo.compose([*TINY, "prior=gaussian", "trainer.max_epochs=2"])
    assert type(build(cfg).problem.model.prior).__name__ == "GaussianPrior"
    summary = run(cfg, tmp_path, progress=False)
    assert np.isfinite(summary.elbo) and np.isfinite(summary.held_out["held_out_log_px"])


@pytest.mark.parametrize("initialisation", ["random", "sparse_coding"])
def test_adam_starts_from_its_initialisation(initialisation):
    from sparse_elbo.initialisation import SparseCodingDictionary
    from sparse_elbo.runner.build import build

    components = build(sparse_elbo.compose([*TINY, f"trainer/initialisation={initialisation}"]))
    problem, trainer = components.problem, components.trainer
    own = problem.model.W_raw.detach().clone()
    trainer.start(problem, None)
    if initialisation == "random":
        assert torch.equal(problem.model.W_raw, own)  # the model's own start, bit for bit
    else:
        generator = torch.Generator().manual_seed(problem.seed)
        expected = SparseCodingDictionary()(problem.x, own / own.norm(dim=0), generator)
        torch.testing.assert_close(problem.model.W.detach(), expected / expected.norm(dim=0))


def test_the_semi_amortised_variant_takes_either_statistics_for_its_encoder():
    """The refined q always keep their own full-data statistics; the encoder's may be the batch's (a
    combination that needs no rule)."""
    components = build(sparse_elbo.compose([*TINY, "trainer=semi_amortized_adam", "trainer/statistics=batch"]))
    state = components.trainer.start(components.problem, None)
    assert state.store is None and state.refined.filled
    components.trainer.train_epoch(components.problem, state, 0, AnnealingWeights())
    assert torch.isfinite(components.problem.model.W_raw).all()
