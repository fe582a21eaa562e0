"""Make the pretrained bundles shipped in ``sparse_elbo/bundled`` (``sparse_elbo.pretrained(name)``): each is
trained here by its recorded command, scored and written with the commit, date and machine that made it.

    python scripts/make_pretrained.py [NAME ...] [--out FOLDER] [--work FOLDER]

Without names every bundle of ``RECIPES`` is made. ``--out`` defaults to the package's bundle folder;
``--work`` keeps the training runs (a temporary folder otherwise).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import sparse_elbo
from sparse_elbo.bundles import bundle_folder, write_bundle
from sparse_elbo.metrics import NOISE_LIKE_LOCALISATION_16X16

# name -> (description, the overrides of python -m sparse_elbo.train that make it)
RECIPES = {
    "patches16_h100": (
        "H = 100 fields of whitened 16x16 patches of the bundled photographs (experiment=patches_em, paper size)",
        ["experiment=patches_em", "seed=0"],
    ),
    "patches16_h100_small": (
        "H = 100 fields of DC-removed whitened 16x16 patches, the CPU-sized recipe (experiment=patches_em_small)",
        ["experiment=patches_em_small", "seed=0"],
    ),
    "patches8_denoise": (
        "8x8 raw (not whitened) DC-removed patches of photographs outside the denoising benchmark, for denoise_image",
        ["experiment=patches8_denoise", "seed=0"],
    ),
}


def commit() -> str:
    """The commit of the checkout, marked ``+changes`` when the work tree differs from it."""
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True)
    return (head or "unknown") + ("+changes" if dirty.stdout.strip() else "")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def scores(results, model) -> dict:
    """The numbers a bundle carries: ``elbo``, the mean ELBO per patch of its training patches at the posteriors
    ``encode`` fits (what a user of the bundle gets); ``elbo_run``, the run's own final ELBO; σ², the fields'
    localisation, the Gini."""
    final, metrics = results.final, results.metrics
    patches = instantiate(OmegaConf.create(results.config["dataset"])).x  # the training patches again
    out = {
        "elbo": float(np.mean(model.encode(patches).elbo)),
        "elbo_run": float(final["elbo"]),
        "sigma2": float(final["sigma2"]),
        "train_time_s": round(float(final["train_time"]), 1),
    }
    if "localisation" in final:
        localisation = np.asarray(final["localisation"])
        out["localisation_median"] = round(float(np.median(localisation)), 4)
        if np.asarray(final["W"]).shape[0] == 256:  # the threshold holds for 16x16 fields
            out["noise_like_share"] = round(float(np.mean(localisation > NOISE_LIKE_LOCALISATION_16X16)), 4)
    if "gini_mean" in metrics:
        out["gini"] = round(float(np.asarray(metrics["gini_mean"])[-1]), 4)
    return out


def make(name: str, out: Path, work: Path) -> Path:
    description, overrides = RECIPES[name]
    summary = sparse_elbo.run(sparse_elbo.compose(overrides), work / name, progress=False)
    results = sparse_elbo.read_results(summary.results_path)
    provenance = {
        "command": "python -m sparse_elbo.train " + " ".join(overrides),
        "overrides": overrides,
        "commit": commit(),
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "versions": results.attrs.get("versions", ""),
    }
    model = sparse_elbo.load(summary.results_path)
    return write_bundle(out, name, results, description, provenance, scores(results, model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"bundles to make, of {list(RECIPES)} (default: all)")
    parser.add_argument("--out", type=Path, default=bundle_folder())
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    unknown = [name for name in args.names if name not in RECIPES]
    if unknown:
        parser.error(f"no recipe for {unknown}; the bundles are {list(RECIPES)}")
    sparse_elbo.retain_freed_memory()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        for name in args.names or list(RECIPES):
            path = make(name, args.out, work)
            print(path, sparse_elbo.pretrained(name).info["scores"] if args.out == bundle_folder() else "")


if __name__ == "__main__":
    main()
