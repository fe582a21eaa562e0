"""Variational EM: the E-step reaches a float64 reference optimum, the closed-form M-step is the
maximiser, EM never decreases the ELBO without annealing, full vs batch statistics, the authors' procedure."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch
from support import closed_form_m_step, e_step, set_full_data_optima, small_problem, statistics_of

from sparse_elbo.annealing import AnnealingWeights
from sparse_elbo.evaluation import evaluate_problem
from sparse_elbo.inference.e_step import AnalyticEStep, BatchEntropyEStep, BlockLBFGS, EntropyEStep
from sparse_elbo.model import SparseCodingModel
from sparse_elbo.objectives import AnalyticELBO, EntropyELBO, entropy_statistics
from sparse_elbo.trainers.authors import AuthorsEMTrainer
from sparse_elbo.trainers.base import NoState, fit
from sparse_elbo.trainers.em import EMTrainer


@pytest.mark.parametrize("family", ["diag", "full"])
def test_e_step_increases_the_objective_and_matches_a_float64_reference_optimum(family):
    problem = small_problem(family, n_data=6)
    with torch.no_grad():
        problem.model.set_noise_and_prior_scale(
            torch.tensor(0.05, dtype=torch.float64), torch.full((6,), 0.8, dtype=torch.float64)
        )
    objective = AnalyticELBO()
    with torch.no_grad():
        before = float(objective(problem.x, problem.posterior(), problem.model).elbo)
    index = torch.arange(6)
    e_step(problem, index, iterations=500, tolerance=0.0)
    with torch.no_grad():
        after = float(objective(problem.x, problem.posterior(), problem.model).elbo)
    assert after > before

    # reference: scipy's L-BFGS-B on each data point separately, from a different start, in float64
    names = [name for name, _ in problem.posterior.named_parameters()]
    reference = []
    for n in range(6):
        shapes = [p[n : n + 1].shape for _, p in problem.posterior.named_parameters()]
        sizes = [int(np.prod(s)) for s in shapes]

        def f(theta, n=n):
            tensors, offset = [], 0
            for shape, size in zip(shapes, sizes):
                tensors.append(torch.tensor(theta[offset : offset + size]).reshape(shape).requires_grad_(True))
                offset += size
            q = problem.posterior.gaussian(dict(zip(names, tensors)))
            value = -objective(problem.x[n : n + 1], q, problem.model).elbo
            grads = torch.autograd.grad(value, tensors)
            return float(value.detach()), np.concatenate([g.reshape(-1).numpy() for g in grads])

        start = np.concatenate([np.full(size, -0.5 if name != "mean" else 0.3) for name, size in zip(names, sizes)])
        result = scipy.optimize.minimize(
            f, start, jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 5000}
        )
        reference.append(-result.fun)
    per_point = objective(problem.x, problem.posterior(), problem.model).per_point.detach().numpy()
    np.testing.assert_allclose(per_point, reference, atol=1e-6)


def test_closed_form_m_step_is_the_maximiser_of_the_expected_log_likelihood():
    problem = small_problem("full", n_data=40)
    q = problem.posterior()
    with torch.no_grad():  # a non-trivial posterior
        problem.posterior.mean.normal_()
        problem.posterior.lower.normal_(std=0.1)
    q = problem.posterior()
    x = problem.x
    cross = x.T @ q.mean
    second = q.mean.T @ q.mean + q.covariance_sum()
    W_opt = torch.linalg.solve(second, cross.T).T.detach().requires_grad_(True)
    free = SparseCodingModel(x.shape[1], W_opt.shape[1], gauge="unit_lambda").double()
    with torch.no_grad():
        free.W_raw.copy_(W_opt)
    value = AnalyticELBO()(x, problem.posterior(), free)
    (grad,) = torch.autograd.grad(value.elbo, free.W_raw)
    assert float(grad.abs().max()) < 1e-10
    with torch.no_grad():  # and it is a maximum: any perturbation lowers the ELBO
        for _ in range(5):
            free.W_raw.copy_(W_opt + 1e-3 * torch.randn_like(W_opt))
            assert float(AnalyticELBO()(x, problem.posterior(), free).elbo) < float(value.elbo)


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"m_step_overrelaxation": 1.9},
        {"e_step": EntropyEStep()},
        {"e_step": EntropyEStep(), "m_step_overrelaxation": 1.9},
    ],
)
@pytest.mark.parametrize("family", ["diag", "full"])
def test_em_never_decreases_the_elbo_without_annealing(family, variant):
    problem = small_problem(family, n_data=80, seed=2)
    trainer = EMTrainer(max_epochs=12, em_iterations_per_epoch=2, driver=BlockLBFGS(iterations=20, block_size=32), **variant)
    elbos = []
    fit(trainer, problem, lambda e, w, t: elbos.append(evaluate_problem(problem, w)) or elbos[-1])
    values = np.array([float(v.elbo) for v in elbos])
    assert np.all(np.diff(values) >= -1e-9), np.diff(values)
    assert values[-1] > values[0] + 0.1


def test_gauge_fix_of_the_m_step_leaves_the_elbo_unchanged():
    problem = small_problem("full", n_data=50, seed=4)
    trainer = EMTrainer(driver=BlockLBFGS(iterations=30))
    set_full_data_optima(problem)
    e_step(problem, torch.arange(50), iterations=30)
    # the unconstrained maximiser in the gauge lambda = model.lam, evaluated without normalising
    q = problem.posterior()
    W_opt = torch.linalg.solve(q.mean.T @ q.mean + q.covariance_sum(), (problem.x.T @ q.mean).T).T.detach()
    free = SparseCodingModel(problem.x.shape[1], W_opt.shape[1], gauge="unit_lambda").double()
    with torch.no_grad():
        free.W_raw.copy_(W_opt)
        free.log_sigma2.copy_(problem.model.log_sigma2)
    free.log_lambda.data.copy_(problem.model.log_lambda)  # same σ², λ, unnormalised W
    before = float(AnalyticELBO()(problem.x, problem.posterior(), free).elbo.detach())
    lam_before = problem.model.lam.detach().clone()
    closed_form_m_step(trainer, problem)
    norms = W_opt.norm(dim=0)
    with torch.no_grad():
        problem.model.log_lambda.copy_(torch.log(lam_before * norms))  # λ_h → c_h λ_h
    after = float(AnalyticELBO()(problem.x, problem.posterior(), problem.model).elbo.detach())
    assert after == pytest.approx(before, abs=1e-10)
    np.testing.assert_allclose(problem.model.W.detach().norm(dim=0).numpy(), 1.0, atol=1e-12)


def test_batch_statistics_optimise_each_batchs_own_entropy_objective():
    """statistics=batch: the E-step maximises the batch's L_H (its own σ²*, λ*); statistics=full keeps
    the full-data σ², λ — the two E-steps reach different posteriors, and each is (near) stationary only
    for its own objective. (The batch L_H converges slowly: latents unused within a batch have
    λ*_batch → 0 and s → 0 together, a flat direction of the batch objective.)"""
    batch = torch.arange(20)
    results = {}
    for statistics in ("full", "batch"):
        problem = small_problem("diag", n_data=100, seed=5)
        set_full_data_optima(problem)
        e_step(problem, batch, AnalyticEStep() if statistics == "full" else BatchEntropyEStep(), iterations=300, tolerance=0.0)
        block = problem.posterior.block_parameters(batch)
        grads = {}
        for name, obj in (("full", AnalyticELBO()), ("batch", EntropyELBO())):
            value = obj(problem.x[batch], problem.posterior.gaussian(block), problem.model)
            grads[name] = max(float(g.abs().max()) for g in torch.autograd.grad(20 * value.elbo, list(block.values())))
        results[statistics] = (grads, problem.posterior.mean[batch].detach().clone())
    # each E-step is (close to) stationary for its own objective, far from it for the other one
    assert results["full"][0]["full"] < 1e-4 and results["full"][0]["batch"] > 1e-2
    assert results["batch"][0]["batch"] < 0.1 * results["batch"][0]["full"]
    assert not torch.allclose(results["full"][1], results["batch"][1], atol=1e-3)


@pytest.mark.parametrize("scale_parameterisation", ["std", "log_std"])
def test_authors_reference_procedure_improves_the_elbo(scale_parameterisation):
    problem = small_problem("diag", n_data=200, seed=6)
    trainer = AuthorsEMTrainer(
        max_epochs=3,
        driver=BlockLBFGS(iterations=100, block_size=50),
        fresh_std=0.3,
        scale_parameterisation=scale_parameterisation,
    )
    values = []
    fit(trainer, problem, lambda e, w, t: values.append(float(evaluate_problem(problem, w).elbo)) or evaluate_problem(problem, w))
    assert values[-1] > values[0] + 0.05  # the gradient M-steps improve the dictionary
    if scale_parameterisation == "log_std":
        # moving log s, 100 L-BFGS iterations per batch reach the batch optima closely enough that the first
        # epoch already beats the start; moving s itself (theirs) they end short of it on this problem (the
        # entropy's barrier at s = 0), and the first epoch's full-data ELBO is below the start's
        initial = small_problem("diag", n_data=200, seed=6)
        assert values[0] > float(evaluate_problem(initial, AnnealingWeights()).elbo)


@pytest.mark.parametrize(
    "trainer,kwargs,message",
    [
        (EMTrainer, {"max_epochs": 0}, "max_epochs must be >= 1"),
        (EMTrainer, {"m_step_overrelaxation": 2.5}, "m_step_overrelaxation must be in (0, 2]"),
        (EMTrainer, {"m_step_overrelaxation": 0.0}, "m_step_overrelaxation must be in (0, 2]"),
        (AuthorsEMTrainer, {"learning_rate": 0}, "learning_rate must be > 0"),
        (AuthorsEMTrainer, {"fresh_std": -1.0}, "fresh_std must be > 0"),
        (BlockLBFGS, {"iterations": 0}, "iterations must be >= 1"),
        (BlockLBFGS, {"block_size": 0}, "block_size must be >= 1"),
    ],
)
def test_bad_em_settings_are_rejected_naming_the_argument_as_the_caller_wrote_it(trainer, kwargs, message):
    with pytest.raises(ValueError) as error:
        trainer(**kwargs)
    assert str(error.value).startswith(message)  # the component's own argument; the runner adds the config path
    assert error.value.under("trainer").key == f"trainer.{message.split()[0]}"


@pytest.mark.parametrize("kwargs", [{"m_step": "gradient"}, {"statistics": "batch"}, {"e_step_objective": "entropy"}])
def test_combinations_of_the_two_procedures_cannot_be_written(kwargs):
    """The full-data EM and the authors' per-batch procedure are two trainers: a gradient M-step or batch
    statistics for the full-data EM (or a choice of E-step by name) is not a setting at all."""
    with pytest.raises(TypeError):
        EMTrainer(**kwargs)


@pytest.mark.parametrize("weights", [AnnealingWeights(), AnnealingWeights(likelihood=0.7, prior=6.0, entropy=1.3)])
def test_fused_diagonal_e_step_equals_the_autograd_analytic_elbo_in_float64(weights):
    """Oracle: value (with the constant c_n added back) and gradients of ``DiagonalLaplaceEStep`` against
    ``AnalyticELBO`` differentiated by autograd, including latents with tiny and huge |μ|/s (past the
    kernel's cap on (μ/s)², so the cap is shown to change nothing beyond float64 rounding)."""
    from sparse_elbo.inference.kernels import NEGLIGIBLE_TAIL_RATIO_SQUARED, DiagonalLaplaceEStep

    problem = small_problem("diag", n_data=40)
    with torch.no_grad():
        problem.model.set_noise_and_prior_scale(
            torch.tensor(0.07, dtype=torch.float64), torch.linspace(0.3, 2.0, 6, dtype=torch.float64)
        )
        problem.posterior.mean.normal_(generator=torch.Generator().manual_seed(1))
        problem.posterior.log_std.uniform_(-4.0, 0.5, generator=torch.Generator().manual_seed(2))
        problem.posterior.log_std[0, 0] = -30.0  # s ≈ 1e-13: |μ|/s enormous
        problem.posterior.mean[1, 1] = 0.0
    block = problem.posterior.block_parameters(None)
    ratio_squared = (block["mean"] / block["log_std"].exp()).detach().square()
    assert int((ratio_squared > NEGLIGIBLE_TAIL_RATIO_SQUARED).sum()) >= 10
    value = AnalyticELBO()(problem.x, problem.posterior.gaussian(block), problem.model, weights)
    expected_loss = -problem.x.shape[0] * value.weighted
    expected_loss.backward()

    fused = DiagonalLaplaceEStep(problem.x, problem.model, weights)
    loss, grad_mean, grad_log_std = fused.loss_and_gradients(block["mean"].detach(), block["log_std"].detach())
    torch.testing.assert_close(loss - fused.constant().sum(), expected_loss.detach(), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(grad_mean, block["mean"].grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_log_std, block["log_std"].grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weights", [AnnealingWeights(), AnnealingWeights(likelihood=0.7, prior=6.0, entropy=1.3)])
def test_fused_gradients_are_the_closed_form_gradient_pieces(weights):
    """The fused kernel's in-place gradients against ``closed_forms.code_gradient`` and
    ``closed_forms.variance_gradient`` (with the chain rule to ρ = log s and the entropy's β_q)."""
    from sparse_elbo import closed_forms
    from sparse_elbo.inference.kernels import DiagonalLaplaceEStep

    problem = small_problem("diag", n_data=25, seed=3)
    with torch.no_grad():
        problem.model.set_noise_and_prior_scale(torch.tensor(0.05, dtype=torch.float64), 0.3 + torch.rand(6, dtype=torch.float64))
    generator = torch.Generator().manual_seed(4)
    mean = 2.0 * torch.randn(25, 6, generator=generator, dtype=torch.float64)
    log_std = torch.empty(25, 6, dtype=torch.float64).uniform_(-4.0, 1.0, generator=generator)
    _, grad_mean, grad_log_std = DiagonalLaplaceEStep(problem.x, problem.model, weights).loss_and_gradients(mean, log_std)
    model, std = problem.model, log_std.exp()
    W = model.W.detach()
    _, prior_gradient, prior_curvature = model.prior.statistic_and_derivatives(mean, std)
    code = closed_forms.code_gradient(
        (problem.x - mean @ W.T) @ W, model.sigma2.detach(), prior_gradient, model.lam.detach(), weights.likelihood, weights.prior
    )
    variance = closed_forms.variance_gradient(
        torch.diagonal(W.T @ W), model.sigma2.detach(), prior_curvature, model.lam.detach(), weights.likelihood, weights.prior
    )
    torch.testing.assert_close(grad_mean, -code, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_log_std, -(2.0 * std**2 * variance + weights.entropy), rtol=1e-10, atol=1e-10)


def test_fused_e_step_loss_resolves_small_changes_of_a_large_float32_block():
    """The block loss is a sum over many points; in float32 its rounding (~0.06 at 10⁶) would hide the
    changes a line search compares near convergence. Summed in float64, a change of one point's mean that
    moves the loss by ~0.02 (about the float32 sum's spacing) is seen to within 1% of the float64 reference.
    What remains is the rounding of that one point's own float32 terms (~1e-6 of each, times 1/(2σ²) = 50),
    independent of the size of the change."""
    from sparse_elbo.inference.kernels import DiagonalLaplaceEStep

    generator = torch.Generator().manual_seed(3)
    n, D, H = 100_000, 16, 10
    x = torch.randn(n, D, generator=generator)
    model = SparseCodingModel(D, H, generator=generator)
    with torch.no_grad():
        model.set_noise_and_prior_scale(torch.tensor(0.01), torch.full((H,), 0.5))
    mean = torch.randn(n, H, generator=generator)
    log_std = torch.full((n, H), -2.0)
    moved = mean.clone()
    moved[0, 0] += 1e-4
    fused32 = DiagonalLaplaceEStep(x, model, AnnealingWeights())
    fused64 = DiagonalLaplaceEStep(x.double(), model.double(), AnnealingWeights())
    change32 = float(fused32.loss_and_gradients(moved, log_std)[0] - fused32.loss_and_gradients(mean, log_std)[0])
    change64 = float(
        fused64.loss_and_gradients(moved.double(), log_std.double())[0]
        - fused64.loss_and_gradients(mean.double(), log_std.double())[0]
    )
    assert abs(float(fused64.loss_and_gradients(mean.double(), log_std.double())[0])) > 1e5  # float32 spacing there: ≥ 0.008
    assert 1e-4 < abs(change64) < 1e-1
    assert change32 == pytest.approx(change64, rel=1e-2)


@pytest.mark.parametrize("weights", [AnnealingWeights(), AnnealingWeights(likelihood=0.7, prior=6.0, entropy=1.3)])
def test_fused_entropy_e_step_equals_autograd_of_the_full_data_entropy_objective_in_float64(weights):
    """Oracle for the E-step on L_H itself: the fused loss changes and gradients of one block, the other
    points' sums held fixed, against autograd of ``EntropyELBO`` on all points with only the block free."""
    from sparse_elbo.inference.kernels import DiagonalLaplaceEntropyEStep

    problem = small_problem("diag", n_data=40)
    with torch.no_grad():
        problem.posterior.mean.normal_(generator=torch.Generator().manual_seed(1))
        problem.posterior.log_std.uniform_(-4.0, 0.5, generator=torch.Generator().manual_seed(2))
    block_index, other_index = torch.arange(15), torch.arange(15, 40)
    others = statistics_of(problem, other_index)

    def autograd_loss(mean, log_std):
        full_mean = torch.cat([mean, problem.posterior.mean[other_index].detach()])
        full_log_std = torch.cat([log_std, problem.posterior.log_std[other_index].detach()])
        q = problem.posterior.gaussian({"mean": full_mean, "log_std": full_log_std})
        return -40 * EntropyELBO()(problem.x, q, problem.model, weights).weighted

    fused = DiagonalLaplaceEntropyEStep(
        problem.x[block_index], problem.model, weights, others.residual(problem.model.W.detach()), others.prior, 40
    )
    starts = []
    for seed in (3, 4):
        mean = problem.posterior.mean[block_index].detach().clone() + 0.3 * torch.randn(
            15, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
        log_std = problem.posterior.log_std[block_index].detach().clone()
        starts.append((mean.requires_grad_(True), log_std.requires_grad_(True)))
    expected, actual = [], []
    for mean, log_std in starts:
        loss = autograd_loss(mean, log_std)
        grad_mean, grad_log_std = torch.autograd.grad(loss, (mean, log_std))
        fused_loss, fused_grad_mean, fused_grad_log_std = fused.loss_and_gradients(mean.detach(), log_std.detach())
        torch.testing.assert_close(fused_grad_mean, grad_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fused_grad_log_std, grad_log_std, rtol=1e-10, atol=1e-12)
        expected.append(float(loss.detach()))
        actual.append(float(fused_loss))
    assert actual[1] - actual[0] == pytest.approx(expected[1] - expected[0], rel=1e-10, abs=1e-10)  # equal up to a constant


@pytest.mark.parametrize("fused_e_step", [True, False])
def test_entropy_em_iteration_raises_the_full_data_elbo_and_ends_at_exact_sigma2_lambda(fused_e_step):
    problem = small_problem("diag", n_data=70, seed=8)
    trainer = EMTrainer(e_step=EntropyEStep(fused=fused_e_step), driver=BlockLBFGS(iterations=15, block_size=20))
    trainer.start(problem, None)  # the least-squares codes of the start
    before = float(evaluate_problem(problem, AnnealingWeights()).elbo)
    trainer.train_epoch(problem, NoState(), 0, AnnealingWeights())  # one EM iteration
    after = float(evaluate_problem(problem, AnnealingWeights()).elbo)
    assert after > before + 0.1
    statistics, _ = entropy_statistics(problem.x, problem.q, problem.model, block_size=16)
    torch.testing.assert_close(problem.model.sigma2.detach(), statistics.residual / problem.x.shape[1], rtol=1e-10, atol=0)
    torch.testing.assert_close(problem.model.lam.detach(), statistics.prior_statistic, rtol=1e-10, atol=0)


def test_fused_and_autograd_e_steps_reach_the_same_posteriors():
    problem_fused, problem_autograd = small_problem("diag", n_data=30), small_problem("diag", n_data=30)
    for problem in (problem_fused, problem_autograd):
        with torch.no_grad():
            problem.model.set_noise_and_prior_scale(
                torch.tensor(0.05, dtype=torch.float64), torch.full((6,), 0.8, dtype=torch.float64)
            )
    index = torch.arange(30)
    for problem, fused in ((problem_fused, True), (problem_autograd, False)):
        e_step(problem, index, AnalyticEStep(fused=fused), iterations=300, tolerance=0.0, weights=AnnealingWeights(prior=4.0))
    torch.testing.assert_close(problem_fused.posterior.mean, problem_autograd.posterior.mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(problem_fused.posterior.log_std, problem_autograd.posterior.log_std, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["diag", "full"])
def test_fresh_posterior_has_zero_means_and_the_requested_std_and_leaves_other_points_alone(family):
    problem = small_problem(family, n_data=8)
    with torch.no_grad():
        problem.posterior.mean.normal_(generator=torch.Generator().manual_seed(3))
    before = problem.posterior().mean.clone()
    index = torch.tensor([1, 4])
    problem.posterior.reset_block(index, std=1.0)  # the authors' fresh q: mu = 0, Sigma = I
    q = problem.posterior()
    assert torch.equal(q.mean[index], torch.zeros(2, q.mean.shape[1], dtype=q.mean.dtype))
    torch.testing.assert_close(q.variance[index], torch.ones_like(q.variance[index]))
    keep = torch.tensor([0, 2, 3, 5, 6, 7])
    assert torch.equal(q.mean[keep], before[keep])
    problem.posterior.reset_block(index)  # default: the posterior's init_std (0.3 here)
    torch.testing.assert_close(problem.posterior().variance[index], torch.full_like(q.variance[index], 0.09))


@pytest.mark.parametrize("family", ["diag", "full"])
def test_sufficient_statistics_give_the_residual_for_any_dictionary_and_follow_a_rescaling(family):
    """Oracle: Σ_n E||x_n - W z||² from (x_energy, cross, second_moment) against the direct per-point
    residual for a dictionary the sums were not computed with; and the sums after z_h → c_h z_h against
    those of the rescaled posteriors."""
    problem = small_problem(family, n_data=30, seed=5)
    with torch.no_grad():
        problem.posterior.mean.normal_(generator=torch.Generator().manual_seed(1))
    index = torch.arange(5, 25)
    statistics = statistics_of(problem, index)
    other = SparseCodingModel(problem.x.shape[1], 6, generator=torch.Generator().manual_seed(9)).double()
    residual, prior_statistic = EntropyELBO().batch_statistics(problem.x[index], problem.posterior(index), other)
    torch.testing.assert_close(statistics.residual(other.W.detach()), residual.sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(statistics.prior, prior_statistic.sum(0), rtol=1e-12, atol=0)
    scale = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    problem.posterior.rescale_latents(scale)
    expected = statistics_of(problem, index)
    actual = statistics.rescaled(scale, problem.model.prior.statistic_degree)
    for name in ("x_energy", "cross", "second_moment", "prior"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["diag", "full"])
def test_overrelaxed_m_step_moves_along_the_em_step_by_omega_and_never_raises_the_residual(family):
    """For fixed q the residual R(W) = Σ_n E||x_n - W z||² is quadratic with its minimum at the plain
    M-step's W*, so the over-relaxed W_ω = W + ω (W* - W) has R(W_ω) - R(W*) = (ω - 1)² (R(W) - R(W*)).
    Residuals come from the per-point closed form (not from the trainer's sums), after each M-step's
    gauge fix (which leaves them unchanged)."""
    problem = small_problem(family, n_data=50, seed=7)
    trainer = EMTrainer(driver=BlockLBFGS(iterations=30))
    set_full_data_optima(problem)
    e_step(problem, torch.arange(50), iterations=30)
    state = (
        {k: v.clone() for k, v in problem.model.state_dict().items()},
        {k: v.clone() for k, v in problem.posterior.state_dict().items()},
    )

    def residual_after(omega):
        problem.model.load_state_dict(state[0])
        problem.posterior.load_state_dict(state[1])
        if omega is not None:
            trainer.m_step_overrelaxation = omega
            closed_form_m_step(trainer, problem)
        statistics, _ = entropy_statistics(problem.x, problem.q, problem.model, block_size=16)
        return float(statistics.residual)

    start, plain = residual_after(None), residual_after(1.0)
    assert start > plain + 1e-3
    for omega in (0.5, 1.5, 1.9, 2.0):
        assert residual_after(omega) - plain == pytest.approx((omega - 1) ** 2 * (start - plain), rel=1e-9)
    assert residual_after(1.9) < start


@pytest.mark.parametrize("family", ["diag", "full"])
def test_entropy_em_iteration_ends_at_the_closed_form_dictionary_of_its_final_posteriors(family):
    """The M-step of an entropy EM iteration comes from the sums each block's E-step returned (rescaled
    with the gauge fix): W is the closed-form maximiser for the final q of all points, in the unit-norm
    gauge, so a closed-form M-step from scratch changes neither W nor the stored posteriors."""
    problem = small_problem(family, n_data=60, seed=6)
    trainer = EMTrainer(e_step=EntropyEStep(), em_iterations_per_epoch=2, driver=BlockLBFGS(iterations=10, block_size=16))
    trainer.start(problem, None)
    W_start = problem.model.W.detach().clone()
    trainer.train_epoch(problem, NoState(), 0, AnnealingWeights())  # two EM iterations
    W, mean = problem.model.W.detach().clone(), problem.posterior().mean.detach().clone()
    assert float((W - W_start).abs().max()) > 1e-2  # it did learn
    closed_form_m_step(trainer, problem)
    torch.testing.assert_close(problem.model.W.detach(), W, rtol=0, atol=1e-10)
    torch.testing.assert_close(problem.posterior().mean.detach(), mean, rtol=0, atol=1e-10)


@pytest.mark.parametrize("resumed", [False, True])
def test_em_starts_from_its_initialisation_and_a_resumed_run_keeps_its_dictionary(resumed):
    """A new run starts from the initialisation's dictionary of the model's own W (the MAP sparse-coding
    dictionary here, recomputed independently) with the least-squares codes of that dictionary; a resumed run
    keeps the W it was saved with."""
    from sparse_elbo import closed_forms
    from sparse_elbo.initialisation import SparseCodingDictionary

    problem = small_problem(n_data=40)
    own = problem.model.W.detach().clone()
    trainer = EMTrainer(initialisation=SparseCodingDictionary(iterations=20))
    trainer.start(problem, {} if resumed else None)
    if resumed:
        assert torch.equal(problem.model.W.detach(), own)
        return
    expected = SparseCodingDictionary(iterations=20)(problem.x, own, torch.Generator().manual_seed(problem.seed))
    assert not torch.allclose(expected, own, atol=0.1)  # the start really moved
    torch.testing.assert_close(problem.model.W.detach(), expected / expected.norm(dim=0))
    codes = closed_forms.least_squares_codes(problem.x, problem.model.W.detach())
    torch.testing.assert_close(problem.posterior.mean.detach(), codes)
