"""Inpainting (sparse_elbo.inpaint): the masked ELBO against the project's analytic ELBO (nothing missing) and
a Monte Carlo estimate (pixels missing), the M-step's stationarity, the gauge's invariance, the recovery of a
masked image whose every patch is a combination of known atoms, and the one-line refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparse_elbo.errors import ConfigError, MissingFileError
from sparse_elbo.gaussians import DiagonalGaussian
from sparse_elbo.inpaint import MaskedPatches, gauge, inpaint_image, m_step, main, masked_elbo
from sparse_elbo.model import ModelAt, SparseCodingModel
from sparse_elbo.objectives import AnalyticELBO
from sparse_elbo.priors import LaplacePrior

D, H, N = 9, 5, 7


def _problem(seed: int = 0, missing_share: float = 0.4):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, H, generator=g, dtype=torch.float64)
    W = W / W.norm(dim=0)
    model = ModelAt(
        W, torch.tensor(0.3, dtype=torch.float64), torch.rand(H, generator=g, dtype=torch.float64) + 0.5, LaplacePrior()
    )
    missing = torch.rand(N, D, generator=g) < missing_share
    missing[:, 0] = False  # every patch keeps a pixel
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    data = MaskedPatches((~missing) * x, (~missing).double(), torch.zeros(N, 1, dtype=torch.float64))
    mean = torch.randn(N, H, generator=g, dtype=torch.float64)
    log_std = torch.rand(N, H, generator=g, dtype=torch.float64).log() - 0.5
    return data, model, mean, log_std


def test_with_nothing_missing_the_masked_elbo_is_the_analytic_elbo():
    data, model, mean, log_std = _problem(missing_share=0.0)
    reference = SparseCodingModel(D, H, prior=LaplacePrior()).double()
    reference.set_dictionary(model.W)
    reference.set_noise_and_prior_scale(model.sigma2, model.lam)
    q = DiagonalGaussian(mean, log_std.exp())
    expected = AnalyticELBO()(data.x, q, reference).per_point
    torch.testing.assert_close(masked_elbo(data, model, mean, log_std), expected, rtol=1e-12, atol=1e-12)


def test_with_pixels_missing_the_masked_elbo_is_the_elbo_of_the_observed_pixels_by_monte_carlo():
    """``E_q[log N(x_o; W_o z, σ²) + log p(z) - log q(z)]`` from 400,000 samples of each q."""
    data, model, mean, log_std = _problem(seed=1)
    g = torch.Generator().manual_seed(2)
    z = mean + log_std.exp() * torch.randn(400_000, N, H, generator=g, dtype=torch.float64)  # (S,N,H)
    residual = ((data.x - z @ model.W.T) * data.observed).pow(2).sum(-1)  # (S,N)
    log_lik = -0.5 * data.observed.sum(1) * math.log(2 * math.pi * model.sigma2) - residual / (2 * model.sigma2)
    log_prior = -(torch.log(2 * model.lam) + z.abs() / model.lam).sum(-1)
    log_q = torch.distributions.Normal(mean, log_std.exp()).log_prob(z).sum(-1)
    samples = log_lik + log_prior - log_q  # (S,N)
    estimate, stderr = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    assert (masked_elbo(data, model, mean, log_std) - estimate).abs().max() < 5 * stderr.max()


def test_the_m_step_is_where_the_masked_elbo_is_stationary_in_w_sigma2_and_lambda():
    data, _, mean, log_std = _problem(seed=3)
    model = m_step(data, mean, log_std, LaplacePrior(), ridge=0.0)
    W, sigma2, lam = (t.clone().requires_grad_(True) for t in (model.W, model.sigma2, model.lam))
    masked_elbo(data, ModelAt(W, sigma2, lam, LaplacePrior()), mean, log_std).sum().backward()
    for gradient in (W.grad, sigma2.grad, lam.grad):
        assert gradient.abs().max() < 1e-9


def test_the_gauge_gives_unit_columns_and_leaves_every_elbo_unchanged():
    data, model, mean, log_std = _problem(seed=4)
    stretched = ModelAt(model.W * torch.linspace(0.5, 3.0, H, dtype=torch.float64), model.sigma2, model.lam, model.prior)
    gauged, new_mean, new_log_std = gauge(stretched, mean, log_std)
    torch.testing.assert_close(gauged.W.norm(dim=0), torch.ones(H, dtype=torch.float64))
    torch.testing.assert_close(masked_elbo(data, gauged, new_mean, new_log_std), masked_elbo(data, stretched, mean, log_std))


def _gratings(size: int = 48) -> np.ndarray:
    """An image whose every 8×8 patch is its mean plus a combination of six known atoms: the cosines and sines
    of three plane waves."""
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    waves = [(0.35, 0.1), (-0.2, 0.45), (0.6, -0.3)]
    return 0.5 + sum(0.12 * np.cos(a * rows + b * cols + k) for k, (a, b) in enumerate(waves))


def test_half_the_pixels_of_a_gratings_image_are_recovered():
    clean = _gratings()
    missing = np.random.default_rng(0).random(clean.shape) < 0.5
    filled = inpaint_image(clean, missing, n_latents=8, epochs=15, dtype=torch.float64)
    np.testing.assert_array_equal(filled[~missing], clean[~missing])  # observed pixels kept
    error = np.sqrt(np.mean((filled - clean)[missing] ** 2))
    baseline = np.sqrt(np.mean((clean[~missing].mean() - clean)[missing] ** 2))  # the observed mean
    assert error < 0.05 * baseline


def test_bad_masks_are_one_line_errors():
    image = _gratings(16)
    for mask, message in (
        (np.zeros((16, 15), bool), r"^mask must have the image's shape \(16, 16\), got \(16, 15\)$"),
        (np.ones((16, 16), bool), r"^mask leaves no pixel observed: nothing to learn from$"),
        (np.full((16, 16), 0.5), r"^mask must hold booleans or 0/1 \(True / 1 = missing\)$"),
    ):
        with pytest.raises(ConfigError, match=message):
            inpaint_image(image, mask)
    with pytest.raises(ConfigError, match=r"^image must be a 2-D grey image, got shape \(16,\)$"):
        inpaint_image(np.zeros(16), np.zeros(16, bool))
    assert np.array_equal(inpaint_image(image, np.zeros((16, 16), bool)), image)  # nothing to fill


def test_the_inpaint_command_fills_an_image_and_refuses_a_mask_of_another_shape(tmp_path, capsys):
    image = _gratings(24)
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "mask.npy", np.random.default_rng(1).random(image.shape) < 0.5)
    np.save(tmp_path / "small.npy", np.zeros((5, 5), bool))
    main([f"image={tmp_path / 'image.npy'}", f"mask={tmp_path / 'mask.npy'}", f"out={tmp_path / 'out.npy'}", "epochs=3"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "out.npy")
    assert np.load(tmp_path / "out.npy").shape == image.shape
    with pytest.raises(ConfigError, match=r"^mask must have the image's shape \(24, 24\), got \(5, 5\)$"):
        main([f"image={tmp_path / 'image.npy'}", f"mask={tmp_path / 'small.npy'}", f"out={tmp_path / 'again.npy'}"])
    with pytest.raises(MissingFileError, match=r"^mask='.*nothing\.npy': no such file$"):
        main([f"image={tmp_path / 'image.npy'}", f"mask={tmp_path / 'nothing.npy'}", f"out={tmp_path / 'again.npy'}"])
    assert not (tmp_path / "again.npy").exists()
