"""Building a run from a composed config: every check of the config comes first, then the components are
instantiated with ``_target_``. Nothing here trains, and nothing large is allocated before the memory
check has passed."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  torch.optim imports it with the first optimiser: here, so that it is not counted as training time
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig

from sparse_elbo.data import Dataset, split_held_out
from sparse_elbo.errors import ConfigError, InsufficientMemoryError
from sparse_elbo.problem import Problem
from sparse_elbo.trainers.base import Sizes, Trainer
from sparse_elbo.validation import require_at_least, require_one_of

DEVICES = ("cpu", "cuda", "auto")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


@dataclass
class Components:
    """What a run is made of: the data set, the problem (data on the device, model, posterior, objective,
    annealing), the trainer, the posterior factory (for fresh posteriors of the same family) and the
    trainer of the ground-truth fit (None when there is none)."""

    dataset: Dataset
    problem: Problem
    trainer: Trainer
    posterior_factory: object
    ground_truth_trainer: Trainer | None


def resolve_device(name: str) -> torch.device:
    require_one_of("device", name, DEVICES)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; use device=cpu or device=auto")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    require_one_of("dtype", name, tuple(DTYPES))
    return DTYPES[name]


def resolve_n_latents(cfg: DictConfig, dataset: Dataset) -> int:
    n_latents = cfg.n_latents
    if n_latents is None:
        if dataset.W_true is None:
            raise ConfigError("n_latents is missing: set n_latents=<H> (this data set has no generating dictionary)")
        return int(dataset.W_true.shape[1])
    if int(n_latents) < 1:
        raise ConfigError(f"n_latents must be >= 1, got {n_latents}")
    return int(n_latents)


def check_settings(node: DictConfig, key: str) -> None:
    """Every key of a ``_target_`` node (and of the nodes inside it) must be an argument of its target:
    an experiment's settings for one trainer must not reach another."""
    if isinstance(node, ListConfig) or not isinstance(node, DictConfig):
        return
    for name in node:
        check_settings(node[name], f"{key}.{name}")
    if "_target_" not in node:
        return
    try:
        target = get_object(node._target_)
    except Exception as error:  # a misspelt or missing class
        raise ConfigError(f"{key}._target_={node._target_!r} cannot be imported ({error})") from error
    parameters = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(node) - set(parameters) - _HYDRA_KEYS)
    if unknown:
        allowed = ", ".join(p for p in parameters if p not in ("self", "n_data", "n_latents", "n_observed", "generator"))
        names = ", ".join(f"{key}.{name}" for name in unknown)
        raise ConfigError(
            f"{names} {'is not a setting' if len(unknown) == 1 else 'are not settings'} of {node._target_.rsplit('.', 1)[-1]} "
            f"({key}); its settings: {allowed}. To run another component on an experiment's data, choose the sibling "
            "experiment (configs/experiment/)"
        )


def check_results_settings(cfg: DictConfig) -> None:
    results = cfg.results
    require_at_least(
        "results",
        0,
        snapshot_every=results.snapshot_every,
        checkpoint_every=results.checkpoint_every,
        checkpoint_interval_s=checkpoint_interval(cfg),
        max_posterior_numbers=results.max_posterior_numbers,
    )


def checkpoint_interval(cfg: DictConfig) -> float:
    """``results.checkpoint_interval_s``; 0 (every epoch) for runs stored before the key existed."""
    return float(cfg.results.get("checkpoint_interval_s", 0.0))


def check_capabilities(trainer: Trainer, family: str, objective, annealing, name: str = "trainer") -> None:
    """The trainer's declared capabilities against the chosen posterior family, objective and schedule."""
    capabilities, trainer_name = trainer.capabilities, type(trainer).__name__
    if family not in capabilities.families:
        raise ConfigError(
            f"posterior={family} is not supported by {name} {trainer_name}; allowed posteriors: {list(capabilities.families)}"
        )
    if objective.name not in capabilities.objectives:
        raise ConfigError(
            f"objective={objective.name} is not supported by {name} {trainer_name}; "
            f"allowed objectives: {list(capabilities.objectives)}"
        )
    if not capabilities.annealing and annealing.final_epoch() > 0:
        raise ConfigError(
            f"annealing ({type(annealing).__name__}) is not supported by {name} {trainer_name}, which "
            "maximises the unweighted objective; allowed: annealing=none (or a trainer that anneals, e.g. trainer=lbfgs)"
        )


def ground_truth_trainer(cfg: DictConfig, dataset: Dataset, family: str) -> Trainer | None:
    """The trainer of the ground-truth fit for this posterior family (per-data-point posteriors:
    ``evaluation.ground_truth_trainer``; amortised: ``evaluation.ground_truth_encoder_trainer``)."""
    if not cfg.evaluation.ground_truth or dataset.W_true is None:
        return None
    for key in ("ground_truth_trainer", "ground_truth_encoder_trainer"):
        node = cfg.evaluation.get(key)
        if node is not None and family in get_object(node._target_).capabilities.families:
            trainer = instantiate(node)
            if trainer.train_dictionary:
                raise ConfigError(f"evaluation.{key} must keep the dictionary fixed: set evaluation.{key}.train_dictionary=false")
            return trainer
    raise ConfigError(
        f"posterior={family} is supported by neither evaluation.ground_truth_trainer nor "
        "evaluation.ground_truth_encoder_trainer; set evaluation.ground_truth=false"
    )


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _size_key(cfg: DictConfig) -> str:
    return next((f"dataset.{key}" for key in ("n_data", "n_patches", "max_data") if key in cfg.dataset), "the data file's rows")


def check_memory(cfg: DictConfig, trainers: list[Trainer], sizes: Sizes, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before allocating anything large, a run whose arrays cannot fit in the device's memory."""
    itemsize = torch.finfo(dtype).bits // 8
    numbers = sizes.n_data * sizes.n_observed + max(t.working_memory(sizes) for t in trainers)
    needed, available = numbers * itemsize, _available_memory(device)
    if needed > available:
        raise InsufficientMemoryError(
            f"this run needs at least {needed / 2**30:.1f} GiB on {device.type} (posterior={cfg.posterior._target_.rsplit('.', 1)[-1]}, "
            f"N={sizes.n_data} data points, n_latents={sizes.n_latents}, D={sizes.n_observed}, dtype={cfg.dtype}) "
            f"but {available / 2**30:.1f} GiB is available; reduce n_latents or {_size_key(cfg)}, or choose a smaller "
            "posterior family (posterior=diag) or dtype=float32"
        )


def build(cfg: DictConfig) -> Components:
    """Validate the config and build every component; nothing is trained here."""
    for group in ("dataset", "posterior", "objective", "annealing", "trainer", "model", "evaluation"):
        check_settings(cfg[group], group)
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    check_results_settings(cfg)
    torch.manual_seed(int(cfg.seed))
    dataset = instantiate(cfg.dataset)
    n_latents = resolve_n_latents(cfg, dataset)
    objective, annealing, trainer = instantiate(cfg.objective), instantiate(cfg.annealing), instantiate(cfg.trainer)
    posterior_factory = instantiate(cfg.posterior)
    family = posterior_factory.func.family
    check_capabilities(trainer, family, objective, annealing)
    truth_trainer = ground_truth_trainer(cfg, dataset, family)
    x_train, x_held_out = split_held_out(dataset, float(cfg.evaluation.held_out_fraction), int(cfg.seed))
    sizes = Sizes(
        x_train.shape[0],
        dataset.n_observed,
        n_latents,
        posterior_factory.func.parameter_count(
            n_data=x_train.shape[0], n_latents=n_latents, n_observed=dataset.n_observed, **posterior_factory.keywords
        ),
    )
    check_memory(cfg, [t for t in (trainer, truth_trainer) if t is not None], sizes, dtype, device)
    model = instantiate(cfg.model)(
        n_observed=dataset.n_observed, n_latents=n_latents, generator=torch.Generator().manual_seed(int(cfg.seed))
    )
    if objective.requires_unit_norm and model.gauge != "unit_norm":
        raise ConfigError(f"objective={objective.name} needs model.gauge=unit_norm, got {model.gauge!r}")
    posterior = posterior_factory(n_data=x_train.shape[0], n_latents=n_latents, n_observed=dataset.n_observed)
    problem = Problem(
        x=torch.as_tensor(x_train, dtype=dtype, device=device),
        model=model.to(device=device, dtype=dtype),
        posterior=posterior.to(device=device, dtype=dtype),
        objective=objective,
        annealing=annealing,
        seed=int(cfg.seed),
        x_held_out=None if x_held_out is None else torch.as_tensor(x_held_out, dtype=dtype, device=device),
    )
    return Components(dataset, problem, trainer, posterior_factory, truth_trainer)


def results_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / "results.h5"
