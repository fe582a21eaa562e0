"""Write image patches once to an HDF5 file, for runs that read their data from disk (docs/scaling.md).

    python -m sparse_elbo.patches out=patches.h5 [seed=0] [dataset.KEY=VALUE ...]

The patches are those ``dataset=image_patches`` with the same settings would cut (``dataset.source``,
``dataset.path``, ``dataset.patch_size``, ``dataset.n_patches``, ``dataset.whiten_images``, ``dataset.remove_dc``,
...; configs/dataset/image_patches.yaml), drawn with ``seed``. The file holds ``x`` (N, p²) float32, ``positions``
(N, 3) int64 (image index, top row, left column), ``images`` (the images' names) and the settings as attributes
(``x`` has the patch's ``image_shape``, which a run on the file reads: its figures and localisation).
The patches are cut and written in blocks (the images are held, the patches never all at once). A run then
reads it with ``dataset=file dataset.path=patches.h5 dataset.key=x``: a ``.h5`` data set is read by each rank's
shard of rows, not whole (``dataset.stream=true``: by minibatches). ``out`` must be a new ``.h5`` file in a folder that exists.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from omegaconf import OmegaConf

from sparse_elbo.cli import output_file, run_tool
from sparse_elbo.config import compose
from sparse_elbo.errors import ConfigError
from sparse_elbo.runner.build import instantiate_at
from sparse_elbo.version import __version__


def write_patches(out: str | Path, overrides: list[str] = (), block_rows: int = 65536) -> Path:
    """Cut the patches ``dataset=image_patches`` with ``overrides`` (``dataset.*``, ``seed``) gives and write them
    to the new HDF5 file ``out`` (module docstring), ``block_rows`` patches at a time: the images are in memory,
    the patches never all at once. Returns its path."""
    file = output_file(out, "out", suffixes=(".h5", ".hdf5"))
    cfg = compose(["dataset=image_patches", *overrides])
    planned = OmegaConf.merge(cfg.dataset, {"_target_": "sparse_elbo.images.plan_image_patches"})
    plan = instantiate_at(planned, "dataset")  # its errors name the setting the user wrote
    n, d = plan.n_patches, plan.patch_size**2
    with h5py.File(file, "w-") as f:
        x = f.create_dataset("x", shape=(n, d), dtype=np.float32, chunks=(min(4096, n), d))
        x.attrs["image_shape"] = (plan.patch_size, plan.patch_size)  # a run on the file draws fields, localisation
        for start in range(0, n, block_rows):
            rows = slice(start, min(start + block_rows, n))
            x[rows] = plan.cut(rows).astype(np.float32)
        f.create_dataset("positions", data=plan.info["positions"])
        f.create_dataset("images", data=np.array(plan.info["images"], dtype=h5py.string_dtype()))
        f.attrs["settings"] = OmegaConf.to_yaml(cfg.dataset, resolve=True)
        f.attrs["versions"] = f"sparse_elbo={__version__}"
    return file


def main(arguments: list[str]) -> None:
    outs = [argument.split("=", 1)[1] for argument in arguments if argument.startswith("out=")]
    others = [argument for argument in arguments if not argument.startswith("out=")]
    if len(outs) != 1:
        raise ConfigError("give the output file as out=PATH.h5, once")
    unknown = [argument for argument in others if not argument.startswith(("dataset.", "seed="))]
    if unknown:
        raise ConfigError(
            f"{unknown[0]!r}: the settings are out=, seed= and dataset.KEY=VALUE (configs/dataset/image_patches.yaml)"
        )
    print(write_patches(outs[0], others))


if __name__ == "__main__":
    run_tool(main)
