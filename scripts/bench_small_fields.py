"""The CPU-sized natural-image experiment on the bundled photographs and on a user's ``IMAGES.mat`` (docs/benchmarks.md,
"patches_em_small"): its training time, final ELBO, median localisation and the share of noise-like fields.

A field is *noise-like* when its localisation index is above 0.88: no random Gaussian 16×16 field is below that
(the lowest of 2,000 is 0.887; their median 0.995), so such a field is spread over the patch as noise is. The
``IMAGES.mat`` stands in for a user's file with other crops and another whitening: ten 256×256 crops of
scikit-image photographs (of ``moon`` and ``coins``, which the bundled source does not use, and of bundled ones),
each whitened by ``R(f) = f · exp(-(f/f0)²)`` with ``f0`` = 0.3 of its size (a Gaussian roll-off instead of
Olshausen's fourth power) and scaled to unit variance; the run reads it with ``dataset.source=mat
dataset.whiten_images=false`` as the README says.

    python scripts/bench_small_fields.py [--seeds 0 1] [overrides ...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import scipy.io
import skimage.color
import skimage.data
import skimage.util

import sparse_elbo
from sparse_elbo.metrics import NOISE_LIKE_LOCALISATION_16X16

NOISE_LIKE = NOISE_LIKE_LOCALISATION_16X16  # above it a field is as spread as a random one (module docstring)


def _whitened(image: np.ndarray, f0_fraction: float = 0.3) -> np.ndarray:
    rows, cols = image.shape
    fy, fx = np.meshgrid(np.fft.fftfreq(rows) * rows, np.fft.fftfreq(cols) * cols, indexing="ij")
    f = np.hypot(fy, fx)
    out = np.real(np.fft.ifft2(np.fft.fft2(image - image.mean()) * f * np.exp(-((f / (f0_fraction * min(rows, cols))) ** 2))))
    return (out - out.mean()) / out.std()


def users_images_mat(path: Path, size: int = 256) -> Path:
    """The stand-in ``IMAGES.mat`` (module docstring): (size, size, 10), MATLAB's layout."""
    grey = {
        name: skimage.util.img_as_float(getattr(skimage.data, name)())
        for name in ("astronaut", "coffee", "rocket", "chelsea", "moon", "coins")
    }
    grey = {name: skimage.color.rgb2gray(image) if image.ndim == 3 else image for name, image in grey.items()}
    corners = {
        "astronaut": [(40, 120), (256, 256)],
        "coffee": [(100, 30), (140, 330)],
        "rocket": [(20, 300), (150, 40)],
        "chelsea": [(30, 150)],
        "moon": [(0, 0), (250, 200)],
        "coins": [(40, 100)],
    }
    crops = [_whitened(grey[name][r : r + size, c : c + size]) for name, places in corners.items() for r, c in places]
    scipy.io.savemat(path, {"IMAGES": np.stack(crops, axis=-1)})
    return path


def one(label: str, overrides: list[str], folder: Path) -> None:
    summary = sparse_elbo.run(sparse_elbo.compose(overrides), folder, progress=False)
    results = sparse_elbo.read_results(summary.results_path)
    local = np.asarray(results.final["localisation"])
    print(
        f"| {label} | {summary.train_time:.1f} s | {summary.elbo:.2f} | {np.median(local):.3f} | "
        f"{np.mean(local > NOISE_LIKE):.0%} ({int(np.sum(local > NOISE_LIKE))} of {local.size}) | {local.max():.3f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args()
    sparse_elbo.retain_freed_memory()  # as the command line does
    print("| data, seed | training time | final ELBO | median localisation | noise-like fields | largest |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        mat = users_images_mat(Path(tmp) / "IMAGES.mat")
        user = ["dataset.source=mat", f"dataset.path={mat}", "dataset.whiten_images=false"]
        for seed in args.seeds:
            base = ["experiment=patches_em_small", f"seed={seed}", *args.overrides]
            one(f"bundled photographs, {seed}", base, Path(tmp) / f"builtin{seed}")
            one(f"IMAGES.mat (other crops, other whitening), {seed}", [*base, *user], Path(tmp) / f"mat{seed}")


if __name__ == "__main__":
    main()
