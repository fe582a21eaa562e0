"""Encode new data with a trained model: ``python -m sparse_elbo.encode results=PATH data=PATH``.

Writes an HDF5 file of the posterior of every row of the data (``/codes/mean`` (N,H), and ``/codes/std``
(N,H) or ``/codes/scale_tril`` (N,H,H) per the model's family) and the ELBO of each row (``/elbo``, nats),
beside the data as ``<data>.codes.h5`` or where ``out=`` says. Settings (``key=value``):

    results     the trained run's results.h5;  pretrained: or a shipped bundle's name (one of the two)
    data        an (N, D) array file: .npy, .npz, .h5/.hdf5, .mat (required); key: the array's name in it
    out         the output file (default: beside the data), in a folder that exists; never overwritten
    device      cpu | cuda | auto (cuda when there is one);  dtype: float32 | float64
    batch_size  rows fitted at once (memory stays bounded);  iterations: L-BFGS iterations per block
    refine      amortised models: refine the encoder's q per row (true) or keep it (false)

Every setting, the output path, the results file and the data are checked before anything is fitted; a
wrong one is one line ``error: …`` naming it, and exit status 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from sparse_elbo.bundles import pretrained
from sparse_elbo.cli import output_file, run_tool, settings_from_arguments
from sparse_elbo.data import read_data_file
from sparse_elbo.errors import ConfigError
from sparse_elbo.runner import memory
from sparse_elbo.runner.build import resolve_device, resolve_dtype
from sparse_elbo.trained import TrainedModel
from sparse_elbo.validation import require_at_least
from sparse_elbo.version import __version__


@dataclass
class EncodeSettings:
    results: str | None = None
    pretrained: str | None = None
    data: str = "???"
    key: str | None = None
    out: str | None = None
    device: str = "cpu"
    dtype: str = "float64"
    batch_size: int = 4096
    iterations: int = 500
    refine: bool = True


def encode_file(settings: EncodeSettings) -> Path:
    """Fit and write the codes of ``settings.data`` (module docstring); returns the output path. Every
    setting, the output path, the results file and the data are checked before anything is fitted."""
    device, dtype = resolve_device(settings.device), resolve_dtype(settings.dtype)  # as sparse_elbo.train checks them
    require_at_least(1, batch_size=settings.batch_size, iterations=settings.iterations)
    if (settings.results is None) == (settings.pretrained is None):
        raise ConfigError("give the model as results=PATH (a trained run) or pretrained=NAME (a shipped bundle), one of the two")
    if settings.out:
        output_file(settings.out, "out")
    if settings.results:
        model = TrainedModel.load(settings.results, device, dtype)
    else:
        model = pretrained(settings.pretrained, device, dtype)
    x = read_data_file(settings.data, settings.key, argument="data", key_argument="key")
    out = output_file(settings.out or Path(settings.data).with_suffix(".codes.h5"), "out")
    codes = model.encode(x, refine=settings.refine, iterations=settings.iterations, batch_size=settings.batch_size)
    with h5py.File(out, "w-") as f:
        f.attrs.update(
            results=str(settings.results or model.source),
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
    settings = settings_from_arguments(EncodeSettings, arguments)
    memory.retain_freed_memory()  # the command line's choice for its process (runner/memory.py)
    out = encode_file(settings)
    print(out)


if __name__ == "__main__":
    run_tool(main)
