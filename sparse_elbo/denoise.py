"""Image denoising with a learned sparse coding model (docs/design.md §12.2).

Every overlapping ``p×p`` patch of the noisy image has its mean removed and is encoded with the model
(its posterior with the trained ``W, σ², λ`` fixed); the posterior-mean reconstruction ``W E[z]``, plus the
patch's mean, is averaged back into the image: each pixel is the mean of the estimates of every patch that
covers it. The noise level is never given: the model's σ² is learned.

- ``denoise_image(noisy, model)``: with a model learned elsewhere (``sparse_elbo.load``), or a pretrained
  bundle given by name (``denoise_image(noisy, "patches8_denoise")``);
- ``denoise_image(noisy)``: blind — the model is first learned from the noisy image's own patches
  (``experiment=denoise``), then used on them.

Command line: ``python -m sparse_elbo.denoise image=PATH [results=PATH] [out=PATH] [key=value ...]``. Settings:

    image         a grey or colour image file (read as grey, scaled to [0, 1]) or a .npy array (required)
    results       a trained model's results.h5;  pretrained: a shipped bundle's name (sparse_elbo.list_pretrained())
                  neither: learn a model from the image's own patches (blind)
    refit_scales  with results= or pretrained=: learn σ², λ afresh from this image's patches (true) or keep the model's
    out           the denoised image (.png, .tif, .bmp, .jpg or .npy; default: beside the image), in a folder
                  that exists; never overwritten
    patch_size    p of the p×p patches (blind model);  stride: pixels between patches
    iterations    L-BFGS iterations per block when encoding;  seed: the blind model's run seed

The output path, the image and the results file are checked before anything is learned or fitted; a wrong
one (an image file that is not an image, a folder that does not exist, ...) is one line ``error: …`` naming
the setting, and exit status 2.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from sparse_elbo.cli import output_file, run_tool, settings_from_arguments
from sparse_elbo.config import compose
from sparse_elbo.data import load_npy, reading
from sparse_elbo.errors import ConfigError, MissingFileError
from sparse_elbo.images import IMAGE_UNREADABLE, to_grey_float
from sparse_elbo.runner import memory, run
from sparse_elbo.runner.build import resolve_device
from sparse_elbo.trained import TrainedModel


def image_patches(image: np.ndarray, patch_size: int, stride: int = 1) -> np.ndarray:
    """Every ``p×p`` patch of a 2-D image at a step of ``stride`` pixels (the last row and column of
    patches always included, so every pixel is covered), in raster order  ->  (M, p²)."""
    windows = sliding_window_view(image, (patch_size, patch_size))  # (R-p+1, C-p+1, p, p) view
    rows, cols = (_starts(n, stride) for n in windows.shape[:2])
    return windows[np.ix_(rows, cols)].reshape(-1, patch_size * patch_size)


def _starts(n: int, stride: int) -> np.ndarray:
    starts = np.arange(0, n, stride)
    return starts if starts[-1] == n - 1 else np.append(starts, n - 1)


def average_patches(patches: np.ndarray, shape: tuple[int, int], patch_size: int, stride: int = 1) -> np.ndarray:
    """The image of the given shape whose every pixel is the mean of the patches (from ``image_patches``
    with the same size and stride) that cover it."""
    total, count = np.zeros(shape), np.zeros(shape)
    rows, cols = _starts(shape[0] - patch_size + 1, stride), _starts(shape[1] - patch_size + 1, stride)
    blocks = patches.reshape(len(rows), len(cols), patch_size, patch_size)
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            total[top : top + patch_size, left : left + patch_size] += blocks[i, j]
            count[top : top + patch_size, left : left + patch_size] += 1.0
    return total / count


def _check_image(noisy, patch_size: int) -> np.ndarray:
    image = np.asarray(noisy, dtype=np.float64)
    if image.ndim != 2 or min(image.shape) < patch_size:
        raise ConfigError(f"image must be a 2-D grey image of at least {patch_size}×{patch_size} pixels, got shape {image.shape}")
    if not np.isfinite(image).all():
        raise ConfigError("image holds NaN/Inf values")
    return image


def learn_from_image(
    noisy, patch_size: int = 8, overrides: tuple[str, ...] = (), output_dir: str | Path | None = None, seed: int = 0
) -> TrainedModel:
    """A model learned from the patches of ``noisy`` itself (``experiment=denoise``, mean removed per patch);
    its results file is written to ``output_dir`` (a temporary folder when None)."""
    image = _check_image(noisy, patch_size)
    positions = (image.shape[0] - patch_size + 1) * (image.shape[1] - patch_size + 1)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(output_dir) if output_dir is not None else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "image.npy", image)
        cfg = compose(["experiment=denoise", f"dataset.patch_size={patch_size}", f"seed={seed}", *overrides])
        cfg.dataset.path = str(folder / "image.npy")  # set, not an override: any characters in the path
        cfg.dataset.n_patches = min(cfg.dataset.n_patches, positions)  # small images: every patch position once
        summary = run(cfg, folder / "model", progress=False)
        return TrainedModel.load(summary.results_path, device=resolve_device(cfg.device))  # where it learned


def denoise_image(
    noisy,
    model: TrainedModel | str | None = None,
    *,
    refit_scales: bool = False,
    patch_size: int | None = None,
    stride: int = 1,
    batch_size: int = 8192,
    iterations: int = 100,
    overrides: tuple[str, ...] = (),
    seed: int = 0,
) -> np.ndarray:
    """The denoised image (module docstring); ``model`` is a trained model or a pretrained bundle's name;
    ``model=None`` learns one from ``noisy`` first (blind), with
    ``overrides`` to ``experiment=denoise`` and patches of ``patch_size`` (8 when not given). With a model
    learned elsewhere, ``refit_scales=True`` learns σ², λ afresh from the noisy image's patches (the noise
    level of the image is then learned, not taken from the data the model was trained on)."""
    model = learn_from_image(noisy, patch_size or 8, overrides, seed=seed) if model is None else _raw_patch_model(model)
    side = int(round(model.n_observed**0.5))
    if side * side != model.n_observed or (patch_size is not None and patch_size != side):
        raise ConfigError(f"the model's D = {model.n_observed} is not a {patch_size or 'square'} patch's pixel count")
    image = _check_image(noisy, side)
    patches = image_patches(image, side, stride)  # (M, p²)
    dc = patches.mean(1, keepdims=True)
    if refit_scales:
        model = model.with_scales_fitted_to(patches - dc)
    estimates = model.reconstruct(patches - dc, iterations=iterations, batch_size=batch_size) + dc
    return average_patches(estimates, image.shape, side, stride)


def _raw_patch_model(model) -> TrainedModel:
    from sparse_elbo.bundles import as_model

    model = as_model(model)
    if (model.info.get("preprocessing") or {}).get("whiten_images"):
        raise ConfigError(
            f"the model {model.source} was learned on whitened patches; denoising needs one learned on raw patches "
            "(dataset.whiten_images=false), e.g. a denoise bundle of sparse_elbo.list_pretrained()"
        )
    return model


def psnr(clean: np.ndarray, estimate: np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio ``10 log10(peak² / mean((clean - estimate)²))`` in dB."""
    return float(10.0 * np.log10(peak**2 / np.mean((np.asarray(clean) - np.asarray(estimate)) ** 2)))


# ------------------------------------------------------------------------------------------- command line


@dataclass
class DenoiseSettings:
    image: str = "???"  # a grey or colour image file (read as grey, scaled to [0, 1]) or a .npy array
    results: str | None = None  # a trained model's results.h5
    pretrained: str | None = None  # or a shipped bundle's name; neither: learn one from the image (blind)
    refit_scales: bool = True  # with results= or pretrained=: learn sigma^2, lambda afresh from this image's patches
    out: str | None = None  # where to write the denoised image (.png, .npy); default: beside the image
    patch_size: int = 8
    stride: int = 1
    iterations: int = 100
    seed: int = 0


OUT_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg", ".npy")


def read_image(path: str, argument: str = "image") -> np.ndarray:
    """The image the setting ``argument`` names, as float64: a .npy array as stored (booleans as 0/1); any
    other file read with ``skimage.io.imread``, as grey in [0, 1]. A file that is not what its name says is a
    one-line user error."""
    file = Path(path)
    if not file.is_file():
        raise MissingFileError(f"{argument}={path!r}: no such file")
    if file.suffix.lower() == ".npy":
        array = load_npy(path, argument)
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
            raise ConfigError(f"{argument}={path!r}: expected a real numeric array, got dtype {array.dtype}")
        return array.astype(np.float64)
    import skimage.io

    with reading(path, argument, IMAGE_UNREADABLE, "the file as an image"):
        raw = skimage.io.imread(file)
    return to_grey_float(raw, f"{argument}={path!r}")


def write_image(path: Path, image: np.ndarray) -> None:
    if path.suffix.lower() == ".npy":
        np.save(path, image)
        return
    import skimage.io

    skimage.io.imsave(path, (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8), check_contrast=False)


def main(arguments: list[str]) -> None:
    settings = settings_from_arguments(DenoiseSettings, arguments)
    memory.retain_freed_memory()  # the command line's choice for its process (runner/memory.py)
    if settings.results and settings.pretrained:
        raise ConfigError("give results= or pretrained=, not both")
    if settings.out:
        output_file(settings.out, "out", OUT_SUFFIXES)  # before the image is read
    noisy = read_image(settings.image)
    out = output_file(settings.out or Path(settings.image).with_suffix(".denoised.png"), "out", OUT_SUFFIXES)
    model = TrainedModel.load(settings.results) if settings.results else None
    if settings.pretrained:
        model = _raw_patch_model(settings.pretrained)
    denoised = denoise_image(
        noisy,
        model,
        refit_scales=settings.refit_scales and model is not None,
        patch_size=settings.patch_size,
        stride=settings.stride,
        iterations=settings.iterations,
        seed=settings.seed,
    )
    write_image(out, denoised)
    print(out)


if __name__ == "__main__":
    run_tool(main)
