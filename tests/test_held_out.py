"""Importance-sampled log p(x) (sparse_elbo/held_out.py) against the exact value of a one-latent model,
computed by quadrature: above the ELBO, converging to log p(x) within its standard error; refinement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from sparse_elbo.held_out import held_out_metrics, importance_log_weights, importance_sampled_log_px
from sparse_elbo.inference.e_step import BlockLBFGS
from sparse_elbo.inference.fit import refine
from sparse_elbo.model import SparseCodingModel
from sparse_elbo.objectives import AnalyticELBO
from sparse_elbo.posteriors import DiagonalPosterior

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _one_latent_model(D=3, sigma2=0.25, lam=0.8):
    model = SparseCodingModel(D, 1, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        model.W_raw.copy_(torch.tensor([[1.0], [-0.5], [0.3]], dtype=F64)[:D])
        model.log_sigma2.fill_(math.log(sigma2))
        model.log_lambda.fill_(math.log(lam))
    return model


def _exact_log_px(x: np.ndarray, model) -> np.ndarray:
    """``log ∫ N(x; w z, σ² I) Laplace(z; 0, λ) dz`` by adaptive quadrature (split at the kink z = 0)."""
    w = model.W.detach().numpy()[:, 0]
    sigma2, lam = float(model.sigma2.detach()), float(model.lam[0].detach())
    D = w.shape[0]
    out = []
    for xn in x:
        z_hat = float(w @ xn / (w @ w))  # where the likelihood peaks; the integrand is shifted by its log max

        def log_f(z):
            return (
                -0.5 * D * math.log(2 * math.pi * sigma2)
                - ((xn - w * z) ** 2).sum() / (2 * sigma2)
                - abs(z) / lam
                - math.log(2 * lam)
            )

        shift = max(log_f(z_hat), log_f(0.0))
        f = lambda z: math.exp(log_f(z) - shift)  # noqa: E731
        total = sum(integrate.quad(f, a, b, epsabs=0, epsrel=1e-12, limit=200)[0] for a, b in ((-np.inf, 0.0), (0.0, np.inf)))
        out.append(math.log(total) + shift)
    return np.array(out)


def test_importance_sampled_log_px_is_above_the_elbo_and_converges_to_quadrature():
    model = _one_latent_model()
    g = torch.Generator().manual_seed(1)
    x = torch.tensor([[1.2, -0.4, 0.5], [0.05, 0.1, -0.2], [-2.0, 1.1, -0.4], [0.6, -0.2, 0.9]], dtype=F64)
    exact = _exact_log_px(x.numpy(), model)
    posterior = refine(x, DiagonalPosterior(4, 1).double(), model, BlockLBFGS(iterations=100, tolerance=1e-12))
    q = posterior()
    with torch.no_grad():
        elbo = AnalyticELBO()(x, q, model).per_point.numpy()
    assert np.all(elbo < exact)  # the ELBO is a strict lower bound (q is Gaussian, the posterior is not)
    # E[log p̂_K] rises from the ELBO (K=1) towards log p(x): the K=20 estimator, averaged over 500 repeats
    log_w = importance_log_weights(x, q, model, 20 * 500, generator=g).view(500, 20, 4)
    repeats = (torch.logsumexp(log_w, 1) - math.log(20)).numpy()  # (500,N)
    mean, error = repeats.mean(0), repeats.std(0) / math.sqrt(500)
    # (+1e-5: where q is nearly the posterior the weights are constant but for rare draws past the kink z = 0,
    # which few repeats see, so the sample spread understates the estimator's uncertainty by about that much)
    assert np.all(mean > elbo - 3 * error) and np.all(mean < exact + 3 * error + 1e-5)
    assert np.mean(mean - elbo) > 0
    many = importance_sampled_log_px(x, q, model, n_samples=200_000, generator=g)
    error = np.abs(many.per_point.numpy() - exact)
    assert np.all(error < 5 * many.stderr_per_point.numpy() + 1e-6), (error, many.stderr_per_point)
    assert np.all(error < 2e-3)
    assert many.mean == pytest.approx(exact.mean(), abs=5 * many.stderr + 1e-6)
    assert many.stderr == pytest.approx(float(many.stderr_per_point.pow(2).sum().sqrt() / 4))


def test_refining_raises_the_elbo_and_the_held_out_metrics_are_consistent():
    model = _one_latent_model()
    x = torch.randn(30, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    fresh = DiagonalPosterior(30, 1).double()
    with torch.no_grad():
        before = float(AnalyticELBO()(x, fresh(), model).elbo)
    refined = refine(x, fresh, model, BlockLBFGS(iterations=100, tolerance=1e-12))
    with torch.no_grad():
        after = float(AnalyticELBO()(x, refined(), model).elbo)
    assert after > before
    assert all(p.requires_grad for p in model.parameters())  # the model is unfrozen again
    metrics = held_out_metrics(x, DiagonalPosterior(1, 1).double(), model, refine_iterations=100, importance_samples=500)
    assert metrics["held_out_elbo_refined"] == pytest.approx(after, abs=1e-6)
    assert metrics["held_out_log_px"] > metrics["held_out_elbo_refined"]
    assert "amortization_gap" not in metrics  # only for amortised posteriors
