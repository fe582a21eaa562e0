"""Using a trained model on new data: encode, reconstruct, score (ELBO, log p(x)), the encode command line,
and image denoising."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import skimage.restoration
import torch

import sparse_elbo
from sparse_elbo import denoise, encode
from sparse_elbo.cli import run_tool
from sparse_elbo.denoise import average_patches, denoise_image, image_patches, psnr
from sparse_elbo.model import SparseCodingModel
from sparse_elbo.posteriors import DiagonalPosterior
from sparse_elbo.runner import build
from sparse_elbo.trained import TrainedModel

BARS = ["dataset.grid=3", "dataset.n_data=300", "seed=1", "trainer.max_epochs=40", "evaluation.ground_truth=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3×3 bars run (full covariances, the default profile trainer): its results file and data."""
    root = tmp_path_factory.mktemp("trained")
    cfg = sparse_elbo.compose(BARS)
    summary = sparse_elbo.run(cfg, root / "run", progress=False)
    x = build(cfg).problem.x.numpy()
    return summary.results_path, x


def test_encoding_the_training_data_reproduces_the_stored_posteriors(trained):
    """At the trained W, σ²* and λ* every stored q_n is the optimum of its own ELBO (envelope theorem), so
    fitting the training data afresh, with W, σ², λ fixed, lands on the stored posteriors and ELBO."""
    path, x = trained
    results = sparse_elbo.read_results(path)
    model = sparse_elbo.load(path)
    assert model.family == "full" and (model.n_observed, model.n_latents) == (9, 6)
    codes = model.encode(x, iterations=3000)
    np.testing.assert_allclose(codes.mean, results.final["posterior"]["mean"], rtol=0, atol=2e-4)
    np.testing.assert_allclose(codes.scale_tril, results.final["posterior"]["scale_tril"], rtol=0, atol=2e-4)
    assert float(np.mean(codes.elbo)) == pytest.approx(float(results.final["elbo"]), abs=1e-6)
    assert codes.std is None


def _generated(n=400, noise=0.1, seed=0):
    """Data from a known model: a random 9×6 dictionary (full column rank, so every row's posterior has one
    optimum), Laplace sources of scale 1, Gaussian noise."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(9, 6))
    z = rng.laplace(size=(n, W.shape[1]))
    clean = z @ W.T
    return clean + noise * rng.standard_normal(clean.shape), clean, W


def _known_model(W, noise, family=DiagonalPosterior):
    model = SparseCodingModel(*W.shape).double()
    model.set_dictionary(torch.as_tensor(W))
    norms = torch.as_tensor(np.linalg.norm(W, axis=0))
    model.set_noise_and_prior_scale(torch.tensor(noise**2, dtype=torch.float64), norms)  # λ = 1 in the unit-norm gauge
    return TrainedModel(model, family(n_data=1, n_latents=W.shape[1]).double())


def test_reconstruction_of_data_from_the_model_is_closer_to_the_clean_data_than_the_noise():
    noisy, clean, W = _generated()
    model = _known_model(W, 0.1)
    reconstruction = model.reconstruct(noisy)
    assert isinstance(reconstruction, np.ndarray) and reconstruction.shape == noisy.shape
    error, noise = np.mean((reconstruction - clean) ** 2), np.mean((noisy - clean) ** 2)
    # within the noise: the 6 fields span 6 of the 9 dimensions, so the posterior mean keeps at most about
    # 6/9 of the noise (its projection onto them) and shrinks that a little more
    rank = np.linalg.matrix_rank(W)
    assert error < 1.05 * rank / W.shape[0] * noise and error > 0.5 * rank / W.shape[0] * noise
    as_tensor = model.reconstruct(torch.as_tensor(noisy))
    assert torch.is_tensor(as_tensor)
    np.testing.assert_allclose(as_tensor.numpy(), reconstruction, atol=1e-10)


def test_log_px_and_elbo_are_exact_where_the_posterior_is_gaussian():
    """Oracle: under a Gaussian prior the posterior is Gaussian, a fitted full-covariance q is exact, and both
    the ELBO and importance-sampled log p(x) equal log N(x; 0, W Λ Wᵀ + σ² I) (torch.distributions)."""
    from sparse_elbo.posteriors import FullCovariancePosterior
    from sparse_elbo.priors import GaussianPrior

    noisy, _, W = _generated(n=40)
    model = SparseCodingModel(*W.shape, prior=GaussianPrior()).double()
    W_unit = W / np.linalg.norm(W, axis=0)
    model.set_dictionary(torch.as_tensor(W_unit))
    variances = torch.linspace(0.5, 2.0, W.shape[1], dtype=torch.float64)
    model.set_noise_and_prior_scale(torch.tensor(0.01, dtype=torch.float64), variances)
    trained = TrainedModel(model, FullCovariancePosterior(n_data=1, n_latents=W.shape[1]).double())
    W_t = torch.as_tensor(W_unit)
    exact = torch.distributions.MultivariateNormal(
        torch.zeros(9, dtype=torch.float64), W_t @ torch.diag(variances) @ W_t.T + 0.01 * torch.eye(9, dtype=torch.float64)
    )
    reference = exact.log_prob(torch.as_tensor(noisy)).numpy()
    np.testing.assert_allclose(trained.elbo(noisy, iterations=2000), reference, atol=1e-6)
    log_px = trained.log_px(noisy, samples=50, iterations=2000)
    np.testing.assert_allclose(log_px.per_row, reference, atol=1e-5)
    assert np.all(log_px.stderr < 1e-4)  # every importance weight is the same: q is the posterior


def test_a_dictionary_learned_elsewhere_learns_the_noise_level_of_new_data():
    """``with_scales_fitted_to``: W kept, σ², λ refitted to the data (max_q L_H at that W); on data from the
    model the noise level comes out as the generating one, and the original model is left as it was."""
    noisy, _, W = _generated(n=2000)
    wrong = _known_model(W, 1.0)  # σ = 1, ten times the noise
    fitted = wrong.with_scales_fitted_to(noisy)
    assert float(fitted.model.sigma2.detach().sqrt()) == pytest.approx(0.1, rel=0.03)
    np.testing.assert_allclose(
        fitted.model.lam.detach().numpy(), np.linalg.norm(W, axis=0), rtol=0.1
    )  # λ = 1 per unit of ||W_h||
    assert float(wrong.model.sigma2.detach()) == pytest.approx(1.0)
    torch.testing.assert_close(fitted.model.W, wrong.model.W)


def test_float32_and_blocks_give_the_same_codes():
    noisy, _, W = _generated(n=50)
    model = _known_model(W, 0.1)
    whole = model.encode(noisy, iterations=1000)
    blocks = model.encode(noisy, iterations=1000, batch_size=7)
    np.testing.assert_allclose(blocks.mean, whole.mean, atol=1e-5)
    model32 = TrainedModel(model.model.float(), model.posterior.float())
    np.testing.assert_allclose(model32.encode(noisy.astype(np.float32), iterations=1000).mean, whole.mean, atol=2e-3)


def test_an_amortised_model_encodes_with_its_trained_encoder(tmp_path):
    cfg = sparse_elbo.compose(
        [
            "experiment=bars_amortized",
            "dataset.grid=3",
            "dataset.n_data=200",
            "trainer.max_epochs=3",
            "evaluation.held_out_refine_iterations=5",
            "evaluation.importance_samples=5",
        ]
    )
    summary = sparse_elbo.run(cfg, tmp_path / "run", progress=False)
    model = sparse_elbo.load(summary.results_path)
    x = np.random.default_rng(0).normal(size=(20, 9))
    with torch.no_grad():
        encoder_q = model.posterior(torch.as_tensor(x))
    raw = model.encode(x, refine=False)
    np.testing.assert_allclose(raw.mean, encoder_q.mean.numpy(), atol=1e-12)
    refined = model.encode(x, iterations=200)
    assert refined.scale_tril.shape == (20, 6, 6)  # a low-rank encoder refines as a full covariance
    assert np.mean(refined.elbo) >= np.mean(raw.elbo) - 1e-6


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda x: x[:, :5], r"data must have shape \(N, 9\) for this model \(D = 9\), got shape \(10, 5\)"),
        (lambda x: np.where(np.arange(10)[:, None] == 3, np.nan, x), r"data holds NaN/Inf values in 1 rows \(first: \[3\]\)"),
        (lambda x: x[0], r"data must have shape \(N, 9\)"),
    ],
)
def test_bad_data_is_rejected_before_compute(trained, make, message):
    path, x = trained
    with pytest.raises(ValueError, match=message):
        sparse_elbo.load(path).encode(make(x[:10]))


def test_the_api_names_its_own_arguments_not_the_run_configs(trained):
    """``model.log_px(x, samples=1)`` says ``samples``, as the caller wrote it (not ``evaluation.importance_samples``)."""
    path, x = trained
    model = sparse_elbo.load(path)
    with pytest.raises(ValueError, match=r"^samples must be >= 2, got 1$"):
        model.log_px(x[:3], samples=1)
    with pytest.raises(ValueError, match=r"^batch_size must be >= 1, got 0$"):
        model.encode(x[:3], batch_size=0)


def test_results_of_an_unfinished_run_or_a_missing_file_are_rejected(trained, tmp_path):
    path, _ = trained
    broken = tmp_path / "results.h5"
    broken.write_bytes(path.read_bytes())
    with h5py.File(broken, "a") as f:
        f.attrs["status"], f.attrs["reason"] = "interrupted", "KeyboardInterrupt()"
    with pytest.raises(
        ValueError, match=r"the run is interrupted \(KeyboardInterrupt\(\)\); only a finished run holds a trained model"
    ):
        sparse_elbo.load(broken)
    with pytest.raises(FileNotFoundError, match="no such results file"):
        sparse_elbo.load(tmp_path / "missing.h5")


def _tool(name, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, "-m", f"sparse_elbo.{name}", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_the_encode_command_writes_codes_and_elbo_beside_the_data(trained, tmp_path):
    path, x = trained
    np.save(tmp_path / "new.npy", x[:25])
    out = _tool("encode", f"results={path}", f"data={tmp_path / 'new.npy'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    with h5py.File(tmp_path / "new.codes.h5", "r") as f:
        assert f["codes/mean"].shape == (25, 6) and f["codes/scale_tril"].shape == (25, 6, 6) and f["elbo"].shape == (25,)
        assert f.attrs["family"] == "full"
        expected = sparse_elbo.load(path).encode(x[:25])
        np.testing.assert_allclose(f["codes/mean"][()], expected.mean, atol=1e-10)
    again = _tool("encode", f"results={path}", f"data={tmp_path / 'new.npy'}", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr  # never overwritten
    np.save(tmp_path / "wide.npy", np.ones((4, 11)))
    for arguments, message in (
        ([f"data={tmp_path / 'wide.npy'}", f"results={path}"], "data must have shape (N, 9)"),
        ([f"data={tmp_path / 'new.npy'}"], "give the model as results=PATH"),
        ([f"results={path}", f"data={tmp_path / 'nothing.npy'}"], "no such file"),
        ([f"results={path}", f"data={tmp_path / 'new.npy'}", "batch_size=zero"], "batch_size"),
    ):
        bad = _tool("encode", *arguments, f"out={tmp_path / 'x.h5'}", cwd=tmp_path)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and message in bad.stderr, bad.stderr
        assert not (tmp_path / "x.h5").exists()


# ------------------------------------------------------------------------------------------------ denoising


@pytest.mark.parametrize("stride", [1, 3])
def test_patches_average_back_into_the_image(stride):
    image = np.random.default_rng(0).normal(size=(17, 13))
    patches = image_patches(image, 5, stride)
    np.testing.assert_allclose(average_patches(patches, image.shape, 5, stride), image, atol=1e-12)


def _synthetic_image(size=40, seed=0):
    """Piecewise-constant rectangles on a smooth ramp, in [0, 1]."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size] / size
    image = 0.3 + 0.2 * rows
    for _ in range(6):
        top, left = rng.integers(0, size - 8, 2)
        image[top : top + rng.integers(5, 15), left : left + rng.integers(5, 15)] = rng.uniform(0, 1)
    return image


def test_blind_denoising_raises_the_psnr_of_a_noisy_synthetic_image():
    clean = _synthetic_image()
    noisy = clean + 0.1 * np.random.default_rng(1).standard_normal(clean.shape)
    overrides = ("n_latents=12", "trainer.max_epochs=5", "annealing.start=3", "annealing.step=1", "device=cpu")
    denoised = denoise_image(noisy, patch_size=6, overrides=overrides)
    assert denoised.shape == clean.shape
    assert psnr(clean, denoised) > psnr(clean, noisy) + 3.0
    # a baseline: scikit-image's wavelet denoiser (BayesShrink) given the estimated noise level; TV and NL-means
    # are ahead of sparse_elbo here too, as on photographs (docs/benchmarks.md, "Image denoising")
    sigma = skimage.restoration.estimate_sigma(noisy)
    wavelet = skimage.restoration.denoise_wavelet(noisy, sigma=sigma, method="BayesShrink", mode="soft", rescale_sigma=True)
    assert psnr(clean, denoised) > psnr(clean, wavelet) + 0.5


@pytest.mark.slow
def test_the_denoise_command_writes_the_denoised_image(tmp_path):
    clean = _synthetic_image()
    np.save(tmp_path / "noisy.npy", clean + 0.1 * np.random.default_rng(1).standard_normal(clean.shape))
    out = _tool("denoise", f"image={tmp_path / 'noisy.npy'}", f"out={tmp_path / 'clean.npy'}", "patch_size=6", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    denoised = np.load(tmp_path / "clean.npy")
    assert psnr(clean, denoised) > psnr(clean, np.load(tmp_path / "noisy.npy")) + 3.0
    missing = _tool("denoise", f"image={tmp_path / 'nothing.png'}", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: image={str(tmp_path / 'nothing.png')!r}: no such file"


def test_denoising_rejects_a_model_of_another_patch_size(trained):
    path, _ = trained
    with pytest.raises(ValueError, match="is not a 5 patch's pixel count"):
        denoise_image(np.zeros((20, 20)), sparse_elbo.load(path), patch_size=5)
    with pytest.raises(ValueError, match="image holds NaN/Inf values"):
        denoise_image(np.full((20, 20), np.nan), sparse_elbo.load(path))


# ---------------------------------------------------------------------------- the tools' user errors, in-process


def test_encode_checks_the_device_as_train_does(trained, tmp_path, monkeypatch, one_line_error):
    path, x = trained
    np.save(tmp_path / "new.npy", x[:5])
    given = [f"results={path}", f"data={tmp_path / 'new.npy'}"]
    line = one_line_error(lambda: run_tool(encode.main, [*given, "device=tpu"]))
    assert line == "error: device must be one of ['cpu', 'cuda', 'auto'], got 'tpu'"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA
    line = one_line_error(lambda: run_tool(encode.main, [*given, "device=cuda"]))
    assert line == "error: device=cuda but no CUDA device is available; use device=cpu or device=auto"
    run_tool(encode.main, [*given, "device=auto", f"out={tmp_path / 'auto.h5'}"])  # auto: the CPU here
    with h5py.File(tmp_path / "auto.h5", "r") as f:
        assert f["codes/mean"].shape == (5, 6)


def test_encode_refuses_a_missing_output_folder_and_files_that_are_not_arrays_before_any_fit(
    trained, tmp_path, monkeypatch, one_line_error
):
    path, x = trained
    np.save(tmp_path / "new.npy", x[:5])
    fits = []
    monkeypatch.setattr(TrainedModel, "encode", lambda self, *args, **kwargs: fits.append(args))
    out = tmp_path / "nowhere" / "codes.h5"
    line = one_line_error(lambda: run_tool(encode.main, [f"results={path}", f"data={tmp_path / 'new.npy'}", f"out={out}"]))
    assert line == f"error: out={str(out)!r}: no such folder {str(out.parent)!r}; create it first or choose another out="
    notes = tmp_path / "notes.npy"
    notes.write_text("notes, not an array\n")
    line = one_line_error(lambda: run_tool(encode.main, [f"results={path}", f"data={notes}"]))
    assert line.startswith(f"error: data={str(notes)!r}: could not read the file as a .npy array (")
    np.savez(tmp_path / "two.npz", a=x[:5], b=x[:5])
    line = one_line_error(lambda: run_tool(encode.main, [f"results={path}", f"data={tmp_path / 'two.npz'}", "key=c"]))
    assert line == f"error: key='c' not found in {tmp_path / 'two.npz'}; available keys: ['a', 'b']"
    junk = tmp_path / "results.h5"
    junk.write_text("not HDF5")
    line = one_line_error(lambda: run_tool(encode.main, [f"results={junk}", f"data={tmp_path / 'new.npy'}"]))
    assert line == f"error: {str(junk)!r}: not a results file (not HDF5)"
    assert (
        fits == []
        and not out.parent.exists()
        and sorted(p.name for p in tmp_path.iterdir())
        == [
            "new.npy",
            "notes.npy",
            "results.h5",
            "two.npz",
        ]
    )


@pytest.mark.filterwarnings("ignore:The legacy `DICOM` plugin:DeprecationWarning")  # imageio trying its plugins
def test_denoise_refuses_what_is_not_an_image_and_a_missing_output_folder_before_learning(tmp_path, monkeypatch, one_line_error):
    learned = []
    monkeypatch.setattr(denoise, "denoise_image", lambda *args, **kwargs: learned.append(args))
    notes = tmp_path / "notes.png"
    notes.write_text("notes, not an image\n")
    line = one_line_error(lambda: run_tool(denoise.main, [f"image={notes}"]))
    assert line.startswith(f"error: image={str(notes)!r}: could not read the file as an image (")
    (tmp_path / "notes.npy").write_text("notes, not an array\n")
    line = one_line_error(lambda: run_tool(denoise.main, [f"image={tmp_path / 'notes.npy'}"]))
    assert line.startswith(f"error: image={str(tmp_path / 'notes.npy')!r}: could not read the file as a .npy array (")
    image = tmp_path / "noisy.npy"
    np.save(image, _synthetic_image())
    out = tmp_path / "nowhere" / "clean.png"
    line = one_line_error(lambda: run_tool(denoise.main, [f"image={image}", f"out={out}"]))
    assert line == f"error: out={str(out)!r}: no such folder {str(out.parent)!r}; create it first or choose another out="
    line = one_line_error(lambda: run_tool(denoise.main, [f"image={image}", f"out={tmp_path / 'clean.txt'}"]))
    assert (
        line == f"error: out={str(tmp_path / 'clean.txt')!r}: unsupported file type '.txt'; allowed: {list(denoise.OUT_SUFFIXES)}"
    )
    junk = tmp_path / "results.h5"
    junk.write_text("not HDF5")
    line = one_line_error(lambda: run_tool(denoise.main, [f"image={image}", f"results={junk}"]))
    assert line == f"error: {str(junk)!r}: not a results file (not HDF5)"
    assert learned == [] and not out.parent.exists()
