"""User errors, drawn at random: every combination of group options and settings (some out of range)
either builds and trains, or is rejected before any compute with a one-line message naming what is wrong.
Never an unhandled exception, and never a results file for a rejected run."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparse_elbo
from sparse_elbo.cli import user_error_message
from sparse_elbo.runner import build

GROUPS = {
    "posterior": ["diag", "full", "amortized"],
    "objective": ["sampled", "analytic", "entropy"],
    "annealing": ["none", "prior", "exponential"],
    "trainer": ["lbfgs", "profile_lbfgs", "em", "authors_em", "adam"],
    "prior": ["laplace", "gaussian"],
}
# settings with values in and out of range (and keys that only some choices have)
SETTINGS = {
    "dataset.noise": ["0.2", "0", "-1"],
    "dataset.grid": ["3", "1"],
    "n_latents": ["4", "0", "-2"],
    "dtype": ["float32", "float16"],
    "device": ["cpu", "tpu"],
    "posterior.init_std": ["0.3", "-0.1"],
    "posterior.covariance": ["lowrank", "full"],
    "objective.n_samples": ["2", "0"],
    "annealing.start": ["3.0", "0.5"],
    "annealing.step": ["1.0", "-1.0"],
    "trainer.max_epochs": ["0"],
    "trainer.history_size": ["5", "0"],
    "trainer.batch_size": ["7", "0"],
    "trainer.statistics": ["batch", "mini"],
    "trainer.m_step_overrelaxation": ["1.5", "3.0"],
    "model.gauge": ["unit_lambda", "sideways"],
    "evaluation.held_out_fraction": ["0.2", "1.5"],
    "results.snapshot_every": ["-1"],
}
# a tiny problem, and one short epoch of each trainer
TINY = [
    "dataset.n_data=30",
    "dataset.grid=3",
    "trainer.max_epochs=1",
    "evaluation.ground_truth=false",
    "evaluation.gini_samples=2",
    "evaluation.held_out_refine_iterations=5",
    "evaluation.importance_samples=5",
]
SHORT_EPOCH = {
    "lbfgs": ["trainer.iterations_per_epoch=3"],
    "profile_lbfgs": ["trainer.iterations_per_epoch=2"],
    "em": ["trainer.e_step_iterations=3"],
    "authors_em": ["trainer.e_step_iterations=3", "trainer.batch_size=10"],
    "adam": ["trainer.batch_size=10"],
}


CAPABLE = {  # combinations each trainer declares it can train
    "lbfgs": (["diag", "full", "amortized"], ["sampled", "analytic", "entropy"], ["none", "prior", "exponential"]),
    "profile_lbfgs": (["diag", "full"], ["entropy"], ["none"]),
    "em": (["diag", "full"], ["entropy"], ["none", "prior", "exponential"]),
    "authors_em": (["diag", "full"], ["entropy"], ["none", "prior", "exponential"]),
    "adam": (["diag", "full", "amortized"], ["sampled", "analytic", "entropy"], ["none", "prior", "exponential"]),
}


@st.composite
def overrides(draw):
    """Half the draws are combinations the trainer declares (so that training is exercised), half any."""
    trainer = draw(st.sampled_from(GROUPS["trainer"]))
    if draw(st.booleans()):
        posteriors, objectives, schedules = CAPABLE[trainer]
    else:
        posteriors, objectives, schedules = GROUPS["posterior"], GROUPS["objective"], GROUPS["annealing"]
    choices = {
        "trainer": trainer,
        "posterior": draw(st.sampled_from(posteriors)),
        "objective": draw(st.sampled_from(objectives)),
        "annealing": draw(st.sampled_from(schedules)),
        "prior": draw(st.sampled_from(GROUPS["prior"])),
    }
    chosen = [f"{group}={option}" for group, option in choices.items()]
    drawn = draw(st.lists(st.sampled_from(sorted(SETTINGS)), max_size=2, unique=True))
    values = [f"{key}={draw(st.sampled_from(SETTINGS[key]))}" for key in drawn]
    return [*chosen, *TINY, *SHORT_EPOCH[trainer], *values]


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(overrides())
def test_every_drawn_configuration_trains_or_is_rejected_before_compute_with_one_line(drawn):
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "run"
        try:
            summary = sparse_elbo.run(sparse_elbo.compose(drawn), output, progress=False)
        except Exception as error:  # noqa: BLE001 — every exception must be a user error, found before compute
            message = user_error_message(error)
            assert message is not None, f"{drawn}: {type(error).__name__}: {error}"
            assert "\n" not in message and message
            assert not (output / "results.h5").exists(), f"{drawn}: rejected after compute began: {message}"
            return
        assert sparse_elbo.read_results(summary.results_path).status == "finished"


def test_messages_name_the_key_and_what_is_allowed():
    cases = {
        "dataset.noise=-1": "dataset.noise must be > 0, got -1",
        "trainer=adam trainer.statistics=mini": "trainer.statistics must be one of ['full', 'batch'], got 'mini'",
        "posterior=amortized posterior.covariance=full trainer=adam": "posterior.covariance must be one of ['diag', 'lowrank']",
        "trainer=em posterior=amortized": "posterior=amortized is not supported by trainer EMTrainer; allowed posteriors: ['diag', 'full']",
        "trainer._target_=sparse_elbo.trainers.lbfgs.LBFGSTrainr": "trainer._target_='sparse_elbo.trainers.lbfgs.LBFGSTrainr' cannot be imported",
    }
    for overrides_text, expected in cases.items():
        try:
            build(sparse_elbo.compose([*overrides_text.split(), *TINY]))
        except Exception as error:  # noqa: BLE001
            assert expected in user_error_message(error), (overrides_text, user_error_message(error))
        else:
            raise AssertionError(f"{overrides_text} was accepted")
