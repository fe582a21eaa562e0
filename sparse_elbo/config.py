"""The shipped configs and composing them. The configs are ``configs/`` at the top of the repository and
are packaged inside the wheel as ``sparse_elbo/configs``, so that an installed package finds them from
any directory."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def config_dir() -> Path:
    """The config directory: inside the installed package, or ``configs/`` of a source checkout (an
    editable install)."""
    packaged = Path(__file__).resolve().parent / "configs"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[1] / "configs"


def compose(
    overrides: list[str] | tuple[str, ...] = (), config_name: str = "train", return_hydra_config: bool = False
) -> DictConfig:
    """The config a command line ``python -m sparse_elbo.train OVERRIDES`` would run, e.g.
    ``compose(["experiment=patches_em_small", "seed=1"])``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
