"""Annealing in the full-data EM (docs/design.md §8): a prior weight above 1 makes the weighted entropy
objective unbounded (an oracle on the claim), and ``annealing.prior_scale=fixed`` keeps every latent in use
while the annealed epochs shape the dictionary; λ_0 is computed once, by the loop, and kept on resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from support import e_step, small_problem

from sparse_elbo.annealing import AnnealingWeights, NoAnnealing, StepAnnealing, TemperatureAnnealing, initial_prior_scale
from sparse_elbo.data import make_bars
from sparse_elbo.errors import ConfigError
from sparse_elbo.evaluation import evaluate_problem
from sparse_elbo.images import make_image_patches
from sparse_elbo.inference.e_step import BlockLBFGS, EntropyEStep
from sparse_elbo.model import SparseCodingModel
from sparse_elbo.objectives import AnalyticELBO, EntropyELBO
from sparse_elbo.posteriors import DiagonalPosterior
from sparse_elbo.problem import Problem
from sparse_elbo.trainers.base import LoopState, fit
from sparse_elbo.trainers.em import EMTrainer
from sparse_elbo.trainers.restarts import NeverRestart, RestartAfterAnnealing, RestartEveryEpoch

RESTARTS = {"never": NeverRestart(), "end_of_annealing": RestartAfterAnnealing(), "every_epoch": RestartEveryEpoch()}


@pytest.mark.parametrize("prior_weight", [2.0, 4.0, 10.0])
def test_a_prior_weight_above_one_rewards_shrinking_a_switched_off_latent_without_bound(prior_weight):
    """Latent 0 switched off (μ_·0 = 0, s_·0 = s, so λ*_0 = s √(2/π)): dividing s by 10 changes the weighted
    L_H by (β - 1) log 10 (less a vanishing change of σ²*), for every s: no maximum. With λ held fixed
    (the analytic ELBO) the same move costs about log 10: bounded."""
    problem = small_problem("diag", n_data=30, seed=2)
    weights = AnnealingWeights(prior=prior_weight)
    values, fixed_values = [], []
    for s in (1e-3, 1e-4, 1e-5):
        with torch.no_grad():
            problem.posterior.mean[:, 0] = 0.0
            problem.posterior.log_std[:, 0] = math.log(s)
        with torch.no_grad():
            q = problem.posterior()
            values.append(float(EntropyELBO()(problem.x, q, problem.model, weights).weighted))
            fixed_values.append(float(AnalyticELBO()(problem.x, q, problem.model, weights).weighted))
    gains = [b - a for a, b in zip(values, values[1:])]
    for gain in gains:
        assert gain == pytest.approx((prior_weight - 1.0) * math.log(10.0), abs=1e-4)
    for a, b in zip(fixed_values, fixed_values[1:]):
        assert b - a == pytest.approx(-math.log(10.0), abs=1e-2)


@pytest.mark.parametrize("prior_weight", [2.0, 10.0])
def test_the_entropy_objective_at_a_fixed_prior_scale_is_bounded_and_agrees_at_the_optimal_scale(prior_weight):
    """``weights.prior_scale = λ_0`` (fixed-scale annealing): shrinking a switched-off latent's s by 10 now costs
    log 10 less the prior's small gain, as under the analytic ELBO; the prior term there is the cross-entropy,
    which at ``λ = λ*`` is the prior's entropy (the literal term), and the unweighted ``elbo`` is ``L_H``
    whatever the scale."""
    problem = small_problem("diag", n_data=30, seed=2)
    objective = EntropyELBO()
    weights, held = AnnealingWeights(prior=prior_weight), AnnealingWeights(prior=prior_weight, prior_scale=0.5)
    values, scales = [], (1e-3, 1e-4, 1e-5)
    for s in scales:
        with torch.no_grad():
            problem.posterior.mean[:, 0] = 0.0
            problem.posterior.log_std[:, 0] = math.log(s)
            q = problem.posterior()
            value = objective(problem.x, q, problem.model, held)
            literal = objective(problem.x, q, problem.model, weights)
            prior = problem.model.prior
        values.append(float(value.weighted))
        assert float(value.elbo) == float(literal.elbo)
        torch.testing.assert_close(prior.cross_entropy(literal.lam, literal.lam), prior.entropy(literal.lam), rtol=1e-12, atol=0)
    for (s_a, a), (s_b, b) in zip(zip(scales, values), zip(scales[1:], values[1:])):
        # the entropy's -log 10, and the prior's β E|z_0|/λ_0 = β s √(2/π)/0.5 falling with s (σ²*'s share ~s²)
        assert b - a == pytest.approx(-math.log(10.0) + prior_weight * math.sqrt(2 / math.pi) * (s_a - s_b) / 0.5, abs=1e-5)


def patch_problem(seed=0, annealing=None):
    dataset = make_image_patches(patch_size=8, n_patches=2000, seed=seed)
    x = torch.as_tensor(dataset.x, dtype=torch.float64)
    model = SparseCodingModel(64, 16, generator=torch.Generator().manual_seed(seed)).double()
    posterior = DiagonalPosterior(x.shape[0], 16).double()
    annealing = annealing or StepAnnealing()
    return Problem(x=x, model=model, posterior=posterior, objective=EntropyELBO(), annealing=annealing, seed=seed)


def annealed_epochs(prior_scale, schedule=StepAnnealing):
    """Three annealed epochs (β = 10, 8, 6 on the prior, or on likelihood and prior) of the fast EM on
    2,000 8x8 patches, H = 16: per epoch the unweighted ELBO, λ* (H,) and W (D,H)."""
    problem = patch_problem(annealing=schedule(prior_scale=prior_scale))
    trainer = EMTrainer(max_epochs=3, em_iterations_per_epoch=5, e_step=EntropyEStep(), driver=BlockLBFGS(iterations=7))
    record = []

    def evaluate(epoch, weights, train_time):
        value = evaluate_problem(problem, weights)
        record.append((float(value.elbo), value.lam.detach().clone(), problem.model.W.detach().clone()))
        return value

    fit(trainer, problem, evaluate)
    return record


@pytest.mark.usefixtures("one_thread")
def test_fixed_prior_scale_keeps_every_latent_in_use_and_learns_in_annealed_epochs():
    optimal, fixed = annealed_epochs("optimal"), annealed_epochs("fixed")
    # λ = λ*: latents switch off (λ*_h below 1 % of the largest) and the ELBO does not move
    assert min(float(lam.min() / lam.max()) for _, lam, _ in optimal[1:]) < 0.01
    assert abs(optimal[-1][0] - optimal[0][0]) < 0.1
    # λ held at λ_0: every latent stays in use and the annealed epochs raise the (unweighted) ELBO
    assert min(float(lam.min() / lam.max()) for _, lam, _ in fixed) > 0.25
    assert fixed[-1][0] > fixed[0][0] + 3.0


@pytest.mark.usefixtures("one_thread")
def test_temperature_annealing_at_a_fixed_prior_scale_keeps_every_latent_in_use_while_w_moves():
    fixed = annealed_epochs("fixed", TemperatureAnnealing)
    assert min(float(lam.min() / lam.max()) for _, lam, _ in fixed) > 0.25
    first, last = fixed[0][2], fixed[-1][2]  # unit-norm columns (D,H)
    assert float((first * last).sum(0).abs().mean()) < 0.99  # the annealed epochs shape the dictionary


def test_the_fixed_scale_is_the_mean_code_of_the_start_computed_once_by_the_loop_and_kept_on_resume():
    """λ_0: the mean |μ| of the least-squares codes of the dictionary the trainer starts from (one definition for
    every trainer), computed by the epoch loop after the trainer's start, carried by the weights of the
    annealed epochs only, saved with the loop's state and reused on resume."""
    problem = patch_problem(annealing=StepAnnealing(start=3.0, step=1.0, prior_scale="fixed"))
    W, x = problem.model.W.detach(), problem.x
    codes = np.linalg.solve(W.numpy().T @ W.numpy() + 1e-3 * np.eye(16), W.numpy().T @ x.numpy().T)
    assert initial_prior_scale(x, W, problem.model.prior, block_size=300) == pytest.approx(float(np.abs(codes).mean()), rel=1e-10)
    seen, saved = [], []
    trainer = EMTrainer(max_epochs=3, e_step=EntropyEStep(), driver=BlockLBFGS(iterations=2))
    original = trainer.train_epoch
    trainer.train_epoch = lambda problem, state, epoch, weights: seen.append(weights) or original(problem, state, epoch, weights)
    fit(trainer, problem, lambda e, w, t: evaluate_problem(problem, w), checkpoint=lambda e, state: saved.append(state))
    assert [w.prior_scale for w in seen] == [pytest.approx(float(np.abs(codes).mean()), rel=1e-10)] * 2 + [None]
    assert LoopState.from_dict(saved[0]["loop"]).prior_scale == seen[0].prior_scale
    resumed = []
    trainer.train_epoch = lambda problem, state, epoch, weights: resumed.append(weights)
    trainer.max_epochs = 3
    fit(trainer, patch_problem(seed=1, annealing=problem.annealing), lambda e, w, t: evaluate_problem(problem, w), saved=saved[0])
    assert resumed[0].prior_scale == seen[1].prior_scale  # the saved λ_0, not that of another start


def test_an_unknown_prior_scale_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"prior_scale must be one of \['optimal', 'fixed'\], got 'free'"):
        StepAnnealing(prior_scale="free")


def problem_with_a_switched_off_bar():
    """3x3 bars at the true dictionary with bar 0 switched off in every q (μ_·0 = 0, s_·0 = 10⁻⁶), as a
    latent ends when λ*_0 has collapsed; the schedule's annealed epochs are over from epoch 5."""
    problem = small_problem("diag", n_data=60, seed=1)
    problem.annealing = StepAnnealing()
    W_true = torch.as_tensor(make_bars(grid=3, n_data=60, noise=0.2, seed=1).W_true)
    with torch.no_grad():
        problem.model.set_dictionary(W_true / W_true.norm(dim=0))
        problem.posterior.mean.copy_(torch.linalg.lstsq(problem.model.W, problem.x.T).solution.T)
        problem.posterior.mean[:, 0] = 0.0
        problem.posterior.log_std[:, 0] = math.log(1e-6)
    return problem


@pytest.mark.parametrize("restarts", ["never", "end_of_annealing"])
def test_a_restart_after_annealing_brings_a_switched_off_latent_back(restarts):
    problem = problem_with_a_switched_off_bar()
    trainer = EMTrainer(
        em_iterations_per_epoch=5, e_step=EntropyEStep(), driver=BlockLBFGS(iterations=20), restarts=RESTARTS[restarts]
    )
    trainer.train_epoch(problem, trainer.start(problem, {}), 5, problem.annealing(5))
    lam = problem.model.lam.detach()
    if restarts == "never":  # EM cannot revive it: its q is the prior, so λ*_0 = E|z_0| stays tiny
        assert float(lam[0] / lam.max()) < 1e-3
    else:
        assert float(lam[0] / lam.max()) > 0.3


def test_restarts_happen_from_the_end_of_annealing_on():
    problem = problem_with_a_switched_off_bar()  # StepAnnealing: β_prior = 1 from epoch 5
    final = problem.annealing.final_epoch()
    epochs = {name: [e for e in range(9) if policy(e, final)] for name, policy in RESTARTS.items()}
    assert epochs == {"never": [], "end_of_annealing": [5], "every_epoch": [5, 6, 7, 8]}
    final = NoAnnealing().final_epoch()
    epochs = {name: [e for e in range(4) if policy(e, final)] for name, policy in RESTARTS.items()}
    assert epochs == {"never": [], "end_of_annealing": [], "every_epoch": [1, 2, 3]}


def test_the_restart_policies_are_the_options_of_the_config_group():
    """Each policy is one YAML of configs/trainer/restarts (the option list is read from there)."""
    from hydra.utils import get_object
    from omegaconf import OmegaConf

    from sparse_elbo.config import config_dir

    shipped = {p.stem: get_object(OmegaConf.load(p)._target_) for p in (config_dir() / "trainer" / "restarts").glob("*.yaml")}
    assert {name: type(policy) for name, policy in RESTARTS.items()} == shipped


def _lasso(x: np.ndarray, W: np.ndarray, noise_variance: float, scale: np.ndarray, iterations: int = 20000) -> np.ndarray:
    """An independent float64 reference: ISTA on ``½||x_n - W μ||²/σ² + Σ_h |μ_h|/λ_h`` for every row of x."""
    step = noise_variance / np.linalg.eigvalsh(W.T @ W)[-1]
    mu = np.zeros((x.shape[0], W.shape[1]))
    for _ in range(iterations):
        z = mu - step * (mu @ W.T - x) @ W / noise_variance
        mu = np.sign(z) * np.maximum(np.abs(z) - step / scale, 0.0)
    return mu


def test_temperature_annealing_tends_to_the_map_codes_with_posteriors_narrowed_by_the_root_of_beta():
    """Weights ``(β, β, 1)`` on (likelihood, prior, entropy) at fixed σ², λ — ``annealing=temperature`` under
    fixed-scale annealing — are the analytic ELBO at temperature 1/β: as β grows, the E-step's means
    tend to the MAP (lasso) codes of ``½||x - Wμ||²/σ² + Σ|μ_h|/λ_h`` and each active latent's s to
    ``σ / (√β ||W_h||)``, the root of the likelihood's curvature (the prior is flat away from 0)."""
    problem = small_problem("diag", n_data=8, seed=3)
    model = problem.model
    with torch.no_grad():
        model.set_noise_and_prior_scale(torch.tensor(0.04, dtype=torch.float64), torch.full((6,), 0.5, dtype=torch.float64))
    W, noise_variance = model.W.detach().numpy(), 0.04
    reference = _lasso(problem.x.numpy(), W, noise_variance, np.full(6, 0.5))
    beta = 1e4
    weights = TemperatureAnnealing(start=beta, step=1.0)(0)
    assert weights == AnnealingWeights(likelihood=beta, prior=beta)
    e_step(problem, torch.arange(8), iterations=3000, tolerance=0.0, weights=weights)
    mean = problem.posterior.mean.detach().numpy()
    std = problem.posterior.log_std.detach().exp().numpy()
    narrowing = math.sqrt(noise_variance / beta)  # σ/√β: the posterior's width at temperature 1/β
    np.testing.assert_allclose(mean, reference, atol=narrowing)
    active = np.abs(reference) > 0.05
    assert active.sum() >= 8  # the comparison below covers real codes
    expected = narrowing / np.linalg.norm(W, axis=0)  # (H,)
    np.testing.assert_allclose(std[active], np.broadcast_to(expected, std.shape)[active], rtol=0.02)
