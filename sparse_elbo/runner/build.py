"""Building a run from a composed config: every check of the config comes first (``checks.py``), then the
components are instantiated with ``_target_``, each argument error named by its config path. Nothing here
trains, and nothing large is allocated before the memory check has passed."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  torch.optim imports it with the first optimiser: here, so that it is not counted as training time
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from sparse_elbo.annealing import NoAnnealing
from sparse_elbo.data import Dataset, StreamedRows, rows_of, split_held_out
from sparse_elbo.errors import ConfigError
from sparse_elbo.inference.fit import FitSettings, fit_memory
from sparse_elbo.objectives import EntropyELBO
from sparse_elbo.parallel import Ranks
from sparse_elbo.problem import Problem
from sparse_elbo.runner.checks import check_capabilities, check_memory, check_run_settings, check_settings
from sparse_elbo.runner.loggers import NoLogger
from sparse_elbo.trainers.base import Sizes, Trainer
from sparse_elbo.validation import require_one_of

DEVICES = ("cpu", "cuda", "auto")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Components:
    """What a run is made of: the data set, the problem (data on the device, model, posterior, objective,
    annealing), the trainer, the posterior factory (for fresh posteriors of the same family) and how the
    ground-truth ELBO is fitted (fit settings, or an encoder's trainer; None when there is none)."""

    dataset: Dataset
    problem: Problem
    trainer: Trainer
    posterior_factory: object
    ground_truth: FitSettings | Trainer | None
    logger: object = None  # the logging backend (runner/loggers.py); NoLogger: the results file alone


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


def instantiate_at(node: DictConfig, path: str):
    """``instantiate(node)``, a component's own argument error named by its config path (``max_epochs`` of the
    trainer -> ``trainer.max_epochs``; inside a nested node, Hydra's ``full_key`` names it)."""
    try:
        return instantiate(node)
    except InstantiationException as error:
        cause = next((item for item in _chain(error) if isinstance(item, ConfigError)), None)
        if cause is None:
            raise
        where = re.search(r"full_key: (\S+)", str(error))
        raise cause.under(where.group(1) if where else path) from error
    except ConfigError as error:
        raise error.under(path) from error


def call_at(factory, path: str, **sizes):
    """A partially built component (``_partial_: true``) called with its sizes, its argument errors named by
    their config path."""
    try:
        return factory(**sizes)
    except ConfigError as error:
        raise error.under(path) from error


def _chain(error: BaseException) -> list[BaseException]:
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def ground_truth(cfg: DictConfig, dataset: Dataset, family_class) -> FitSettings | Trainer | None:
    """How the ground-truth ELBO is fitted for this posterior family: per-data-point posteriors by the
    fixed-dictionary fit (``evaluation.ground_truth_fit``), amortised ones by a trainer of the encoder
    (``evaluation.ground_truth_encoder_trainer``); None without a generating dictionary."""
    if not cfg.evaluation.ground_truth or dataset.W_true is None:
        return None
    if not family_class.amortized:
        return instantiate_at(cfg.evaluation.ground_truth_fit, "evaluation.ground_truth_fit")
    trainer = instantiate_at(cfg.evaluation.ground_truth_encoder_trainer, "evaluation.ground_truth_encoder_trainer")
    if trainer is None:
        raise ConfigError(
            f"posterior={family_class.family} needs evaluation.ground_truth_encoder_trainer (a trainer of the encoder at "
            "the generator's W) for the ground-truth ELBO; set one, or evaluation.ground_truth=false"
        )
    if trainer.train_dictionary:
        raise ConfigError(
            "evaluation.ground_truth_encoder_trainer must keep the dictionary fixed: set "
            "evaluation.ground_truth_encoder_trainer.train_dictionary=false"
        )
    check_capabilities(trainer, family_class, EntropyELBO(), NoAnnealing(), "evaluation.ground_truth_encoder_trainer")
    return trainer


def _working_numbers(trainer: Trainer, truth, sizes: Sizes) -> list[int]:
    numbers = [trainer.working_memory(sizes)]
    if isinstance(truth, Trainer):
        numbers.append(truth.working_memory(sizes))
    elif truth is not None:
        numbers.append(fit_memory(sizes.n_data, sizes.n_latents, sizes.posterior_numbers))
    return numbers


def _training_rows(cfg: DictConfig, dataset: Dataset, ranks: Ranks, dtype, device, streamed: bool):
    """This rank's share of the training data (N_rank, D) — in memory, or rows left in their file and read as
    the trainer asks (``dataset.stream``) — and the held-out points (every rank all of them)."""
    if streamed and float(cfg.evaluation.held_out_fraction) > 0:
        raise ConfigError("dataset.stream=true leaves the data in their file: evaluation.held_out_fraction must be 0")
    x_train, x_held_out = split_held_out(dataset, float(cfg.evaluation.held_out_fraction), int(cfg.seed))
    shard, origin = ranks.shard(x_train.shape[0]), f"dataset={dataset.name}"
    if streamed:
        return StreamedRows(x_train[shard], dtype, device, origin), x_held_out
    return rows_of(x_train, shard, origin), x_held_out


def build(cfg: DictConfig, ranks: Ranks | None = None) -> Components:
    """Validate the config and build every component; nothing is trained here. ``ranks``: this process's
    place in a data-parallel run (``parallel.py``): its problem holds its shard of the training data."""
    ranks = ranks or Ranks()
    check_run_settings(cfg)
    for group in ("dataset", "posterior", "objective", "annealing", "trainer", "model", "evaluation", "logger"):
        if group in cfg:  # (a run stored before the logger group existed has none)
            check_settings(cfg[group], group)
    device, dtype = ranks.device(resolve_device(cfg.device)), resolve_dtype(cfg.dtype)
    torch.manual_seed(int(cfg.seed))
    objective, annealing = instantiate_at(cfg.objective, "objective"), instantiate_at(cfg.annealing, "annealing")
    trainer, posterior_factory = instantiate_at(cfg.trainer, "trainer"), instantiate_at(cfg.posterior, "posterior")
    logger = instantiate_at(cfg.logger, "logger") if "logger" in cfg else NoLogger()
    with torch.random.fork_rng(devices=[]):  # its settings, checked before any data, leaving the run's random numbers alone
        call_at(posterior_factory, "posterior", n_data=1, n_latents=1, n_observed=1)
    family_class = posterior_factory.func
    streamed = bool(cfg.dataset.get("stream", False))
    check_capabilities(trainer, family_class, objective, annealing, "trainer", ranks.size, streamed, device.type)
    dataset = instantiate_at(cfg.dataset, "dataset")
    n_latents = resolve_n_latents(cfg, dataset)
    truth = ground_truth(cfg, dataset, family_class)
    x_train, x_held_out = _training_rows(cfg, dataset, ranks, dtype, device, streamed)
    sizes = Sizes(
        x_train.shape[0],
        dataset.n_observed,
        n_latents,
        posterior_factory.func.parameter_count(
            n_data=x_train.shape[0], n_latents=n_latents, n_observed=dataset.n_observed, **posterior_factory.keywords
        ),
    )
    numbers = _working_numbers(trainer, truth, sizes)
    check_memory(cfg, numbers, sizes, dtype, device, ranks.size, trainer.capabilities.data_parallel, not streamed)
    model = call_at(
        instantiate_at(cfg.model, "model"),
        "model",
        n_observed=dataset.n_observed,
        n_latents=n_latents,
        generator=torch.Generator().manual_seed(int(cfg.seed)),
    )
    if objective.requires_unit_norm and model.gauge != "unit_norm":
        raise ConfigError(f"objective={objective.name} needs model.gauge=unit_norm, got {model.gauge!r}")
    posterior = call_at(
        posterior_factory, "posterior", n_data=x_train.shape[0], n_latents=n_latents, n_observed=dataset.n_observed
    )
    problem = Problem(
        x=x_train if streamed else torch.as_tensor(x_train, dtype=dtype, device=device),
        model=model.to(device=device, dtype=dtype),
        posterior=posterior.to(device=device, dtype=dtype),
        objective=objective,
        annealing=annealing,
        seed=int(cfg.seed),
        x_held_out=None if x_held_out is None else torch.as_tensor(x_held_out, dtype=dtype, device=device),
    )
    return Components(dataset, problem, trainer, posterior_factory, truth, logger)


def results_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / "results.h5"
