"""The authors' per-batch procedure (``trainer=authors_em``) against a float64 re-derivation of their update,
written here from the paper's equations with plain torch: a fresh q per batch (μ = 0, s = fresh_std, the
standard deviation itself a free signed number), L-BFGS on the batch's L_H, one gradient step on the raw W."""

from __future__ import annotations

import math

import pytest
import torch
from support import small_problem

from sparse_elbo.annealing import AnnealingWeights
from sparse_elbo.errors import ConfigError
from sparse_elbo.inference.e_step import BlockLBFGS
from sparse_elbo.posteriors import DiagonalPosterior, FullCovariancePosterior
from sparse_elbo.trainers.authors import AuthorsEMTrainer


def batch_entropy_elbo(x, W_raw, mean, std, prior_weight):
    """``L_H,β`` of one batch: ``-(D/2) log(2πe σ²*) - β Σ_h log(2e λ*_h) + mean_n Σ_h log|s_nh| + (H/2) log(2πe)``
    with ``σ²* = mean_n (||x_n - W μ_n||² + Σ_h s_nh² ||W_h||²) / D`` and ``λ*_h = mean_n E|z_nh|``,
    ``E|z| = s √(2/π) exp(-μ²/2s²) + μ erf(μ/(√2 s))``, W the column-normalised raw W."""
    B, D = x.shape
    W = W_raw / W_raw.norm(dim=0)
    s = std.abs()
    sigma2 = (((x - mean @ W.T) ** 2).sum() + (s**2 * (W**2).sum(0)).sum()) / (D * B)
    lam = (s * math.sqrt(2 / math.pi) * torch.exp(-0.5 * mean**2 / s**2) + mean * torch.erf(mean / (math.sqrt(2) * s))).mean(0)
    H = mean.shape[1]
    entropy = torch.log(s).sum(1).mean() + 0.5 * H * math.log(2 * math.pi * math.e)
    return -0.5 * D * torch.log(2 * math.pi * math.e * sigma2) - prior_weight * torch.log(2 * math.e * lam).sum() + entropy


def authors_epoch(x, W_raw, batch_size, iterations, fresh_std, learning_rate, prior_weight):
    """One epoch of their loop; returns the new raw W and every batch's final (μ, s)."""
    W_raw = W_raw.clone()
    means, stds = [], []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        mean = torch.zeros(xb.shape[0], W_raw.shape[1], dtype=x.dtype, requires_grad=True)
        std = torch.full_like(mean, fresh_std).requires_grad_(True)
        lbfgs = torch.optim.LBFGS([mean, std], history_size=20, max_iter=iterations, line_search_fn="strong_wolfe")

        def closure():
            lbfgs.zero_grad()
            loss = -batch_entropy_elbo(xb, W_raw, mean, std, prior_weight)
            loss.backward()
            return loss

        lbfgs.step(closure)
        W = W_raw.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(batch_entropy_elbo(xb, W, mean.detach(), std.detach(), prior_weight), W)
        W_raw = W_raw + learning_rate * grad
        means.append(mean.detach())
        stds.append(std.detach())
    return W_raw, torch.cat(means), torch.cat(stds)


@pytest.mark.parametrize("prior_weight", [1.0, 4.0])
def test_an_epoch_equals_the_float64_rederivation_of_the_authors_update(prior_weight):
    problem = small_problem("diag", n_data=60, seed=3)
    W0 = problem.model.W_raw.detach().clone()
    trainer = AuthorsEMTrainer(max_epochs=1, driver=BlockLBFGS(iterations=15, block_size=20), fresh_std=1.0, learning_rate=0.5)
    trainer.train_epoch(problem, trainer.start(problem, None), 0, AnnealingWeights(prior=prior_weight))
    W_ref, mean_ref, std_ref = authors_epoch(problem.x, W0, 20, 15, 1.0, 0.5, prior_weight)
    assert not torch.allclose(W_ref, W0, atol=1e-3)  # the reference moved W: the comparison is not vacuous
    assert bool((std_ref < 0).any()) or bool((std_ref.abs() < 0.5).any())  # L-BFGS moved s itself
    q = problem.posterior()
    torch.testing.assert_close(problem.model.W_raw.detach(), W_ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(q.mean, mean_ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(q.std, std_ref.abs(), rtol=0, atol=1e-9)


def test_the_scale_parameterisation_decides_where_a_partial_e_step_ends():
    """Same start, same Gaussians, another path: after a few L-BFGS iterations the two differ."""
    ends = {}
    for parameterisation in ("std", "log_std"):
        problem = small_problem("diag", n_data=40, seed=3)
        trainer = AuthorsEMTrainer(
            max_epochs=1, driver=BlockLBFGS(iterations=5, block_size=40), scale_parameterisation=parameterisation
        )
        trainer.train_epoch(problem, trainer.start(problem, None), 0, AnnealingWeights())
        ends[parameterisation] = problem.posterior().std
    assert (ends["std"] - ends["log_std"]).abs().max() > 1e-2


@pytest.mark.parametrize("family", [DiagonalPosterior, FullCovariancePosterior])
def test_a_signed_block_is_stored_as_the_same_gaussian(family):
    posterior = family(5, 4, init_std=0.3).double()
    block = posterior.fresh_signed_block(3, 1.0)
    generator = torch.Generator().manual_seed(0)
    block = {name: torch.randn(value.shape, generator=generator, dtype=torch.float64) for name, value in block.items()}
    scale = "std" if family is DiagonalPosterior else "diag"
    block[scale][0, 1] = -abs(block[scale][0, 1])  # at least one negative scale
    signed = posterior.signed_gaussian(block)
    index = torch.tensor([0, 2, 4])
    posterior.write_signed_block(index, block)
    stored = posterior(index)
    torch.testing.assert_close(stored.mean, signed.mean)
    torch.testing.assert_close(stored.entropy(), signed.entropy())
    if family is DiagonalPosterior:
        torch.testing.assert_close(stored.variance, signed.variance)
    else:
        covariance = signed.scale_tril @ signed.scale_tril.mT
        torch.testing.assert_close(stored.scale_tril @ stored.scale_tril.mT, covariance)
        assert bool((torch.diagonal(stored.scale_tril, dim1=-2, dim2=-1) > 0).all())


def test_an_unknown_scale_parameterisation_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"^scale_parameterisation must be one of \['std', 'log_std'\], got 'exp'"):
        AuthorsEMTrainer(scale_parameterisation="exp")
