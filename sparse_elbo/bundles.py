"""Pretrained dictionaries shipped inside the package (docs/design.md §12.3).

    sparse_elbo.list_pretrained()                 # {name: description}
    model = sparse_elbo.pretrained("patches16_h100")
    model.info["preprocessing"]                   # how its patches were made: whitening, DC removal, patch size
    model.encode(x)                               # as for sparse_elbo.load(results.h5)

A bundle is two files in ``sparse_elbo/bundled``: ``<name>.npz`` with ``W (D,H)``, ``sigma2`` and ``lambda
(H,)`` of a finished run, and ``<name>.json`` with what a user needs to use and to trust it: the patches'
preprocessing, the ``model`` and ``posterior`` config nodes, the command, commit, date and machine that made
it, and its scores. ``scripts/make_pretrained.py`` writes them from a training run; a slow test re-trains one
from its recorded command and compares.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from sparse_elbo.errors import ConfigError
from sparse_elbo.results import Results
from sparse_elbo.trained import TrainedModel, preprocessing

ARRAYS = ("W", "sigma2", "lambda")


def bundle_folder() -> Path:
    """The folder of the shipped bundles (inside the installed package)."""
    return Path(str(resources.files("sparse_elbo") / "bundled"))


def list_pretrained() -> dict[str, str]:
    """Every shipped bundle's name and one-line description."""
    return {path.stem: json.loads(path.read_text())["description"] for path in sorted(bundle_folder().glob("*.json"))}


def bundle_info(name: str) -> dict:
    """The description of bundle ``name`` (its JSON file): preprocessing, config nodes, provenance, scores."""
    if not isinstance(name, str) or not (bundle_folder() / f"{name}.json").is_file():
        raise ConfigError(f"pretrained={name!r}: no such bundle; the shipped ones are {sorted(list_pretrained())}")
    return json.loads((bundle_folder() / f"{name}.json").read_text())


def pretrained(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64) -> TrainedModel:
    """The shipped bundle ``name`` as a ``TrainedModel`` (the object ``sparse_elbo.load`` gives), with the
    bundle's description as ``model.info``."""
    info = bundle_info(name)
    with np.load(bundle_folder() / f"{name}.npz") as arrays:
        W, sigma2, lam = (arrays[key] for key in ARRAYS)
    return TrainedModel.from_arrays(W, sigma2, lam, info["model"], info["posterior"], device, dtype, f"pretrained:{name}", info)


def as_model(model, argument: str = "model") -> TrainedModel:
    """A ``TrainedModel`` given as itself or as the name of a shipped bundle."""
    if isinstance(model, TrainedModel):
        return model
    if isinstance(model, str):
        return pretrained(model)
    raise ConfigError(
        f"{argument} must be a trained model (sparse_elbo.load, sparse_elbo.pretrained) or a bundle's name, got {model!r}"
    )


def _image_patches(results: Results) -> dict:
    settings = preprocessing(results.config)
    if settings is None:
        raise ConfigError(f"{results.path}: a bundle is made from a run on image patches (dataset=image_patches)")
    return settings


def write_bundle(folder: str | Path, name: str, results: Results, description: str, provenance: dict, scores: dict) -> Path:
    """Write ``<name>.npz`` and ``<name>.json`` (module docstring) of the finished run ``results`` to
    ``folder``; returns the JSON's path."""
    if results.status != "finished":
        raise ConfigError(f"{results.path}: the run is {results.status}; a bundle is made from a finished run")
    if "amortized" in str(results.config["posterior"].get("_target_", "")).lower():
        raise ConfigError(f"{results.path}: an amortised model's encoder is not bundled; use a per-point family")
    folder = Path(folder)
    final = results.final
    np.savez(folder / f"{name}.npz", W=final["W"], sigma2=final["sigma2"], **{"lambda": final["lambda"]})
    info = {
        "name": name,
        "description": description,
        "preprocessing": _image_patches(results),
        "model": results.config["model"],
        "posterior": results.config["posterior"],
        "sigma2": float(final["sigma2"]),
        "made_by": provenance,
        "scores": scores,
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path
