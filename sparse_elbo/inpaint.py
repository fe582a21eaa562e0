"""Inpainting: the missing pixels of a grey image filled with the posterior-mean reconstruction of a sparse
coding model learned from the image's observed pixels alone (docs/design.md §12.4).

A patch's likelihood covers only its observed pixels ``o_n`` (its mean over them, ``m_n``, removed first):

    log p(x_n,o | z) = -(|o_n|/2) log(2πσ²) - Σ_{d∈o_n} (x_nd - m_n - W_d z)² / (2σ²)

so the analytic ELBO of a diagonal Gaussian ``q_n = N(μ_n, diag s_n²)`` under the Laplace prior is

    L_n = -(|o_n|/2) log(2πσ²) - Σ_{d∈o_n} [(x_nd - m_n - W_d μ_n)² + Σ_h W_dh² s_nh²] / (2σ²)
          - Σ_h [log(2λ_h) + E_q|z_nh| / λ_h] + Σ_h log s_nh + (H/2) log(2πe)

Variational EM on the patches: the E-step maximises ``Σ_n L_n`` over (μ, log s) with L-BFGS block by block
(``BlockLBFGS``); the M-step is closed form — for each pixel ``d`` one H×H solve

    W_d = (Σ_n o_nd x̃_nd μ_n)ᵀ (Σ_n o_nd (μ_n μ_nᵀ + diag s_n²))⁻¹,   σ² = Σ_n Σ_{d∈o_n} E_q(x̃_nd - W_d z)² / Σ_n |o_n|,
    λ_h = mean_n E_q|z_nh|

(``x̃ = x - m``), then W's columns are scaled to unit norm (λ and q with them: the same model). Every
overlapping patch of the image is then encoded with the learned model; each missing pixel is the mean of
``m_n + W_d μ_n`` over the patches that cover it; observed pixels are kept as given.

Command line: ``python -m sparse_elbo.inpaint image=PATH mask=PATH [out=PATH] [key=value ...]``. Settings:

    image       a grey or colour image file (read as grey, scaled to [0, 1]) or a .npy array (required)
    mask        the pixels to fill, the image's shape: an image file (white = missing) or a .npy array of
                booleans or 0/1 (True / 1 = missing), as scikit-image's inpaint_biharmonic takes it (required)
    out         the filled image (.png, .tif, .bmp, .jpg or .npy; default: beside the image), in a folder that
                exists; never overwritten
    patch_size  p of the p×p patches;  n_latents: H;  epochs: EM epochs;  n_patches: at most this many
                patches to learn from;  iterations: L-BFGS iterations per block and E-step;  seed

Everything is checked before anything is learned: a wrong setting, a mask of another shape or one that leaves
no pixel observed is one line ``error: …`` naming it, and exit status 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparse_elbo import closed_forms
from sparse_elbo.cli import output_file, run_tool, settings_from_arguments
from sparse_elbo.denoise import OUT_SUFFIXES, average_patches, image_patches, read_image, write_image
from sparse_elbo.errors import ConfigError
from sparse_elbo.inference.e_step import BlockLBFGS, autograd_loss
from sparse_elbo.model import ModelAt
from sparse_elbo.priors import LaplacePrior
from sparse_elbo.runner import memory
from sparse_elbo.validation import require_at_least


@dataclass
class MaskedPatches:
    """Patches with their observed pixels: ``x (N,D)`` centred on the mean of each patch's observed pixels
    (missing entries 0), ``observed (N,D)`` as 0/1, and the removed means ``dc (N,1)``."""

    x: torch.Tensor
    observed: torch.Tensor
    dc: torch.Tensor

    @classmethod
    def of(cls, patches: np.ndarray, missing: np.ndarray, dtype=torch.float32, fallback: float = 0.0) -> MaskedPatches:
        """From raw patches (M, D) and their missing-pixel mask (M, D); a patch with no observed pixel gets
        the mean ``fallback``."""
        observed = torch.as_tensor(~missing, dtype=dtype)  # (M,D)
        x = torch.as_tensor(patches, dtype=dtype) * observed
        count = observed.sum(1, keepdim=True)  # (M,1)
        dc = torch.where(count > 0, x.sum(1, keepdim=True) / count.clamp(min=1), torch.full_like(count, fallback))
        return cls((x - dc) * observed, observed, dc)


def masked_elbo(data: MaskedPatches, model: ModelAt, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """``L_n`` of the module docstring for each patch (``model.prior``'s expectation in place of the Laplace
    one for another prior): mean, log_std (N,H)  ->  (N,)"""
    variance = (2 * log_std).exp()
    residual = (data.x - mean @ model.W.T) * data.observed  # (N,D)
    trace = data.observed @ model.W.pow(2) * variance  # (N,H): Σ_{d∈o_n} W_dh² s_nh²
    energy = residual.pow(2).sum(1) + trace.sum(1)  # (N,)
    log_lik = -0.5 * data.observed.sum(1) * (closed_forms.LOG_2PI + torch.log(model.sigma2)) - energy / (2 * model.sigma2)
    log_prior = model.prior.expected_log_prob(mean, variance, model.lam)  # (N,)
    return log_lik + log_prior + closed_forms.gaussian_entropy_from_log_diag(log_std)


def m_step(data: MaskedPatches, mean: torch.Tensor, log_std: torch.Tensor, prior, ridge: float = 1e-9) -> ModelAt:
    """The closed-form W, σ², λ of the module docstring for fixed q (before the gauge)."""
    o, variance = data.observed, (2 * log_std).exp()  # (N,D), (N,H)
    cross = (o * data.x).T @ mean  # (D,H): Σ_n o_nd x̃_nd μ_n
    moments = torch.einsum("nd,nh,nk->dhk", o, mean, mean) + torch.diag_embed(o.T @ variance)  # (D,H,H)
    eye = torch.eye(mean.shape[1], dtype=mean.dtype, device=mean.device)
    W = torch.linalg.solve(moments + ridge * eye, cross.unsqueeze(-1)).squeeze(-1)  # (D,H)
    residual = ((data.x - mean @ W.T) * o).pow(2).sum() + (o @ W.pow(2) * variance).sum()
    lam = closed_forms.optimal_lambda(prior.statistic(mean, variance).sum(0), len(mean))  # (H,)
    return ModelAt(W, residual / o.sum(), lam.clamp(min=1e-8), prior)


def gauge(model: ModelAt, mean: torch.Tensor, log_std: torch.Tensor) -> tuple[ModelAt, torch.Tensor, torch.Tensor]:
    """The same model and posteriors with W's columns of unit norm: ``W_h / c_h``, ``z_h c_h`` (μ and s),
    ``λ_h c_h^k`` (k: the prior statistic's degree) — every ``L_n`` unchanged."""
    norms = model.W.norm(dim=0).clamp(min=1e-12)  # (H,)
    lam = model.lam * norms**model.prior.statistic_degree
    return ModelAt(model.W / norms, model.sigma2, lam, model.prior), mean * norms, log_std + norms.log()


def e_step(data: MaskedPatches, model: ModelAt, mean: torch.Tensor, log_std: torch.Tensor, driver: BlockLBFGS):
    """(μ, log s) maximising ``Σ_n L_n`` at the model, block by block, from their current values."""
    for index in driver.blocks(torch.arange(len(data.x), device=data.x.device)):
        block_data = MaskedPatches(data.x[index], data.observed[index], data.dc[index])
        loss = autograd_loss(lambda q, d=block_data: -masked_elbo(d, model, q["mean"], q["log_std"]).sum(), lambda block: block)
        fitted = driver.minimise({"mean": mean[index], "log_std": log_std[index]}, model, loss)
        mean[index], log_std[index] = fitted["mean"], fitted["log_std"]
    return mean, log_std


def start_posteriors(data: MaskedPatches, model: ModelAt, block_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """The posteriors of a Gaussian stand-in for the prior (variance 2λ², the Laplace prior's): per patch
    ``A_n = W_oᵀW_o/σ² + diag(1/(2λ²))``, ``μ_n = A_n⁻¹ W_oᵀx̃_o/σ²``, ``s_nh = A_n,hh^(-1/2)``  ->  mean, log_std (N,H)"""
    means, log_stds = [], []
    precision = torch.diag(1.0 / (2 * model.lam**2))  # (H,H)
    for start in range(0, len(data.x), block_size):
        o, x = data.observed[start : start + block_size], data.x[start : start + block_size]  # (B,D)
        A = torch.einsum("nd,dh,dk->nhk", o, model.W, model.W) / model.sigma2 + precision  # (B,H,H)
        means.append(torch.linalg.solve(A, (x @ model.W) / model.sigma2))  # (B,H)
        log_stds.append(-0.5 * torch.diagonal(A, dim1=1, dim2=2).log())  # (B,H)
    return torch.cat(means), torch.cat(log_stds)


def learn_masked(data: MaskedPatches, n_latents: int, epochs: int, driver: BlockLBFGS, prior=None, seed: int = 0) -> ModelAt:
    """Variational EM (module docstring) from W = H of the patches (observed pixels, unit norm), σ² = half
    their variance, λ = their standard deviation."""
    generator = torch.Generator().manual_seed(seed)
    start = data.x[torch.randperm(len(data.x), generator=generator)[:n_latents].to(data.x.device)].T  # (D,H)
    start = start + 1e-3 * torch.randn(start.shape, generator=generator).to(start)  # no zero column
    spread = (data.x.pow(2).sum() / data.observed.sum()).sqrt()
    prior = prior or LaplacePrior()
    model = ModelAt(start / start.norm(dim=0), 0.5 * spread**2, spread.expand(n_latents).clone(), prior)
    mean, log_std = start_posteriors(data, model)
    for _ in range(epochs):
        mean, log_std = e_step(data, model, mean, log_std, driver)
        model, mean, log_std = gauge(m_step(data, mean, log_std, prior), mean, log_std)
    return model


def _check_mask(image: np.ndarray, mask, patch_size: int) -> np.ndarray:
    missing = np.asarray(mask)
    if missing.shape != image.shape:
        raise ConfigError(f"mask must have the image's shape {image.shape}, got {missing.shape}")
    if missing.dtype != bool:
        if not np.issubdtype(missing.dtype, np.number) or not np.isin(missing, (0, 1)).all():
            raise ConfigError("mask must hold booleans or 0/1 (True / 1 = missing)")
        missing = missing.astype(bool)
    if missing.all():
        raise ConfigError("mask leaves no pixel observed: nothing to learn from")
    if min(image.shape) < patch_size:
        raise ConfigError(
            f"image must be at least {patch_size}×{patch_size} pixels for patch_size={patch_size}, got {image.shape}"
        )
    return missing


def inpaint_image(
    image,
    mask,
    *,
    patch_size: int = 8,
    n_latents: int = 32,
    epochs: int = 20,
    n_patches: int = 20000,
    iterations: int = 20,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """The image with its missing pixels (``mask`` True, as ``skimage.restoration.inpaint_biharmonic``) filled
    (module docstring); the model is learned from at most ``n_patches`` patches of the image itself."""
    require_at_least(1, patch_size=patch_size, n_latents=n_latents, epochs=epochs, n_patches=n_patches, iterations=iterations)
    picture = np.asarray(image, dtype=np.float64)
    if picture.ndim != 2:
        raise ConfigError(f"image must be a 2-D grey image, got shape {picture.shape}")
    missing = _check_mask(picture, mask, patch_size)
    if not np.isfinite(picture[~missing]).all():
        raise ConfigError("image holds NaN/Inf values at observed pixels")
    if not missing.any():
        return picture.copy()
    filled = np.where(missing, 0.0, picture)  # the missing values are never read
    patches, holes = image_patches(filled, patch_size), image_patches(missing, patch_size)  # (M, p²) each
    data = MaskedPatches.of(patches, holes, dtype, fallback=float(picture[~missing].mean()))
    seen = torch.nonzero(data.observed.sum(1) > 0).flatten()
    chosen = seen[torch.randperm(len(seen), generator=torch.Generator().manual_seed(seed))[:n_patches]]
    driver = BlockLBFGS(iterations=iterations)
    model = learn_masked(
        MaskedPatches(data.x[chosen], data.observed[chosen], data.dc[chosen]), n_latents, epochs, driver, seed=seed
    )
    mean, _ = e_step(data, model, *start_posteriors(data, model), BlockLBFGS(iterations=5 * iterations))
    estimates = (mean @ model.W.T + data.dc).double().numpy()  # (M, p²)
    return np.where(missing, average_patches(estimates, picture.shape, patch_size), picture)


# ------------------------------------------------------------------------------------------- command line


@dataclass
class InpaintSettings:
    image: str = "???"  # a grey or colour image file (read as grey, scaled to [0, 1]) or a .npy array
    mask: str = "???"  # the pixels to fill: an image file (white = missing) or a .npy array (True / 1 = missing)
    out: str | None = None  # where to write the filled image (.png, .npy); default: beside the image
    patch_size: int = 8
    n_latents: int = 32
    epochs: int = 20
    n_patches: int = 20000
    iterations: int = 20
    seed: int = 0


def read_mask(path: str) -> np.ndarray:
    """The mask ``mask=`` names: a .npy array as stored (checked by ``inpaint_image``); an image file as grey,
    white (> 0.5) = missing."""
    array = read_image(path, "mask")
    return array if Path(path).suffix.lower() == ".npy" else array > 0.5


def main(arguments: list[str]) -> None:
    settings = settings_from_arguments(InpaintSettings, arguments)
    memory.retain_freed_memory()  # the command line's choice for its process (runner/memory.py)
    require_at_least(1, patch_size=settings.patch_size, n_latents=settings.n_latents, epochs=settings.epochs)
    require_at_least(1, n_patches=settings.n_patches, iterations=settings.iterations)
    if settings.out:
        output_file(settings.out, "out", OUT_SUFFIXES)  # before the image is read
    image, mask = read_image(settings.image), read_mask(settings.mask)
    out = output_file(settings.out or Path(settings.image).with_suffix(".inpainted.png"), "out", OUT_SUFFIXES)
    _check_mask(image, mask, settings.patch_size)
    filled = inpaint_image(
        image,
        mask,
        patch_size=settings.patch_size,
        n_latents=settings.n_latents,
        epochs=settings.epochs,
        n_patches=settings.n_patches,
        iterations=settings.iterations,
        seed=settings.seed,
    )
    write_image(out, filled)
    print(out)


if __name__ == "__main__":
    run_tool(main)
