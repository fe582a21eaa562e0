"""Blind image denoising: sparse_elbo against BM3D, scikit-image's denoisers and scikit-learn's pipeline, on
photographs shipped with scikit-image (grey, averaged down 2×: ``sparse_elbo.images.photograph``), at several
noise levels. Prints PSNR and time per method and case.

Every method is blind: the peers are given the noise level ``σ̂`` that ``skimage.restoration.estimate_sigma``
finds in the noisy image, never the true σ; sparse_elbo is given nothing (its σ² is learned).

- ``bm3d``: ``bm3d.bm3d(noisy, σ̂)`` (the ``bm3d`` package, its default profile);
- ``nl_means``: ``denoise_nl_means(h=0.8 σ̂, sigma=σ̂, fast_mode, 5×5 patches, distance 6)`` (scikit-image's
  gallery settings); ``wavelet``: ``denoise_wavelet(sigma=σ̂, BayesShrink, soft, rescale_sigma)``;
  ``tv``: ``denoise_tv_chambolle(weight=σ̂)``;
- ``sklearn``: the gallery pipeline "Image denoising using dictionary learning" on the noisy image (7×7
  patches, ``MiniBatchDictionaryLearning`` with 100 atoms, α = 1, batch 3, 10 iterations), OMP to the residual
  ``(1.15 σ̂)²`` per pixel;
- ``blind``: ``sparse_elbo.denoise_image(noisy)``, a model learned from the noisy image's own patches;
- ``pretrained``: ``sparse_elbo.denoise_image(noisy, "patches8_denoise")``, the shipped dictionary (learned from
  photographs this benchmark does not use) with σ², λ refitted to the noisy image.

    python scripts/bench_denoise.py [--images camera,astronaut] [--sigmas 0.05,0.1] [--methods bm3d,blind] [--figure F.png]

Needs the peers: pip install -e ".[benchmarks]".
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

import sparse_elbo
from sparse_elbo.denoise import denoise_image, psnr
from sparse_elbo.images import photograph

IMAGES = ("camera", "astronaut", "coffee", "chelsea")
SIGMAS = (0.05, 0.1, 0.2, 0.3)
SKLEARN_PATCH = 7


def bm3d_method(noisy: np.ndarray, sigma: float) -> np.ndarray:
    import bm3d

    return bm3d.bm3d(noisy, sigma_psd=sigma)


def nl_means(noisy: np.ndarray, sigma: float) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    return denoise_nl_means(noisy, h=0.8 * sigma, sigma=sigma, fast_mode=True, patch_size=5, patch_distance=6)


def wavelet(noisy: np.ndarray, sigma: float) -> np.ndarray:
    from skimage.restoration import denoise_wavelet

    return denoise_wavelet(noisy, sigma=sigma, method="BayesShrink", mode="soft", rescale_sigma=True)


def total_variation(noisy: np.ndarray, sigma: float) -> np.ndarray:
    from skimage.restoration import denoise_tv_chambolle

    return denoise_tv_chambolle(noisy, weight=sigma)


def sklearn_pipeline(noisy: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    from sklearn.decomposition import MiniBatchDictionaryLearning
    from sklearn.feature_extraction.image import extract_patches_2d, reconstruct_from_patches_2d

    p = SKLEARN_PATCH
    data = extract_patches_2d(noisy, (p, p)).reshape(-1, p * p)  # (M, p²)
    intercept = data.mean(0)
    scaled = (data - intercept) / (data - intercept).std(0)
    dictionary = MiniBatchDictionaryLearning(
        n_components=100,
        batch_size=3,
        alpha=1,
        max_iter=10,
        random_state=seed,
        transform_algorithm="omp",
        transform_alpha=(1.15 * sigma) ** 2 * p * p,
    )
    atoms = dictionary.fit(scaled).components_
    estimate = (dictionary.transform(data - intercept) @ atoms + intercept).reshape(-1, p, p)
    return reconstruct_from_patches_2d(estimate, noisy.shape)


def blind(noisy: np.ndarray, sigma: float) -> np.ndarray:
    return denoise_image(noisy)  # σ is not given


def pretrained(noisy: np.ndarray, sigma: float) -> np.ndarray:
    return denoise_image(noisy, "patches8_denoise", refit_scales=True)  # σ is not given


# name -> (column title, method(noisy, σ̂) -> estimate)
METHODS: dict[str, tuple[str, Callable[[np.ndarray, float], np.ndarray]]] = {
    "bm3d": ("BM3D", bm3d_method),
    "nl_means": ("NL-means", nl_means),
    "wavelet": ("wavelet", wavelet),
    "tv": ("TV", total_variation),
    "sklearn": ("scikit-learn", sklearn_pipeline),
    "blind": ("sparse_elbo blind", blind),
    "pretrained": ("sparse_elbo pretrained", pretrained),
}
SCIKIT_IMAGE = ("nl_means", "wavelet", "tv")


def noisy_image(name: str, sigma: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    clean = photograph(name)
    return clean, clean + sigma * np.random.default_rng(seed).standard_normal(clean.shape)


def run_case(name: str, sigma: float, methods: list[str]) -> dict[str, tuple[float, float]]:
    """{method: (PSNR dB, seconds)} on one image and noise level; "noisy" is the input's PSNR."""
    from skimage.restoration import estimate_sigma

    clean, noisy = noisy_image(name, sigma)
    estimated = float(estimate_sigma(noisy))
    out = {"noisy": (psnr(clean, noisy), 0.0), "sigma_hat": (estimated, 0.0)}
    for method in methods:
        start = time.perf_counter()
        estimate = METHODS[method][1](noisy, estimated)
        out[method] = (psnr(clean, estimate), time.perf_counter() - start)
    return out


def summary(rows: list[dict], methods: list[str]) -> list[str]:
    """Mean PSNR and time per method; with BM3D, the mean gap to it; cases ahead of every scikit-image denoiser."""
    lines = ["", "| method | mean PSNR | mean gap to BM3D | mean time |", "|---|---|---|---|"]
    for method in methods:
        psnrs = np.array([row[method][0] for row in rows])
        gap = f"{np.mean(psnrs - [row['bm3d'][0] for row in rows]):+.2f} dB" if "bm3d" in methods else "—"
        lines.append(
            f"| {METHODS[method][0]} | {psnrs.mean():.2f} dB | {gap} | {np.mean([row[method][1] for row in rows]):.1f} s |"
        )
    peers = [m for m in SCIKIT_IMAGE if m in methods]
    for method in ("blind", "pretrained"):
        if method in methods and peers:
            ahead = sum(all(row[method][0] > row[peer][0] for peer in peers) for row in rows)
            lines.append(f"\n{METHODS[method][0]} ahead of every scikit-image denoiser in {ahead} of {len(rows)} cases")
    return lines


def figure(path: str, name: str, sigma: float) -> None:
    """noisy / BM3D / sparse_elbo (blind and pretrained), on one image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.restoration import estimate_sigma

    clean, noisy = noisy_image(name, sigma)
    estimated = float(estimate_sigma(noisy))
    panels = [("noisy", noisy)] + [(METHODS[m][0], METHODS[m][1](noisy, estimated)) for m in ("bm3d", "blind", "pretrained")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4))
    for ax, (title, image) in zip(axes, panels):
        ax.imshow(np.clip(image, 0, 1), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{title}: {psnr(clean, image):.2f} dB")
        ax.axis("off")
    fig.suptitle(f"{name}, σ = {sigma}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=",".join(IMAGES))
    parser.add_argument("--sigmas", default=",".join(map(str, SIGMAS)))
    parser.add_argument("--methods", default=",".join(METHODS), help=f"of {list(METHODS)}")
    parser.add_argument("--figure", default=None, help="write the noisy / BM3D / sparse_elbo figure of the first case here")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: no method {unknown}; the methods are {list(METHODS)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; PSNR in dB (seconds)")
    print("| image | σ | σ̂ | noisy | " + " | ".join(METHODS[m][0] for m in methods) + " |")
    print("|---" * (4 + len(methods)) + "|")
    rows = []
    for name in args.images.split(","):
        for sigma in map(float, args.sigmas.split(",")):
            row = run_case(name, sigma, methods)
            rows.append(row)
            best = max(methods, key=lambda m: row[m][0])
            cells = [
                f"**{row[m][0]:.2f}** ({row[m][1]:.1f})" if m == best else f"{row[m][0]:.2f} ({row[m][1]:.1f})" for m in methods
            ]
            shape = "×".join(map(str, photograph(name).shape))
            print(
                f"| {name} {shape} | {sigma} | {row['sigma_hat'][0]:.3f} | {row['noisy'][0]:.2f} | " + " | ".join(cells) + " |",
                flush=True,
            )
    print("\n".join(summary(rows, methods)))
    if args.figure:
        figure(args.figure, args.images.split(",")[0], float(args.sigmas.split(",")[0]))


if __name__ == "__main__":
    sparse_elbo.retain_freed_memory()  # as the command line does (sparse_elbo/runner/memory.py)
    main()
