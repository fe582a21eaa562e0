"""Inpainting: sparse_elbo against scikit-image's ``inpaint_biharmonic`` on photographs shipped with
scikit-image (grey, averaged down 2×: ``sparse_elbo.images.photograph``). Prints the PSNR over the missing
pixels and the time of each method per case.

Masks (True = missing, seeded): ``random50`` and ``random80`` (each pixel missing with probability 0.5 / 0.8)
and ``text`` (lines of 18-pixel text over the image, drawn with Pillow's default font). sparse_elbo learns
its model from the damaged image alone (``sparse_elbo.inpaint_image`` with its defaults).

    python scripts/bench_inpaint.py [--images camera,astronaut] [--masks random50,text] [--figure F.png]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import sparse_elbo
from sparse_elbo.images import photograph

IMAGES = ("camera", "astronaut", "coffee", "chelsea")
MASKS = ("random50", "random80", "text")


def text_mask(shape: tuple[int, int], size: int = 18) -> np.ndarray:
    """Lines of text across the image, True where a glyph covers a pixel."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.new("L", (shape[1], shape[0]), 0)
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=size)
    for k, top in enumerate(range(4, shape[0] - size, 2 * size)):
        draw.text((4 + 9 * (k % 3), top), "sparse coding with entropy ELBOs " * 3, fill=255, font=font)
    return np.asarray(canvas) > 127


def mask_of(kind: str, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    if kind == "text":
        return text_mask(shape)
    share = {"random50": 0.5, "random80": 0.8}[kind]
    return np.random.default_rng(seed).random(shape) < share


def missing_psnr(clean: np.ndarray, filled: np.ndarray, missing: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((clean - filled)[missing] ** 2)))


def biharmonic(image: np.ndarray, missing: np.ndarray) -> np.ndarray:
    from skimage.restoration import inpaint_biharmonic

    return inpaint_biharmonic(image, missing)


METHODS = {"biharmonic": biharmonic, "sparse_elbo": lambda image, missing: sparse_elbo.inpaint_image(image, missing)}


def run_case(name: str, kind: str) -> dict[str, tuple[float, float]]:
    """{method: (PSNR over the missing pixels in dB, seconds)}, and the share of missing pixels."""
    clean = photograph(name)
    missing = mask_of(kind, clean.shape)
    damaged = np.where(missing, 0.0, clean)
    out = {"missing": (float(missing.mean()), 0.0)}
    for method, fill in METHODS.items():
        start = time.perf_counter()
        filled = fill(damaged, missing)
        out[method] = (missing_psnr(clean, filled, missing), time.perf_counter() - start)
    return out


def figure(path: str, name: str, kind: str) -> None:
    """masked / biharmonic / sparse_elbo, on one image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = photograph(name)
    missing = mask_of(kind, clean.shape)
    damaged = np.where(missing, 0.0, clean)
    panels = [("masked", damaged, None)] + [(m, fill(damaged, missing), True) for m, fill in METHODS.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4))
    for ax, (title, image, scored) in zip(axes, panels):
        ax.imshow(np.clip(image, 0, 1), cmap="gray", vmin=0, vmax=1)
        ax.set_title(
            f"{title}: {missing_psnr(clean, image, missing):.2f} dB" if scored else f"{title} ({missing.mean():.0%} missing)"
        )
        ax.axis("off")
    fig.suptitle(f"{name}, mask {kind}; PSNR over the missing pixels")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=",".join(IMAGES))
    parser.add_argument("--masks", default=",".join(MASKS), help=f"of {list(MASKS)}")
    parser.add_argument(
        "--figure", default=None, help="write the masked / biharmonic / sparse_elbo figure of the first case here"
    )
    args = parser.parse_args()
    masks = args.masks.split(",")
    if any(kind not in MASKS for kind in masks):
        parser.error(f"--masks: the masks are {list(MASKS)}, got {masks}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; PSNR over the missing pixels in dB (seconds)")
    print("| image | mask | missing | biharmonic | sparse_elbo |")
    print("|---|---|---|---|---|")
    rows = []
    for name in args.images.split(","):
        for kind in masks:
            row = run_case(name, kind)
            rows.append(row)
            best = max(METHODS, key=lambda m: row[m][0])
            cells = [
                f"**{row[m][0]:.2f}** ({row[m][1]:.1f})" if m == best else f"{row[m][0]:.2f} ({row[m][1]:.1f})" for m in METHODS
            ]
            shape = "×".join(map(str, photograph(name).shape))
            print(f"| {name} {shape} | {kind} | {row['missing'][0]:.0%} | " + " | ".join(cells) + " |", flush=True)
    for method in METHODS:
        print(
            f"\n{method}: mean {np.mean([r[method][0] for r in rows]):.2f} dB, mean time {np.mean([r[method][1] for r in rows]):.1f} s"
        )
    if args.figure:
        figure(args.figure, args.images.split(",")[0], masks[0])


if __name__ == "__main__":
    sparse_elbo.retain_freed_memory()  # as the command line does (sparse_elbo/runner/memory.py)
    main()
