"""Every check of a composed config that can be made before anything is built or computed: each key of a
component is one of its arguments and of the type it declares, the run's own settings are in range, the
chosen trainer can train the chosen posterior family, objective and schedule (its capabilities, as data), and
the run's arrays fit in memory. Each failure is one ``ConfigError`` naming the config key."""

from __future__ import annotations

import inspect
import math
import types
import typing

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from sparse_elbo.config import posterior_families, posterior_family, trainers_with
from sparse_elbo.errors import ConfigError, InsufficientMemoryError
from sparse_elbo.trainers.base import Sizes, Trainer
from sparse_elbo.validation import invalid, require_at_least

_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
_SIZE_ARGUMENTS = ("self", "n_data", "n_latents", "n_observed", "generator")
# the run's own settings (not arguments of a component) and their types
RUN_SETTINGS = {
    "seed": int,
    "n_latents": int | None,
    "device": str,
    "dtype": str,
    "evaluation.gini_samples": int,
    "evaluation.gini_data_points": int,
    "evaluation.recovery_threshold": float,
    "evaluation.ground_truth": bool,
    "evaluation.held_out_fraction": float,
    "evaluation.held_out_refine_iterations": int,
    "evaluation.importance_samples": int,
    "evaluation.gradient_variance_repeats": int,
    "evaluation.gradient_variance_batch": int,
    "results.snapshot_every": int,
    "results.checkpoint_every": int,
    "results.checkpoint_interval_s": float,
    "results.max_posterior_numbers": int,
}
_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _accepts(kind: type, value) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()
    return isinstance(value, kind)


def check_type(key: str, value, annotation) -> None:
    """``value`` against the argument's annotation: a scalar one (``int``, ``float``, ``bool``, ``str``, or a
    union of those with None) takes a value of that kind; a component (a class or protocol) takes a config node
    with ``_target_``, not a word or a number. Lists and unresolved annotations are the component's own to check."""
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    options = typing.get_args(annotation) if union else (annotation,)
    if value is None and type(None) in options:
        return
    scalars = [kind for kind in options if kind in _NAMES]
    if not scalars:
        sequence = any(typing.get_origin(kind) in (tuple, list) for kind in options)
        if sequence and not isinstance(value, ListConfig):
            raise invalid(key, f"must be a list, got {value!r}")
        if not sequence and isinstance(value, (str, int, float, bool)):
            raise invalid(key, f"must be a component, a config node with _target_ (an option of its config group), got {value!r}")
        return
    if len(scalars) + (type(None) in options) < len(options):
        return
    if isinstance(value, (DictConfig, ListConfig)) or not any(_accepts(kind, value) for kind in scalars):
        allowed = " or ".join([_NAMES[kind] for kind in scalars] + (["null"] if type(None) in options else []))
        raise invalid(key, f"must be {allowed}, got {value!r}")


def _annotations(target) -> dict:
    try:
        return typing.get_type_hints(target.__init__ if inspect.isclass(target) else inspect.unwrap(target))
    except (NameError, TypeError):  # an annotation that cannot be resolved: left to the component
        return {}


def check_settings(node: DictConfig, key: str) -> None:
    """Every key of a ``_target_`` node (and of the nodes inside it) must be an argument of its target, of the
    type it declares: an experiment's settings for one trainer must not reach another, and a word where a
    number belongs is named before anything is built."""
    if isinstance(node, ListConfig) or not isinstance(node, DictConfig):
        return
    for name in node:
        check_settings(node[name], f"{key}.{name}")
    if "_target_" not in node:
        return
    try:
        target = get_object(node._target_)
    except (ImportError, AttributeError, ValueError) as error:  # a misspelt or missing class
        raise invalid(f"{key}._target_", f"={node._target_!r} cannot be imported ({error})") from error
    parameters = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(node) - set(parameters) - _HYDRA_KEYS)
    if unknown:
        allowed = ", ".join(p for p in parameters if p not in _SIZE_ARGUMENTS)
        names = ", ".join(f"{key}.{name}" for name in unknown)
        raise ConfigError(
            f"{names} {'is not a setting' if len(unknown) == 1 else 'are not settings'} of {node._target_.rsplit('.', 1)[-1]} "
            f"({key}); its settings: {allowed}. To run another component on an experiment's data, choose the sibling "
            f"experiment (configs/experiment/), or drop them: {' '.join(repr(f'~{key}.{name}') for name in unknown)}"
        )
    annotations = _annotations(target)
    for name in set(node) - _HYDRA_KEYS:
        if name in annotations:
            check_type(f"{key}.{name}", node[name], annotations[name])


def check_run_settings(cfg: DictConfig) -> None:
    """The run's own settings (``RUN_SETTINGS``): their types, then their ranges."""
    for key, kind in RUN_SETTINGS.items():
        parent, _, name = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if node is not None and name in node:
            check_type(key, node[name], kind)
    results, evaluation = cfg.results, cfg.evaluation
    settings = {
        "results.snapshot_every": results.snapshot_every,
        "results.checkpoint_every": results.checkpoint_every,
        "results.checkpoint_interval_s": checkpoint_interval(cfg),
        "results.max_posterior_numbers": results.max_posterior_numbers,
        "evaluation.held_out_refine_iterations": evaluation.held_out_refine_iterations,
        "evaluation.gradient_variance_repeats": evaluation.gradient_variance_repeats,
        "evaluation.held_out_fraction": evaluation.held_out_fraction,
    }
    require_at_least(0, **settings)
    require_at_least(
        1,
        **{
            "evaluation.gini_samples": evaluation.gini_samples,
            "evaluation.gradient_variance_batch": evaluation.gradient_variance_batch,
        },
    )
    require_at_least(2, **{"evaluation.importance_samples": evaluation.importance_samples})


def checkpoint_interval(cfg: DictConfig) -> float:
    """``results.checkpoint_interval_s``; 0 (every epoch) for runs stored before the key existed."""
    return float(cfg.results.get("checkpoint_interval_s", 0.0))


def _allowed_families(kinds: tuple[str, ...]) -> list[str]:
    return [name for name in posterior_families() if posterior_family(name).kind() in kinds]


def check_capabilities(
    trainer: Trainer,
    family_class,
    objective,
    annealing,
    name: str = "trainer",
    ranks: int = 1,
    streamed: bool = False,
    device_type: str = "cpu",
) -> None:
    """The trainer's declared capabilities against the chosen posterior family, objective and schedule, the
    number of ranks the run has, and whether its data stay in their file (``dataset.stream``)."""
    capabilities, trainer_name, family = trainer.capabilities, type(trainer).__name__, family_class.family
    if streamed and not capabilities.streams_data:
        raise ConfigError(
            f"dataset.stream=true: {name} {trainer_name} holds its data in memory; trainers that read them by "
            f"rows: {trainers_with('streams_data')} (docs/scaling.md)"
        )
    if streamed and getattr(getattr(trainer, "driver", None), "block_size", 0) is None and device_type == "cuda":
        raise ConfigError(
            f"dataset.stream=true on CUDA: set {name}.driver.block_size (null takes the whole data set as one block on a GPU)"
        )
    if streamed and getattr(getattr(trainer, "initialisation", None), "holds_all_rows", False):
        raise ConfigError(
            f"dataset.stream=true: {name}.initialisation learns from every data point in memory; "
            f"set {name}.initialisation.n_points to the rows it may hold"
        )
    if ranks > 1 and not capabilities.data_parallel:
        raise ConfigError(
            f"{name} {trainer_name} is not data-parallel and cannot run on {ranks} ranks; "
            f"data-parallel trainers: {trainers_with('data_parallel')} (docs/scaling.md)"
        )
    if family_class.kind() not in capabilities.posteriors:
        allowed = _allowed_families(capabilities.posteriors)
        raise ConfigError(f"posterior={family} is not supported by {name} {trainer_name}; allowed posteriors: {allowed}")
    missing = sorted(set(trainer.required_features()) - family_class.features)
    if missing:
        raise ConfigError(
            f"posterior={family} lacks {', '.join(missing)}, which {name} {trainer_name} needs with these settings "
            f"(docs/design.md §7.4)"
        )
    if objective.name not in capabilities.objectives:
        raise ConfigError(
            f"objective={objective.name} is not supported by {name} {trainer_name}; allowed objectives: {list(capabilities.objectives)}"
        )
    if not capabilities.annealing and annealing.final_epoch() > 0:
        raise ConfigError(
            f"annealing ({type(annealing).__name__}) is not supported by {name} {trainer_name}, which "
            "maximises the unweighted objective; allowed: annealing=none (or a trainer that anneals, e.g. trainer=lbfgs)"
        )
    if annealing.holds_prior_scale:
        for owner, scales in (
            (f"{name} {trainer_name}", capabilities.prior_scales),
            (f"objective={objective.name}", objective.prior_scales),
        ):
            if "fixed" not in scales:
                raise ConfigError(
                    f"annealing.prior_scale=fixed is not supported by {owner}; allowed: annealing.prior_scale=optimal"
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


def check_memory(
    cfg: DictConfig,
    working_numbers: list[int],
    sizes: Sizes,
    dtype: torch.dtype,
    device: torch.device,
    ranks: int = 1,
    data_parallel: bool = False,
    data_in_memory: bool = True,
) -> None:
    """Refuse, before allocating anything large, a run whose arrays cannot fit in the device's memory;
    ``working_numbers``: what each of its trainers and fits holds beyond the data (numbers, not bytes). In a
    data-parallel run ``sizes`` are the rank's shard's; a data-parallel trainer's refusal names how many ranks
    of such devices would hold the run (its per-point arrays shrink with the shards); ``data_in_memory`` False:
    the data stay in their file (``dataset.stream``)."""
    itemsize = torch.finfo(dtype).bits // 8
    numbers = sizes.n_data * sizes.n_observed * data_in_memory + max(working_numbers)
    needed, available = numbers * itemsize, _available_memory(device)
    if needed > available:
        per_rank = f" per rank of {ranks}" if ranks > 1 else ""
        more = f", or run it on at least {math.ceil(needed * ranks / available)} ranks (docs/scaling.md)" if data_parallel else ""
        raise InsufficientMemoryError(
            f"this run needs at least {needed / 2**30:.1f} GiB{per_rank} on {device.type} (posterior={cfg.posterior._target_.rsplit('.', 1)[-1]}, "
            f"N={sizes.n_data} data points, n_latents={sizes.n_latents}, D={sizes.n_observed}, dtype={cfg.dtype}) "
            f"but {available / 2**30:.1f} GiB is available; reduce n_latents or {_size_key(cfg)}, or choose a smaller "
            f"posterior family (posterior=diag) or dtype=float32{more}"
        )
