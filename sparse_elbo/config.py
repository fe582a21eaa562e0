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


def posterior_families() -> list[str]:
    """The posterior families shipped as ``configs/posterior/<name>.yaml``: what ``posterior=`` accepts."""
    return sorted(path.stem for path in (config_dir() / "posterior").glob("*.yaml"))


def posterior_family(name: str, per_data_point: bool = False):
    """The class of the posterior family ``posterior=<name>`` (its YAML's ``_target_``); with
    ``per_data_point``, only a family with parameters per data point is allowed."""
    from hydra.utils import get_object
    from omegaconf import OmegaConf

    from sparse_elbo.validation import require_one_of

    def load(family: str):
        return get_object(OmegaConf.load(config_dir() / "posterior" / f"{family}.yaml")._target_)

    allowed = [family for family in posterior_families() if not (per_data_point and load(family).amortized)]
    require_one_of("family", name, tuple(allowed))
    return load(name)


def trainers_with(capability: str) -> list[str]:
    """The trainers shipped as ``configs/trainer/<name>.yaml`` whose class declares ``capability`` (a flag of
    ``trainers.base.Capabilities``: ``data_parallel``, ``streams_data``; docs/scaling.md)."""
    from hydra.utils import get_object
    from omegaconf import OmegaConf

    names = sorted(path.stem for path in (config_dir() / "trainer").glob("*.yaml"))
    return [
        name
        for name in names
        if getattr(get_object(OmegaConf.load(config_dir() / "trainer" / f"{name}.yaml")._target_).capabilities, capability)
    ]
