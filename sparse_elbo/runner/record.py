"""The record of each epoch: the evaluation after it, as one row of ``/metrics`` (and a dictionary
snapshot), checked for non-finite values before it is written."""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from sparse_elbo import metrics
from sparse_elbo.evaluation import evaluate_problem, sparseness
from sparse_elbo.gradients import gradient_variance
from sparse_elbo.held_out import encoder_elbo
from sparse_elbo.model import ModelAt
from sparse_elbo.objectives import ObjectiveValue
from sparse_elbo.results import ResultsWriter
from sparse_elbo.runner.build import Components
from sparse_elbo.runner.loggers import epoch_record


def metric_row(cfg: DictConfig, components: Components, epoch: int, weights, train_time: float) -> tuple[dict, ObjectiveValue]:
    """The evaluation of one epoch: the exact unweighted objective and its terms, σ², λ, the weights,
    Gini, wall time; where they apply the held-out encoder ELBO, the gradient variance, field recovery
    (data with a generating dictionary) and localisation (image patches). Over all data points, or over the
    points whose posteriors the epoch fitted when the trainer works on a subset per epoch."""
    problem, dataset, evaluation = components.problem, components.dataset, cfg.evaluation
    points = components.trainer.evaluated_points(problem, epoch)
    value = evaluate_problem(problem, weights, points=points)
    gini_mean, gini_std = sparseness(problem, evaluation.gini_samples, evaluation.gini_data_points, points)
    row = {
        "epoch": epoch,
        "elbo": value.elbo,
        **value.terms,
        "sigma2": value.sigma2,
        "lambda": value.lam,
        "weight_likelihood": weights.likelihood,
        "weight_prior": weights.prior,
        "weight_entropy": weights.entropy,
        "gini_mean": gini_mean,
        "gini_std": gini_std,
        "wall_time": train_time,
    }
    if problem.x_held_out is not None and problem.posterior.amortized:
        at_optimum = ModelAt(problem.model.W, value.sigma2, value.lam, problem.model.prior)
        row["held_out_elbo_encoder"] = encoder_elbo(problem.x_held_out, problem.posterior, at_optimum)
    if evaluation.gradient_variance_repeats > 0:
        index = torch.arange(min(int(evaluation.gradient_variance_batch), problem.x.shape[0]), device=problem.x.device)
        noise = gradient_variance(problem, index, int(evaluation.gradient_variance_repeats), weights, int(cfg.seed))
        row["gradient_variance"], row["gradient_variance_relative"] = noise.total, noise.relative
    W = problem.model.W.detach().cpu().numpy()
    if dataset.W_true is not None:
        row["min_matched_cosine"] = metrics.match_fields(
            np.nan_to_num(W), dataset.W_true, evaluation.recovery_threshold
        ).min_cosine
    elif dataset.image_shape is not None:
        row["localisation_median"] = float(np.median(metrics.localisation_index(W, dataset.image_shape)))
    return row, value


def check_finite(row: dict, problem, epoch: int) -> None:
    """A non-finite metric or parameter stops the run, naming the epoch and what went wrong."""
    bad = [k for k, v in row.items() if not np.isfinite(np.asarray(v.detach().cpu() if torch.is_tensor(v) else v)).all()]
    if bad:
        raise FloatingPointError(f"non-finite values at epoch {epoch}: {', '.join(bad)}")
    for owner, module in (("model", problem.model), ("posterior", problem.posterior)):
        for name, value in module.named_parameters():
            if not bool(torch.isfinite(value).all()):
                raise FloatingPointError(f"non-finite values at epoch {epoch}: parameter {owner}.{name}")


class EpochRecorder:
    """``evaluate(epoch, weights, train_time)`` for the training loop: computes the row, checks it, writes
    it with a snapshot of W (every ``results.snapshot_every`` epochs), hands its record to the run's logger
    (``loggers.py``; ``last`` keeps the latest) and updates the progress bar."""

    def __init__(self, cfg: DictConfig, components: Components, writer: ResultsWriter, guard, bar, logger=None):
        self.cfg, self.components, self.writer, self.guard, self.bar = cfg, components, writer, guard, bar
        self.logger, self.last = logger, None

    def __call__(self, epoch: int, weights, train_time: float) -> ObjectiveValue:
        problem = self.components.problem
        row, value = metric_row(self.cfg, self.components, epoch, weights, train_time)
        check_finite(row, problem, epoch)
        every = self.cfg.results.snapshot_every
        with self.guard.writing():
            self.writer.append_epoch(row, problem.model.W.detach() if every > 0 and epoch % every == 0 else None)
        if self.logger is not None:
            self.last = epoch_record(row, problem.model.W.detach().cpu().numpy())
            self.logger.epoch(self.last)
        self.bar.update(1)
        self.bar.set_postfix(elbo=f"{float(value.elbo):.4f}")
        return value
