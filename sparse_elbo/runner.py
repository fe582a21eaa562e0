"""Assemble one run from a composed config: validate, build components with ``_target_``, train,
evaluate, write ``results.h5`` and return a summary. ``sparse_elbo.train`` is the Hydra front end."""

from __future__ import annotations

import contextlib
import io
import platform
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from sparse_elbo import __version__, metrics
from sparse_elbo.data import split_held_out
from sparse_elbo.evaluation import evaluate_problem, ground_truth_elbo, sparseness
from sparse_elbo.gradients import gradient_variance
from sparse_elbo.likelihood import ModelAt, encoder_elbo, held_out_metrics
from sparse_elbo.problem import Problem
from sparse_elbo.results import ResultsWriter, read_checkpoint, read_results
from sparse_elbo.validation import require_at_least

DEVICES = ("cpu", "cuda", "auto")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class RunInterrupted(RuntimeError):
    """SIGTERM (or SIGINT) arrived while training."""


class SignalGuard:
    """Turns SIGTERM into ``RunInterrupted`` — at once while computing, but deferred to the end of a
    results-file write (``with guard.writing():``) so that a write is never cut in half."""

    def __init__(self):
        self.depth, self.pending = 0, None

    def handler(self, signum, frame):
        if self.depth > 0:
            self.pending = signum
            return
        raise RunInterrupted(f"received signal {signum}")

    @contextlib.contextmanager
    def writing(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0 and self.pending is not None:
            signum, self.pending = self.pending, None
            raise RunInterrupted(f"received signal {signum}")


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
            out.append(f"min matched |cosine|  {self.min_cosine:.4f} ({'all fields recovered' if self.recovered else 'NOT all recovered'})")
        out += [
            f"sigma                 {self.sigma:.4f}",
            f"lambda range          [{self.lambda_range[0]:.4f}, {self.lambda_range[1]:.4f}]",
            f"training time         {self.train_time:.2f} s over {self.epochs} epochs (stop: {self.stop_reason})",
        ]
        if self.held_out:
            h = self.held_out
            if "held_out_elbo_encoder" in h:
                out.append(f"held-out ELBO encoder {h['held_out_elbo_encoder']:.4f} (amortisation gap {h['amortization_gap']:.4f} nats)")
            out += [
                f"held-out ELBO refined {h['held_out_elbo_refined']:.4f} over {int(h['held_out_n'])} held-out points",
                f"held-out log p(x)     {h['held_out_log_px']:.4f} +- {h['held_out_log_px_stderr']:.4f} (importance sampled)",
            ]
        out += [
            f"results               {self.results_path}",
        ]
        return out


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES:
        raise ValueError(f"device must be one of {list(DEVICES)}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available; use device=cpu or device=auto")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name]


def resolve_n_latents(cfg: DictConfig, dataset) -> int:
    n_latents = cfg.n_latents
    if n_latents is None:
        if dataset.W_true is None:
            raise ValueError("n_latents is missing: set n_latents=<H> (this data set has no generating dictionary)")
        return int(dataset.W_true.shape[1])
    if int(n_latents) < 1:
        raise ValueError(f"n_latents must be >= 1, got {n_latents}")
    return int(n_latents)


def _versions() -> str:
    import h5py
    import hydra

    return (
        f"sparse_elbo={__version__} torch={torch.__version__} numpy={np.__version__} "
        f"h5py={h5py.__version__} hydra={hydra.__version__} python={platform.python_version()}"
    )


def build(cfg: DictConfig):
    """Validate the config and build every component; nothing is trained here."""
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    require_at_least("results", 0, snapshot_every=cfg.results.snapshot_every, checkpoint_every=cfg.results.checkpoint_every,
                     checkpoint_interval_s=_checkpoint_interval(cfg), max_posterior_numbers=cfg.results.max_posterior_numbers)
    torch.manual_seed(int(cfg.seed))
    dataset = instantiate(cfg.dataset)
    n_latents = resolve_n_latents(cfg, dataset)
    objective = instantiate(cfg.objective)
    annealing = instantiate(cfg.annealing)
    trainer = instantiate(cfg.trainer)
    posterior_factory = instantiate(cfg.posterior)
    family = getattr(posterior_factory.func, "family", None)
    if family not in trainer.supported_families:
        raise ValueError(
            f"posterior={family} is not supported by trainer {type(trainer).__name__}; "
            f"allowed posteriors: {list(trainer.supported_families)}"
        )
    if objective.name not in trainer.supported_objectives:
        raise ValueError(
            f"objective={objective.name} is not supported by trainer {type(trainer).__name__}; "
            f"allowed objectives: {list(trainer.supported_objectives)}"
        )
    if not getattr(trainer, "supports_annealing", True) and annealing.final_epoch() > 0:
        raise ValueError(
            f"annealing ({type(annealing).__name__}) is not supported by trainer {type(trainer).__name__}, "
            "which maximises the unweighted objective; allowed: annealing=none (or trainer=lbfgs)"
        )
    if cfg.evaluation.ground_truth and dataset.W_true is not None:
        ground_truth_trainer = instantiate(cfg.evaluation.ground_truth_trainer)
        if family not in ground_truth_trainer.supported_families:
            raise ValueError(
                f"posterior={family} is not supported by the ground-truth fit "
                f"(evaluation.ground_truth_trainer: {type(ground_truth_trainer).__name__}, allowed posteriors: "
                f"{list(ground_truth_trainer.supported_families)}); set evaluation.ground_truth=false"
            )
    model_factory = instantiate(cfg.model)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    model = model_factory(n_observed=dataset.n_observed, n_latents=n_latents, generator=generator)
    if objective.requires_unit_norm and model.gauge != "unit_norm":
        raise ValueError(f"objective={type(objective).__name__} needs model.gauge=unit_norm, got {model.gauge!r}")
    x_train, x_held_out = split_held_out(dataset, float(cfg.evaluation.held_out_fraction), int(cfg.seed))
    posterior = posterior_factory(n_data=x_train.shape[0], n_latents=n_latents, n_observed=dataset.n_observed)
    x = torch.as_tensor(x_train, dtype=dtype, device=device)
    problem = Problem(
        x=x,
        model=model.to(device=device, dtype=dtype),
        posterior=posterior.to(device=device, dtype=dtype),
        objective=objective,
        annealing=annealing,
        seed=int(cfg.seed),
        x_held_out=None if x_held_out is None else torch.as_tensor(x_held_out, dtype=dtype, device=device),
    )
    return dataset, problem, trainer, posterior_factory


def _checkpoint_interval(cfg: DictConfig) -> float:
    """``results.checkpoint_interval_s``; 0 (every epoch) for runs stored before the key existed."""
    return float(cfg.results.get("checkpoint_interval_s", 0.0))


def _posterior_fits(problem: Problem, limit: int) -> bool:
    return sum(v.numel() for v in problem.posterior.state_arrays().values()) <= limit


def run(cfg: DictConfig, output_dir: str | Path, overrides: list[str] | None = None, progress: bool | None = None) -> RunSummary:
    """Run one experiment and write ``output_dir/results.h5`` — or, with ``resume=PATH``, continue the
    run stored in ``PATH`` from its last checkpoint, appending to the same file; return the summary."""
    if cfg.get("resume"):
        return resume(cfg.resume, progress=progress)
    dataset, problem, trainer, posterior_factory = build(cfg)
    writer = ResultsWriter(
        Path(output_dir) / "results.h5",
        attrs={
            "config": OmegaConf.to_yaml(cfg, resolve=True),
            "overrides": "\n".join(overrides or []),
            "versions": _versions(),
            "seed": int(cfg.seed),
            "device": str(problem.x.device),
            "dtype": str(cfg.dtype),
        },
    )
    if dataset.W_true is not None:
        writer.write_group("data", {"W_true": dataset.W_true})
    if dataset.image_shape is not None:
        writer.write_group("data", {"image_shape": np.asarray(dataset.image_shape)})
    return _train(cfg, dataset, problem, trainer, posterior_factory, writer, None, progress)


def resume(path: str | Path, progress: bool | None = None) -> RunSummary:
    """Continue a run from ``path`` (its results.h5): the stored config is rebuilt and validated, W, σ², λ,
    the posteriors, the trainer's state (optimiser memory, annealing position = epoch, convergence
    bookkeeping), the RNG state and the epoch are restored, and training goes on in the same file."""
    path = Path(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"resume={str(path)!r}: no such results file")
    cfg = OmegaConf.create(read_results(path).config)
    epoch, blob = read_checkpoint(path)
    dataset, problem, trainer, posterior_factory = build(cfg)
    state = torch.load(io.BytesIO(blob), map_location=problem.x.device, weights_only=False)
    problem.model.load_state_dict(state["model"])
    problem.posterior.load_state_dict(state["posterior"])
    torch.set_rng_state(state["torch_rng"])
    writer = ResultsWriter(path, resume=True)
    writer.truncate_to_epoch(epoch)
    return _train(cfg, dataset, problem, trainer, posterior_factory, writer, state["trainer"], progress)


def _check_finite_parameters(problem: Problem, epoch: int) -> None:
    for owner, module in (("model", problem.model), ("posterior", problem.posterior)):
        for name, value in module.named_parameters():
            if not bool(torch.isfinite(value).all()):
                raise FloatingPointError(f"non-finite values at epoch {epoch}: parameter {owner}.{name}")


def _train(cfg, dataset, problem: Problem, trainer, posterior_factory, writer: ResultsWriter, state, progress) -> RunSummary:
    W_true = None if dataset.W_true is None else torch.as_tensor(dataset.W_true, dtype=problem.x.dtype, device=problem.x.device)
    start_epoch = 0 if state is None else state["epoch"] + 1
    bar = tqdm(total=trainer.max_epochs, initial=start_epoch, desc="epochs", disable=None if progress is None else not progress, leave=False)

    def evaluate(epoch, weights, train_time):
        value = evaluate_problem(problem, weights)
        gini_mean, gini_std = sparseness(problem, cfg.evaluation.gini_samples, cfg.evaluation.gini_data_points)
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
        if cfg.evaluation.gradient_variance_repeats > 0:
            index = torch.arange(min(int(cfg.evaluation.gradient_variance_batch), problem.x.shape[0]), device=problem.x.device)
            noise = gradient_variance(problem, index, int(cfg.evaluation.gradient_variance_repeats), weights, int(cfg.seed))
            row["gradient_variance"], row["gradient_variance_relative"] = noise.total, noise.relative
        if W_true is not None:
            row["min_matched_cosine"] = metrics.match_fields(
                np.nan_to_num(problem.model.W.detach().cpu().numpy()), dataset.W_true, cfg.evaluation.recovery_threshold
            ).min_cosine
        if dataset.image_shape is not None and dataset.W_true is None:
            row["localisation_median"] = float(
                np.median(metrics.localisation_index(problem.model.W.detach().cpu().numpy(), dataset.image_shape))
            )
        bad = [k for k, v in row.items() if not np.isfinite(np.asarray(v.detach().cpu() if torch.is_tensor(v) else v)).all()]
        if bad:
            raise FloatingPointError(f"non-finite values at epoch {epoch}: {', '.join(bad)}")
        _check_finite_parameters(problem, epoch)
        with guard.writing():
            snapshot = cfg.results.snapshot_every > 0 and epoch % cfg.results.snapshot_every == 0
            writer.append_epoch(row, problem.model.W.detach() if snapshot else None)
        bar.update(1)
        bar.set_postfix(elbo=f"{float(value.elbo):.4f}")
        return value

    last_checkpoint = time.monotonic()  # (the run's start, for the first one)

    def checkpoint(epoch, trainer_state):
        nonlocal last_checkpoint
        if cfg.results.checkpoint_every <= 0 or (epoch + 1) % cfg.results.checkpoint_every:
            return
        if time.monotonic() - last_checkpoint < _checkpoint_interval(cfg):
            return  # short epochs: the checkpoint (the L-BFGS memory: 21 MB on default bars) would cost more than they do
        buffer = io.BytesIO()
        torch.save(
            {
                "model": problem.model.state_dict(),
                "posterior": problem.posterior.state_dict(),
                "trainer": trainer_state,
                "torch_rng": torch.get_rng_state(),
            },
            buffer,
        )
        with guard.writing():
            writer.write_checkpoint(epoch, buffer.getvalue())
        last_checkpoint = time.monotonic()

    guard = SignalGuard()
    previous_handler = signal.signal(signal.SIGTERM, guard.handler) if _in_main_thread() else None
    try:
        outcome = trainer.fit(problem, evaluate, checkpoint=checkpoint, state=state)
        bar.close()
        final_value = evaluate_problem(problem, problem.annealing(10**9))
        problem.model.set_noise_and_prior_scale(final_value.sigma2.detach(), final_value.lam.detach())
        final = {
            "W": problem.model.W.detach(),
            "sigma2": final_value.sigma2,
            "lambda": final_value.lam,
            "elbo": final_value.elbo,
            "epochs": outcome.epochs,
            "converged": outcome.converged,
            "stop_reason": outcome.stop_reason,
            "train_time": outcome.train_time,
        }
        if _posterior_fits(problem, int(cfg.results.max_posterior_numbers)):
            final["posterior"] = problem.posterior.state_arrays()
        held_out = None
        if problem.x_held_out is not None:
            held_out = held_out_metrics(
                problem.x_held_out, problem.posterior, problem.model, int(cfg.evaluation.held_out_refine_iterations),
                int(cfg.evaluation.importance_samples), int(cfg.seed),
            )
            final.update(held_out)
        if dataset.image_shape is not None:
            final["localisation"] = metrics.localisation_index(problem.model.W.detach().cpu().numpy(), dataset.image_shape)
        gt_elbo = match = None
        if W_true is not None:
            match = metrics.match_fields(problem.model.W.detach().cpu().numpy(), dataset.W_true, cfg.evaluation.recovery_threshold)
            final.update(
                min_matched_cosine=match.min_cosine,
                recovered=match.recovered,
                matched_cosines=match.cosines,
                assignment=match.assignment,
            )
            if cfg.evaluation.ground_truth:
                gt_elbo = ground_truth_elbo(
                    problem.x, W_true, posterior_factory, problem.model.prior, instantiate(cfg.evaluation.ground_truth_trainer), int(cfg.seed)
                )
                final["ground_truth_elbo"] = gt_elbo
        with guard.writing():
            writer.write_group("final", final)
    except (KeyboardInterrupt, RunInterrupted) as error:
        bar.close()
        guard.depth += 1  # a second SIGTERM must not cut the status write short
        writer.close("interrupted", reason=repr(error))
        raise
    except BaseException as error:
        bar.close()
        guard.depth += 1
        writer.close("failed", reason=f"{type(error).__name__}: {error}")
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    with guard.writing():
        writer.close("finished")
    lam = final_value.lam.detach().cpu().numpy()
    return RunSummary(
        results_path=writer.path,
        elbo=float(final_value.elbo),
        ground_truth_elbo=gt_elbo,
        min_cosine=None if match is None else match.min_cosine,
        recovered=None if match is None else match.recovered,
        sigma=float(final_value.sigma2.sqrt()),
        lambda_range=(float(lam.min()), float(lam.max())),
        epochs=outcome.epochs,
        stop_reason=outcome.stop_reason,
        train_time=outcome.train_time,
        held_out=held_out,
    )


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
