"""The CPU-sized natural-image experiment is the CPU-sized ``patches_em`` and learns localised fields."""

from __future__ import annotations

import numpy as np
import pytest

import sparse_elbo
from sparse_elbo.metrics import localisation_index
from sparse_elbo.results import read_results
from sparse_elbo.runner import run


@pytest.mark.slow
def test_patches_em_small_is_the_cpu_sized_patches_em_and_learns_localised_fields(tmp_path):
    """The paper-size ``patches_em`` ends with a median localisation of 0.54–0.58 over five seeds (random fields:
    about 0.99); this run, seed 0, ends at 0.568 on this code. The margin (0.62) fails a run whose fields stay as
    spread as the former random-start setting's (0.80), and the share of noise-like fields (localisation above
    0.88, which no random field is below) must stay small."""
    cfg = sparse_elbo.compose(["experiment=patches_em_small", "device=cpu"])
    paper = sparse_elbo.compose(["experiment=patches_em"])
    assert cfg.trainer == {
        **paper.trainer,
        "subset_size": 10240,
        "initialisation": {**paper.trainer.initialisation, "n_points": None},
    }
    assert cfg.annealing == paper.annealing  # temperature annealing at λ_0 from the MAP start
    summary = run(cfg, tmp_path, progress=False)
    results = read_results(summary.results_path)
    local = np.asarray(results.final["localisation"])
    rng = np.random.default_rng(0)
    assert localisation_index(rng.normal(size=(256, 1000)), (16, 16)).min() > 0.88  # what noise-like means
    assert np.median(local) < 0.62, np.median(local)
    assert np.mean(local > 0.88) <= 0.10, np.sort(local)[-10:]
    np.testing.assert_array_equal(results.metrics["weight_prior"], [10, 8, 6, 4, 2] + [1] * 11)
    assert results.final["W"].shape == (256, 100) and summary.train_time < 120
