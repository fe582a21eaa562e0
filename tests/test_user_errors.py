"""User errors, drawn at random: every combination of group options and settings (some out of range)
either builds and trains, or is rejected before any compute with a one-line message naming what is wrong.
Never an unhandled exception, and never a results file for a rejected run."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import options, target

import sparse_elbo
from sparse_elbo.cli import user_error_message
from sparse_elbo.runner import build

GROUPS = {group: options(group) for group in ("posterior", "objective", "annealing", "trainer", "prior")}  # from configs/
# settings with values in and out of range, of the wrong kind (and keys that only some choices have)
SETTINGS = {
    "dataset.noise": ["0.2", "0", "-1", "abc"],
    "dataset.grid": ["3", "1"],
    "n_latents": ["4", "0", "-2"],
    "dtype": ["float32", "float16"],
    "device": ["cpu", "tpu"],
    "posterior.init_std": ["0.3", "-0.1"],
    "posterior.covariance": ["lowrank", "full"],
    "objective.n_samples": ["2", "0"],
    "annealing.start": ["3.0", "0.5"],
    "annealing.step": ["1.0", "-1.0"],
    "annealing.prior_scale": ["fixed", "free"],
    "trainer.max_epochs": ["0", "two"],
    "trainer.history_size": ["5", "0"],
    "trainer.batch_size": ["7", "0"],
    "trainer.statistics": ["mini"],
    "trainer.driver.iterations": ["3", "0"],
    "trainer.m_step_overrelaxation": ["1.5", "3.0"],
    "model.gauge": ["unit_lambda", "sideways"],
    "evaluation.held_out_fraction": ["0.2", "1.5"],
    "results.snapshot_every": ["-1"],
}
# a tiny problem (configs/debug/smoke.yaml), one epoch
TINY = ["debug=smoke", "dataset.n_data=30", "dataset.grid=3", "trainer.max_epochs=1"]


def capable(trainer: str) -> tuple[list[str], list[str], list[str]]:
    """The posteriors, objectives and schedules the trainer's own capabilities declare (its class's data)."""
    capabilities = target("trainer", trainer).capabilities
    posteriors = [name for name in GROUPS["posterior"] if target("posterior", name).kind() in capabilities.posteriors]
    objectives = [name for name in GROUPS["objective"] if name in capabilities.objectives]
    schedules = GROUPS["annealing"] if capabilities.annealing else ["none"]
    return posteriors, objectives, schedules


@st.composite
def overrides(draw):
    """Half the draws are combinations the trainer declares (so that training is exercised), half any."""
    trainer = draw(st.sampled_from(GROUPS["trainer"]))
    if draw(st.booleans()):
        posteriors, objectives, schedules = capable(trainer)
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
    return [*chosen, *TINY, *values]


@pytest.mark.slow
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
        "trainer=adam trainer.statistics=mini": "trainer.statistics must be a component",
        "trainer=adam trainer.max_epochs=two": "trainer.max_epochs must be an integer, got 'two'",
        "trainer=em trainer.driver.iterations=0": "trainer.driver.iterations must be >= 1, got 0",
        "posterior=amortized posterior.covariance=full trainer=adam": "posterior.covariance must be one of ['diag', 'lowrank']",
        "trainer=em posterior=amortized": "posterior=amortized is not supported by trainer EMTrainer; allowed posteriors: ['diag', 'full']",
        "trainer._target_=sparse_elbo.trainers.lbfgs.LBFGSTrainr": "trainer._target_='sparse_elbo.trainers.lbfgs.LBFGSTrainr' cannot be imported",
    }
    for overrides_text, expected in cases.items():
        try:
            build(sparse_elbo.compose([*TINY, *overrides_text.split()]))
        except Exception as error:  # noqa: BLE001
            assert expected in user_error_message(error), (overrides_text, user_error_message(error))
        else:
            raise AssertionError(f"{overrides_text} was accepted")
