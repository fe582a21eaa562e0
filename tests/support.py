"""What several test modules share: small problems of the package's own classes, one E-step, the option lists
of configs/, and how a run that must be refused is checked (in-process, as the command line reports it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import sparse_elbo
from sparse_elbo.annealing import AnnealingWeights, NoAnnealing
from sparse_elbo.cli import user_error_message
from sparse_elbo.config import config_dir
from sparse_elbo.data import make_bars
from sparse_elbo.inference.e_step import AnalyticEStep, BlockLBFGS
from sparse_elbo.inference.statistics import SufficientStatistics
from sparse_elbo.model import SparseCodingModel
from sparse_elbo.objectives import EntropyELBO
from sparse_elbo.posteriors import DiagonalPosterior, FullCovariancePosterior
from sparse_elbo.problem import Problem
from sparse_elbo.trainers.em import EMTrainer

POSTERIORS = {"diag": DiagonalPosterior, "full": FullCovariancePosterior}


def statistics_of(problem, index=None):
    """The sufficient statistics of the data points ``index`` (all when None) of a problem."""
    x = problem.x if index is None else problem.x[index]
    return SufficientStatistics.of(x, problem.q(index), problem.model.prior, problem.x.shape[0])


def set_full_data_optima(problem):
    """The model's σ², λ ← the full-data optima σ²*, λ* of the current W and q (as EM does each iteration)."""
    EMTrainer._set_noise_and_prior_scale(problem, statistics_of(problem))


def e_step(problem, index, e_step_objective=None, iterations=100, tolerance=1e-9, weights=None):
    """One block E-step on the data points ``index`` (default: the analytic ELBO at the model's σ², λ)."""
    objective = e_step_objective or AnalyticEStep()
    block_loss = objective.block_loss(problem.x[index], problem.posterior, problem.model, weights or AnnealingWeights())
    BlockLBFGS(iterations, None, 20, tolerance).optimise(problem.posterior, index, problem.model, block_loss)


def closed_form_m_step(trainer, problem):
    """The trainer's M-step from the current posteriors of every point, then the latents follow the gauge fix."""
    problem.posterior.rescale_latents(trainer.m_step(problem.model, statistics_of(problem)))


def small_problem(family="diag", n_data=60, grid=3, seed=0, n_latents=None):
    data = make_bars(grid=grid, n_data=n_data, noise=0.2, seed=seed)
    H = n_latents or data.W_true.shape[1]
    generator = torch.Generator().manual_seed(seed)
    model = SparseCodingModel(data.n_observed, H, generator=generator).double()
    posterior = POSTERIORS[family](n_data, H, init_std=0.3).double()
    x = torch.as_tensor(data.x)
    return Problem(x=x, model=model, posterior=posterior, objective=EntropyELBO(), annealing=NoAnnealing(), seed=seed)


def options(group: str) -> list[str]:
    """The options of a config group, as configs/ ships them."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def target(group: str, option: str):
    """The class an option's YAML names."""
    from hydra.utils import get_object

    return get_object(OmegaConf.load(config_dir() / group / f"{option}.yaml")._target_)


def refusal(overrides: list[str], output: Path) -> str:
    """The one-line message the command line would print (after ``error:``) for a run with these overrides,
    checked in-process: the error is a user error, on one line, and no results file was written."""
    with pytest.raises(Exception) as error:  # a UserError, or Hydra's composition error around one
        sparse_elbo.run(sparse_elbo.compose(overrides), output, progress=False)
    message = user_error_message(error.value)
    assert message is not None, f"{overrides}: not a user error: {type(error.value).__name__}: {error.value}"
    assert message and "\n" not in message
    assert not (output / "results.h5").exists(), f"{overrides}: refused after the results file was written"
    return message
