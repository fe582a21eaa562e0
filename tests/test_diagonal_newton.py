"""The O(N·H²) fit of diagonal posteriors at a fixed dictionary (inference/diagonal_newton.py) and
``score_dictionary`` built on it, in float64.

Oracles: the (N,H,H) fixed-point fit and L-BFGS block coordinate ascent (independent algorithms) on the
same problem; the package's ``EntropyELBO`` and autograd for the value and stationarity.
"""

from __future__ import annotations

import pytest
import torch

import sparse_elbo
from sparse_elbo.errors import ConfigError
from sparse_elbo.inference.diagonal_newton import DiagonalNewtonFit
from sparse_elbo.inference.fit import BlockFit
from sparse_elbo.inference.fixed_point import FixedPointFit
from sparse_elbo.model import SparseCodingModel
from sparse_elbo.objectives import EntropyELBO
from sparse_elbo.posteriors import DiagonalPosterior
from sparse_elbo.priors import LaplacePrior


def _sparse_data(n=400, D=12, H=8, seed=0, dtype=torch.float64):
    """Laplace codes through a random unit-norm dictionary, plus noise: x (N,D), W (D,H)."""
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(D, H, generator=generator, dtype=dtype)
    W = W / W.norm(dim=0)
    codes = LaplacePrior().sample((n, H), generator).to(dtype)
    return codes @ W.T + 0.1 * torch.randn(n, D, generator=generator, dtype=dtype), W


@pytest.mark.parametrize("seed", [0, 6])
def test_newton_fit_reaches_the_optimum_of_the_fixed_point_fit(seed):
    x, W = _sparse_data(seed=seed)
    newton = DiagonalNewtonFit(x, W)
    assert newton.run(500, 1e-13)
    reference = FixedPointFit(x, W, LaplacePrior(), full=False)
    assert reference.run(2000, 1e-13, 30)
    assert float(newton.value) == pytest.approx(float(reference.value), abs=1e-8)


def test_an_ill_conditioned_dictionary_converges_in_few_iterations():
    """Correlated columns (cond(G) ≈ 800): CG must run to its tolerance, not a fixed handful of iterations
    (with 4 per iteration the fit is still 0.03 nats short after 30 iterations)."""
    x, W = _sparse_data()
    W = W + 0.9 * torch.roll(W, 1, dims=1)
    W = W / W.norm(dim=0)
    reference = FixedPointFit(x, W, LaplacePrior(), full=False)
    assert reference.run(5000, 1e-13, 30)
    fit = DiagonalNewtonFit(x, W)
    for _ in range(30):
        fit.step()
    assert float(fit.value) == pytest.approx(float(reference.value), abs=1e-4)


def test_every_iteration_raises_l_h_and_the_end_is_stationary():
    x, W = _sparse_data()
    fit = DiagonalNewtonFit(x, W, block_size=150)  # three blocks, the last one short
    values = [float(fit.step()) for _ in range(40)]
    assert all(after >= before - 1e-12 for before, after in zip(values, values[1:]))
    assert values[-1] - values[0] > 0.1  # it did move

    model = SparseCodingModel(W.shape[0], W.shape[1], prior=LaplacePrior()).double()
    model.set_dictionary(W)
    posterior = DiagonalPosterior(n_data=x.shape[0], n_latents=W.shape[1]).double()
    fit.write_to(posterior, model)
    value = EntropyELBO()(x, posterior.q(x), model).elbo
    assert float(value.detach()) == pytest.approx(values[-1], abs=1e-10)  # the fit's own L_H is the package's
    gradients = torch.autograd.grad(x.shape[0] * value, list(posterior.parameters()))
    assert max(float(g.abs().max()) for g in gradients) < 1e-6  # ∂(N L_H)/∂ every posterior parameter


def test_a_warm_start_from_a_given_posterior_begins_at_its_l_h():
    x, W = _sparse_data(seed=2)
    generator = torch.Generator().manual_seed(3)
    mean = torch.randn(x.shape[0], W.shape[1], generator=generator, dtype=x.dtype)
    log_std = -1.0 + 0.3 * torch.randn(x.shape[0], W.shape[1], generator=generator, dtype=x.dtype)
    fit = DiagonalNewtonFit(x, W, mean=mean, log_std=log_std)
    model = SparseCodingModel(W.shape[0], W.shape[1], prior=LaplacePrior()).double()
    model.set_dictionary(W)
    q = DiagonalPosterior(n_data=x.shape[0], n_latents=W.shape[1]).double()
    with torch.no_grad():
        q.mean.copy_(mean)
        q.set_std(log_std.exp())
    assert float(fit.value) == pytest.approx(float(EntropyELBO()(x, q.q(x), model).elbo.detach()), abs=1e-10)
    assert float(fit.step()) > float(EntropyELBO()(x, q.q(x), model).elbo.detach())


def test_float32_in_blocks_agrees_with_float64():
    x, W = _sparse_data(n=1000, seed=4)
    exact = DiagonalNewtonFit(x, W)
    exact.run(300, 1e-13)
    single = DiagonalNewtonFit(x.float(), W.float(), block_size=256)
    single.run(300, 0.0)
    assert float(single.value) == pytest.approx(float(exact.value), abs=1e-4 * abs(float(exact.value)))


def test_score_dictionary_equals_lbfgs_block_coordinate_ascent():
    """The former route, L-BFGS on the full-data L_H per block (the entropy E-step without an M-step)."""
    x, W = _sparse_data(seed=5)
    score = sparse_elbo.score_dictionary(x, W, tolerance=1e-13)
    posterior = DiagonalPosterior(x.shape[0], W.shape[1]).double()
    model = SparseCodingModel(W.shape[0], W.shape[1]).double()
    model.set_dictionary(W)
    fit = BlockFit(x, W, LaplacePrior(), posterior, iterations=50)  # the generic fit of any per-data-point family
    fit.run(200, 0.0)
    fit.write_to(posterior, model)
    with torch.no_grad():
        reference = EntropyELBO()(x, posterior(), model)
    assert score.elbo == pytest.approx(float(reference.elbo), abs=1e-8)
    # The ELBO is flat at its maximum, so two optimisers that agree on it to float64 rounding (≈ 1e-12 here)
    # can still end σ²* apart by about 1e-6 of itself: with one thread, or with L-BFGS run to a zero tolerance,
    # the reference's σ²* moves by 1e-6 (relative) while its ELBO moves by 1e-12.
    assert score.sigma2 == pytest.approx(float(reference.sigma2), rel=1e-5)
    torch.testing.assert_close(score.lam, reference.lam, rtol=1e-6, atol=0.0)


def test_score_dictionary_names_the_allowed_families():
    x, W = _sparse_data(n=20)
    with pytest.raises(ConfigError, match=r"family must be one of \['diag', 'full'\], got 'lowrank'"):
        sparse_elbo.score_dictionary(x, W, family="lowrank")
