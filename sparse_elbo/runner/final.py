"""The final evaluation of a trained run: what ``/final`` of the results file holds and the summary
printed at the end."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from sparse_elbo import metrics, parallel
from sparse_elbo.evaluation import evaluate_problem, ground_truth_elbo, ground_truth_elbo_by_trainer
from sparse_elbo.held_out import held_out_metrics
from sparse_elbo.runner.build import Components
from sparse_elbo.trainers.base import FitOutcome, Trainer


@dataclass
class RunSummary:
    results_path: Path
    elbo: float
    ground_truth_elbo: float | None
    min_cosine: float | None
    recovered: bool | None
    sigma: float
    lambda_range: tuple[float, float]
    epochs: int
    stop_reason: str
    train_time: float
    held_out: dict | None = None

    def lines(self) -> list[str]:
        out = [f"final ELBO            {self.elbo:.4f} nats per data point"]
        if self.ground_truth_elbo is not None:
            out.append(f"ground-truth ELBO     {self.ground_truth_elbo:.4f} (W fixed to the generator's)")
        if self.min_cosine is not None:
            out.append(
                f"min matched |cosine|  {self.min_cosine:.4f} ({'all fields recovered' if self.recovered else 'NOT all recovered'})"
            )
        out += [
            f"sigma                 {self.sigma:.4f}",
            f"lambda range          [{self.lambda_range[0]:.4f}, {self.lambda_range[1]:.4f}]",
            f"training time         {self.train_time:.2f} s over {self.epochs} epochs (stop: {self.stop_reason})",
        ]
        if self.held_out:
            h = self.held_out
            if "held_out_elbo_encoder" in h:
                out.append(
                    f"held-out ELBO encoder {h['held_out_elbo_encoder']:.4f} (amortisation gap {h['amortization_gap']:.4f} nats)"
                )
            out += [
                f"held-out ELBO refined {h['held_out_elbo_refined']:.4f} over {int(h['held_out_n'])} held-out points",
                f"held-out log p(x)     {h['held_out_log_px']:.4f} +- {h['held_out_log_px_stderr']:.4f} (importance sampled)",
            ]
        return [*out, f"results               {self.results_path}"]


def _held_out(cfg: DictConfig, components: Components) -> dict | None:
    problem = components.problem
    if problem.x_held_out is None:
        return None
    evaluation = cfg.evaluation
    with parallel.local():  # every rank holds the held-out points whole
        return held_out_metrics(
            problem.x_held_out,
            problem.posterior,
            problem.model,
            int(evaluation.held_out_refine_iterations),
            int(evaluation.importance_samples),
            int(cfg.seed),
        )


def _recovery(cfg: DictConfig, components: Components) -> dict:
    """Field matching against the generating dictionary, and the ground-truth ELBO (W fixed to it)."""
    problem, dataset = components.problem, components.dataset
    match = metrics.match_fields(problem.model.W.detach().cpu().numpy(), dataset.W_true, cfg.evaluation.recovery_threshold)
    out = {
        "min_matched_cosine": match.min_cosine,
        "recovered": match.recovered,
        "matched_cosines": match.cosines,
        "assignment": match.assignment,
    }
    truth, factory, prior, seed = components.ground_truth, components.posterior_factory, problem.model.prior, int(cfg.seed)
    W_true = torch.as_tensor(dataset.W_true, dtype=problem.x.dtype, device=problem.x.device)
    if isinstance(truth, Trainer):  # an amortised family: its encoder trained at W_true
        out["ground_truth_elbo"] = ground_truth_elbo_by_trainer(problem.x, W_true, factory, prior, truth, seed)
    elif truth is not None:
        out["ground_truth_elbo"] = ground_truth_elbo(problem.x, W_true, factory, prior, truth, seed)
    return out


def final_evaluation(cfg: DictConfig, components: Components, outcome: FitOutcome, results_path: Path) -> tuple[dict, RunSummary]:
    """``/final``: W, σ², λ (set to the exact optima for the entropy objective), the unweighted ELBO, the
    outcome, held-out metrics, localisation (image patches), field
    recovery and the ground-truth ELBO (data with a generating dictionary); and the run's summary."""
    problem, dataset = components.problem, components.dataset
    value = evaluate_problem(problem, problem.annealing(10**9))
    problem.model.set_noise_and_prior_scale(value.sigma2.detach(), value.lam.detach())
    final = {
        "W": problem.model.W.detach(),
        "sigma2": value.sigma2,
        "lambda": value.lam,
        "elbo": value.elbo,
        "epochs": outcome.epochs,
        "converged": outcome.converged,
        "stop_reason": outcome.stop_reason,
        "train_time": outcome.train_time,
    }
    held_out = _held_out(cfg, components)
    final.update(held_out or {})
    if dataset.image_shape is not None:
        final["localisation"] = metrics.localisation_index(problem.model.W.detach().cpu().numpy(), dataset.image_shape)
    if dataset.W_true is not None:
        final.update(_recovery(cfg, components))
    lam = value.lam.detach().cpu().numpy()
    summary = RunSummary(
        results_path=results_path,
        elbo=float(value.elbo),
        ground_truth_elbo=final.get("ground_truth_elbo"),
        min_cosine=final.get("min_matched_cosine"),
        recovered=final.get("recovered"),
        sigma=float(value.sigma2.sqrt()),
        lambda_range=(float(lam.min()), float(lam.max())),
        epochs=outcome.epochs,
        stop_reason=outcome.stop_reason,
        train_time=outcome.train_time,
        held_out=held_out,
    )
    return final, summary


POSTERIOR_BLOCK_NUMBERS = 1 << 22  # numbers per block of per-data-point posteriors on their way to the file


def write_posterior(cfg: DictConfig, posterior, writer) -> None:
    """``/final/posterior`` when it holds at most ``results.max_posterior_numbers`` numbers: an encoder's weights
    (every rank holds them alike), or the per-data-point posteriors of every rank's shard, passed to rank 0
    and written in blocks of rows (``parallel.rows_to_main``): no process holds another rank's shard whole."""
    limit = int(cfg.results.max_posterior_numbers)
    if posterior.amortized:
        arrays = posterior.state_arrays()
        if sum(value.numel() for value in arrays.values()) <= limit:
            writer.write_group("final", {"posterior": arrays})
        return
    n = posterior.mean.shape[0]
    like = posterior.state_rows(slice(0, 1))
    per_row = sum(value.numel() for value in like.values())
    n_all = parallel.count(n)
    if n_all * per_row > limit:
        return
    shapes = {name: ((n_all, *value.shape[1:]), value.cpu().numpy().dtype) for name, value in like.items()}
    writer.create_rows("final/posterior", shapes)
    block_rows = max(1, POSTERIOR_BLOCK_NUMBERS // per_row)
    parallel.rows_to_main(
        posterior.state_rows, n, lambda start, arrays: writer.write_rows("final/posterior", start, arrays), block_rows
    )
