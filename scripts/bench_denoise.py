"""Image denoising: sparse_elbo against scikit-learn's dictionary-learning pipeline (its gallery example
"Image denoising using dictionary learning": 7×7 patches, MiniBatchDictionaryLearning with 100 atoms,
OMP), on photographs shipped with scikit-image, at several noise levels. Prints PSNR and time per method.

Two protocols:
- ``blind``: each method learns its dictionary from the noisy image itself and denoises it. scikit-learn
  must be told the sparsity (OMP with k atoms; the best k is chosen with the clean image: an oracle) or
  the noise level (OMP to the residual (1.15 σ)² per pixel); sparse_elbo is told neither (σ² is learned).
- ``clean_half`` (the gallery's): the dictionary is learned from the noise-free left half; the noisy right
  half is denoised. sparse_elbo learns σ², λ afresh from the noisy half (``refit_scales``), blind again.

    python scripts/bench_denoise.py [--images camera,astronaut] [--sigmas 0.05,0.1] [--protocols blind] [--figure F.png]

Needs scikit-learn: pip install -e ".[benchmarks]".
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

import sparse_elbo
from sparse_elbo.denoise import denoise_image, learn_from_image, psnr

IMAGES = ("camera", "astronaut", "coffee", "chelsea")
SIGMAS = (0.05, 0.1, 0.2)
PROTOCOLS = ("blind", "clean_half")
SKLEARN_PATCH = 7
SPARSITIES = (1, 2, 4)


def grey_image(name: str) -> np.ndarray:
    """A scikit-image photograph as grey [0, 1], averaged down 2× in each direction (as the gallery's 4×)."""
    import skimage.data
    from skimage.color import rgb2gray

    image = getattr(skimage.data, name)()
    image = rgb2gray(image) if image.ndim == 3 else image / 255.0
    rows, cols = (s // 2 * 2 for s in image.shape)
    image = image[:rows, :cols]
    return 0.25 * (image[::2, ::2] + image[1::2, ::2] + image[::2, 1::2] + image[1::2, 1::2])


@dataclass
class Outcome:
    psnr: float
    seconds: float
    setting: str = ""


def sklearn_denoise(train: np.ndarray, noisy: np.ndarray, clean: np.ndarray, sigma: float, seed: int) -> tuple[Outcome, Outcome]:
    """The gallery pipeline: (best OMP sparsity chosen with the clean image, OMP told the noise level)."""
    from sklearn.decomposition import MiniBatchDictionaryLearning
    from sklearn.feature_extraction.image import extract_patches_2d, reconstruct_from_patches_2d

    p = SKLEARN_PATCH
    start = time.perf_counter()
    data = extract_patches_2d(train, (p, p)).reshape(-1, p * p)
    data = data - data.mean(0)
    data /= data.std(0)
    dictionary = MiniBatchDictionaryLearning(n_components=100, batch_size=3, alpha=1, max_iter=10, random_state=seed)
    atoms = dictionary.fit(data).components_
    learn = time.perf_counter() - start
    patches = extract_patches_2d(noisy, (p, p)).reshape(-1, p * p)
    intercept = patches.mean(0)

    def transform(**settings) -> tuple[float, float]:
        start = time.perf_counter()
        dictionary.set_params(transform_algorithm="omp", **settings)
        estimate = (dictionary.transform(patches - intercept) @ atoms + intercept).reshape(-1, p, p)
        return psnr(clean, reconstruct_from_patches_2d(estimate, noisy.shape)), time.perf_counter() - start

    by_sparsity = {k: transform(transform_n_nonzero_coefs=k) for k in SPARSITIES}
    best = max(by_sparsity, key=lambda k: by_sparsity[k][0])
    told_noise = transform(transform_alpha=(1.15 * sigma) ** 2 * p * p)
    return (
        Outcome(by_sparsity[best][0], learn + by_sparsity[best][1], f"OMP {best} atoms"),
        Outcome(told_noise[0], learn + told_noise[1], "OMP to the noise level"),
    )


def sparse_elbo_denoise(train: np.ndarray | None, noisy: np.ndarray, clean: np.ndarray, seed: int) -> Outcome:
    start = time.perf_counter()
    if train is None:  # blind: learned from the noisy image itself
        estimate = denoise_image(noisy, seed=seed)
    else:
        estimate = denoise_image(noisy, learn_from_image(train, seed=seed), refit_scales=True)
    return Outcome(psnr(clean, estimate), time.perf_counter() - start)


def run_case(name: str, sigma: float, protocol: str, seed: int = 0) -> dict:
    clean = grey_image(name)
    noisy = clean + sigma * np.random.default_rng(seed).standard_normal(clean.shape)
    if protocol == "blind":
        train, target_clean, target_noisy = noisy, clean, noisy
    else:
        half = clean.shape[1] // 2
        train, target_clean, target_noisy = clean[:, :half], clean[:, half:], noisy[:, half:]
    oracle, told = sklearn_denoise(train, target_noisy, target_clean, sigma, seed)
    ours = sparse_elbo_denoise(None if protocol == "blind" else train, target_noisy, target_clean, seed)
    return {
        "image": name,
        "shape": clean.shape,
        "sigma": sigma,
        "protocol": protocol,
        "noisy": psnr(target_clean, target_noisy),
        "sklearn_oracle": oracle,
        "sklearn_told_noise": told,
        "sparse_elbo": ours,
    }


def figure(path: str, name: str, sigma: float, seed: int = 0) -> None:
    """noisy / scikit-learn (told the noise level) / sparse_elbo (blind), on one image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import MiniBatchDictionaryLearning  # noqa: F401  (fail early without scikit-learn)

    clean = grey_image(name)
    noisy = clean + sigma * np.random.default_rng(seed).standard_normal(clean.shape)
    ours = denoise_image(noisy, seed=seed)
    panels = [("noisy", noisy), ("sparse_elbo (blind)", ours)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    reference = _sklearn_image(noisy, sigma, seed)
    panels.insert(1, ("scikit-learn (told σ)", reference))
    for ax, (title, image) in zip(axes, panels):
        ax.imshow(np.clip(image, 0, 1), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{title}: {psnr(clean, image):.2f} dB")
        ax.axis("off")
    fig.suptitle(f"{name}, σ = {sigma}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _sklearn_image(noisy: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    from sklearn.decomposition import MiniBatchDictionaryLearning
    from sklearn.feature_extraction.image import extract_patches_2d, reconstruct_from_patches_2d

    p = SKLEARN_PATCH
    data = extract_patches_2d(noisy, (p, p)).reshape(-1, p * p)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=",".join(IMAGES))
    parser.add_argument("--sigmas", default=",".join(map(str, SIGMAS)))
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument(
        "--figure", default=None, help="write the noisy / scikit-learn / sparse_elbo figure of the first image here"
    )
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| image | σ | protocol | noisy | scikit-learn, best sparsity (oracle) | scikit-learn, told σ | sparse_elbo (blind) |")
    print("|---|---|---|---|---|---|---|")
    for protocol in args.protocols.split(","):
        for name in args.images.split(","):
            for sigma in map(float, args.sigmas.split(",")):
                r = run_case(name, sigma, protocol)
                o, t, s = r["sklearn_oracle"], r["sklearn_told_noise"], r["sparse_elbo"]
                print(
                    f"| {name} {r['shape'][0]}×{r['shape'][1]} | {sigma} | {protocol} | {r['noisy']:.2f} dB | "
                    f"{o.psnr:.2f} dB ({o.setting}, {o.seconds:.0f} s) | {t.psnr:.2f} dB ({t.seconds:.0f} s) | "
                    f"**{s.psnr:.2f} dB** ({s.seconds:.0f} s) |",
                    flush=True,
                )
    if args.figure:
        figure(args.figure, args.images.split(",")[0], float(args.sigmas.split(",")[0]))


if __name__ == "__main__":
    sparse_elbo.retain_freed_memory()  # as the command line does (sparse_elbo/runner/memory.py)
    main()
