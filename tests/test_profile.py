"""The profile trainer (trainers/profile.py), its dictionary gradient, the stop rule and the sparse-coding
start (initialisation.py), in float64.

Oracles: autograd of the package's ``EntropyELBO`` for ``∂L_H/∂W`` at fixed q; central finite differences
of the profile ``P(W) = max_q L_H`` (each value a converged fixed-point fit) for the envelope theorem;
the lasso's optimality (KKT) conditions for the FISTA codes; the generating bars for recovery.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sparse_elbo
from sparse_elbo.annealing import NoAnnealing
from sparse_elbo.data import make_bars
from sparse_elbo.errors import ConfigError
from sparse_elbo.gaussians import FullGaussian
from sparse_elbo.inference.fixed_point import FixedPointFit
from sparse_elbo.initialisation import RandomDictionary, SparseCodingDictionary
from sparse_elbo.metrics import match_fields
from sparse_elbo.model import SparseCodingModel
from sparse_elbo.objectives import EntropyELBO
from sparse_elbo.posteriors import DiagonalPosterior, FullCovariancePosterior
from sparse_elbo.problem import Problem
from sparse_elbo.runner import run
from sparse_elbo.trainers.base import fit
from sparse_elbo.trainers.convergence import CONVERGED, NO_PROGRESS, PROGRESS, EpochDecision, StopRule
from sparse_elbo.trainers.profile import ProfileLBFGSTrainer


def _bars(grid=3, n_data=200, seed=0):
    data = make_bars(grid=grid, n_data=n_data, seed=seed)
    return data, torch.as_tensor(data.x)


def _perturbed_model(data, seed=0, scale=0.3):
    D, H = data.W_true.shape
    model = SparseCodingModel(D, H).double()
    W = torch.as_tensor(data.W_true) + scale * torch.randn(
        D, H, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    model.set_dictionary(W)
    return model


@pytest.mark.parametrize("full", [True, False], ids=["full", "diag"])
def test_dictionary_gradient_is_autograd_of_the_entropy_objective_at_fixed_q(full):
    data, x = _bars()
    model = _perturbed_model(data)
    fit = FixedPointFit(x, model.W.detach(), model.prior, full=full)
    for _ in range(5):
        fit.step(30)
    q = FullGaussian(fit.mean, torch.linalg.cholesky(fit.covariance))
    value = EntropyELBO()(x, q, model)
    (autograd,) = torch.autograd.grad(x.shape[0] * value.elbo, model.W_raw)
    closed_form = model.raw_gradient(fit.dictionary_gradient(model.W.detach()))
    assert float(value.elbo.detach()) == pytest.approx(float(fit.value), abs=1e-12)  # the same L_H
    torch.testing.assert_close(closed_form, autograd, rtol=1e-9, atol=1e-9)


def test_profile_gradient_is_the_derivative_of_the_profile_objective():
    """Envelope theorem: with every q at its optimum, dP/dW = ∂L_H/∂W; checked along a random direction
    against central differences of P, each P a fixed-point fit converged to rounding."""
    data, x = _bars(n_data=100, seed=1)
    model = _perturbed_model(data, seed=1, scale=0.2)
    W_raw = model.W_raw.detach().clone()
    direction = torch.randn(W_raw.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def profile(raw):
        model.set_dictionary(raw)
        fit = FixedPointFit(x, model.W.detach(), model.prior, full=True)
        assert fit.run(5000, 0.0, 30)
        return fit

    fit = profile(W_raw)
    analytic = float((model.raw_gradient(fit.dictionary_gradient(model.W.detach())) * direction).sum()) / x.shape[0]
    eps = 1e-4
    numeric = (float(profile(W_raw + eps * direction).value) - float(profile(W_raw - eps * direction).value)) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-7)


def test_stop_rule_verdicts():
    rule = StopRule(relative_tolerance=1e-7, gradient_tolerance=1.0)
    assert rule.verdict(-10.0, -9.9, 0.1) == PROGRESS  # still rising
    assert rule.verdict(-10.0, -10.0 + 1e-8, 0.1) == CONVERGED
    assert rule.verdict(-10.0, -10.0 + 1e-8, 5.0) == NO_PROGRESS  # flat but not stationary
    assert rule.verdict(-0.1, -0.1 + 5e-8, 0.1) == CONVERGED  # |F| < 1: absolute change
    # applied: a no-progress epoch restarts L-BFGS, a second one in a row stops; progress resets the count
    assert rule.decide(-10.0, -10.0 + 1e-8, 5.0, 0) == EpochDecision(None, 1, True)
    assert rule.decide(-10.0, -10.0 + 1e-8, 5.0, 1) == EpochDecision("stalled", 2, True)
    assert rule.decide(-10.0, -9.9, 5.0, 1) == EpochDecision(None, 0, False)
    assert rule.decide(-10.0, -10.0 + 1e-8, 0.1, 1).stop_reason == "converged"
    with pytest.raises(ValueError, match="^gradient_tolerance must be >= 0"):
        StopRule(1e-7, -1.0)


def test_sparse_coding_codes_solve_the_lasso():
    """After enough FISTA iterations the codes satisfy the lasso's KKT conditions at the final W:
    Wᵀ(x - Ws) = α sign(s) where s ≠ 0 and |Wᵀ(x - Ws)| ≤ α where s = 0."""
    data, x = _bars(grid=5, n_data=300, seed=2)
    init = SparseCodingDictionary(sparsity=0.8, iterations=30, code_iterations=10)
    W = init(
        x, torch.randn(25, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64), torch.Generator().manual_seed(0)
    )
    penalty = float(0.8 * (x.pow(2).sum(-1).mean() / 10).sqrt())
    solver = SparseCodingDictionary(sparsity=0.8, iterations=1, code_iterations=3000)
    codes = solver._codes(x, W, x.new_zeros(300, 10), torch.tensor(penalty, dtype=torch.float64))
    correlation = (x - codes @ W.T) @ W  # (N,H)
    active = codes != 0
    assert active.float().mean() > 0.2 and (~active).float().mean() > 0.2  # both conditions are exercised
    torch.testing.assert_close(correlation[active], penalty * torch.sign(codes[active]), rtol=0, atol=1e-6 * penalty)
    assert float(correlation[~active].abs().max()) <= penalty * (1 + 1e-6)
    torch.testing.assert_close(W.norm(dim=0), torch.ones(10, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(5))
def test_sparse_coding_start_lies_near_the_bars(seed):
    """The default bars (rank 9, 10 bars): the MAP start is within |cos| 0.9 of every bar, where a random
    start is not."""
    data, x = _bars(grid=5, n_data=1000, seed=seed)
    start = torch.randn(25, 10, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    W = SparseCodingDictionary()(x, start, torch.Generator().manual_seed(seed))
    assert match_fields(W.numpy(), data.W_true).min_cosine >= 0.9
    assert match_fields(start.numpy(), data.W_true).min_cosine < 0.9
    assert RandomDictionary()(x, start, torch.Generator()) is start


def test_unused_atoms_restart_at_data_points():
    """Ten atoms for data with two directions and a penalty that leaves most atoms unused: every column
    stays finite with unit norm, and the two directions are found."""
    generator = torch.Generator().manual_seed(0)
    directions = torch.eye(6, dtype=torch.float64)[:, :2]
    x = torch.randn(200, 2, generator=generator, dtype=torch.float64) ** 3 @ directions.T
    W = SparseCodingDictionary(sparsity=2.0, iterations=20)(
        x, torch.randn(6, 10, generator=generator, dtype=torch.float64), generator
    )
    assert bool(torch.isfinite(W).all())
    torch.testing.assert_close(W.norm(dim=0), torch.ones(10, dtype=torch.float64))
    assert match_fields(W.numpy(), directions.numpy()).min_cosine > 0.99


@pytest.mark.parametrize("family", [FullCovariancePosterior, DiagonalPosterior], ids=["full", "diag"])
def test_profile_trainer_learns_the_bars_and_converges(family):
    data, x = _bars(grid=3, n_data=300, seed=1)
    model = SparseCodingModel(9, 6, generator=torch.Generator().manual_seed(1)).double()
    posterior = family(n_data=300, n_latents=6).double()
    problem = Problem(x=x, model=model, posterior=posterior, objective=EntropyELBO(), annealing=NoAnnealing(), seed=1)
    values = []

    def evaluate(epoch, weights, train_time):
        value = EntropyELBO()(x, posterior(), model)
        values.append(float(value.elbo.detach()))
        return value

    outcome = fit(ProfileLBFGSTrainer(max_epochs=60, initialisation=SparseCodingDictionary()), problem, evaluate)
    assert outcome.converged and outcome.stop_reason == "converged", outcome
    if family is FullCovariancePosterior:
        assert match_fields(model.W.detach().numpy(), data.W_true).recovered
    assert all(b >= a - 1e-9 for a, b in zip(values, values[1:]))  # the profile never falls between epochs
    if family is FullCovariancePosterior:
        # the posterior written after the last epoch is the fixed-point optimum at the final W: a cold fit
        # gains nothing. (Diagonal q at the rank-deficient bars has several stationary points, and a cold fit
        # can end in another one: 0.004 nats higher on this problem; see trainers/profile.py.)
        cold = FixedPointFit(x, model.W.detach(), model.prior, full=True)
        cold.run(5000, 0.0, 30)
        assert float(cold.value) <= values[-1] + 1e-6


def test_default_cli_configuration_recovers_the_default_bars(tmp_path):
    """The shipped default (profile L-BFGS from the sparse-coding start) on the authors' bars, seed 3."""
    cfg = sparse_elbo.compose(["seed=3"])
    summary = run(cfg, tmp_path, progress=False)
    assert summary.stop_reason == "converged"
    assert summary.recovered and summary.elbo >= summary.ground_truth_elbo - 0.05
    assert np.isfinite(summary.train_time)


def test_the_sparse_coding_start_on_a_subset_is_the_start_learned_from_those_rows():
    """``n_points`` rows drawn with the generator, then the same algorithm on them (bit for bit); a subset at
    least the data's size is all of it."""
    x = torch.as_tensor(make_bars(grid=3, n_data=50, noise=0.1, seed=4).x)
    W = torch.randn(x.shape[1], 6, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    generator = torch.Generator().manual_seed(6)
    start = SparseCodingDictionary(iterations=15, n_points=20)(x, W, generator)
    replay = torch.Generator().manual_seed(6)
    rows = torch.randperm(50, generator=replay)[:20]
    assert torch.equal(start, SparseCodingDictionary(iterations=15)(x[rows], W, replay))
    assert not torch.allclose(start, SparseCodingDictionary(iterations=15)(x, W, torch.Generator().manual_seed(6)))
    whole = SparseCodingDictionary(iterations=15, n_points=50)(x, W, torch.Generator().manual_seed(6))
    assert torch.equal(whole, SparseCodingDictionary(iterations=15)(x, W, torch.Generator().manual_seed(6)))
    with pytest.raises(ConfigError, match="^n_points must be >= 1"):
        SparseCodingDictionary(n_points=0)
