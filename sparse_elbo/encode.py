"""Encode new data with a trained model: ``python -m sparse_elbo.encode results=PATH data=PATH``.

Writes an HDF5 file of the posterior of every row of the data (``/codes/mean`` (N,H), and ``/codes/std``
(N,H) or ``/codes/scale_tril`` (N,H,H) per the model's family) and the ELBO of each row (``/elbo``, nats),
beside the data as ``<data>.codes.h5`` or where ``out=`` says. Settings (``key=value``):

    results     the trained run's results.h5 (required)
    data        an (N, D) array file: .npy, .npz, .h5/.hdf5, .mat (required); key: the array's name in it
    out         the output file (default: beside the data); an existing file is never overwritten
    device      cpu | cuda;  dtype: float32 | float64
    batch_size  rows fitted at once (memory stays bounded);  iterations: L-BFGS iterations per block
    refine      amortised models: refine the encoder's q per row (true) or keep it (false)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from sparse_elbo.cli import run_tool, settings_from_arguments
from sparse_elbo.data import load_file
from sparse_elbo.errors import ExistingFileError
from sparse_elbo.trained import TrainedModel
from sparse_elbo.validation import require_at_least, require_one_of
from sparse_elbo.version import __version__


@dataclass
class EncodeSettings:
    results: str = "???"
    data: str = "???"
    key: str | None = None
    out: str | None = None
    device: str = "cpu"
    dtype: str = "float64"
    batch_size: int = 4096
    iterations: int = 500
    refine: bool = True


def output_path(settings: EncodeSettings) -> Path:
    out = Path(settings.out) if settings.out else Path(settings.data).with_suffix(".codes.h5")
    if out.exists():
        raise ExistingFileError(f"out={str(out)!r} already exists: choose another out=")
    return out


def encode_file(settings: EncodeSettings) -> Path:
    """Fit and write the codes of ``settings.data`` (module docstring); returns the output path."""
    require_one_of("device", settings.device, ("cpu", "cuda"))
    require_one_of("dtype", settings.dtype, ("float32", "float64"))
    require_at_least(1, batch_size=settings.batch_size, iterations=settings.iterations)
    out = output_path(settings)
    x = load_file(settings.data, settings.key).x
    model = TrainedModel.load(settings.results, settings.device, getattr(torch, settings.dtype))
    codes = model.encode(x, refine=settings.refine, iterations=settings.iterations, batch_size=settings.batch_size)
    with h5py.File(out, "w-") as f:
        f.attrs.update(
            results=str(settings.results),
            data=str(settings.data),
            key=settings.key or "",
            family=model.family,
            versions=f"sparse_elbo={__version__} torch={torch.__version__}",
        )
        for name in ("mean", "std", "scale_tril"):
            if getattr(codes, name) is not None:
                f.create_dataset(f"codes/{name}", data=np.asarray(getattr(codes, name)))
        f.create_dataset("elbo", data=np.asarray(codes.elbo))
    return out


def main(arguments: list[str]) -> None:
    out = encode_file(settings_from_arguments(EncodeSettings, arguments))
    print(out)


if __name__ == "__main__":
    run_tool(main)
