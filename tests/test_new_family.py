"""Adding a posterior family touches its module, its YAML and its capabilities, nothing else (docs/design.md,
"A new posterior family"): a family defined here, outside the package — a diagonal Gaussian stored as its log
variance, with no fast path of its own — is found through its YAML on Hydra's search path and trains with every
trainer whose capabilities admit its kind, is scored at a fixed dictionary, and encodes new data from its
results file, through the generic paths (autograd E-steps, the generic block fit)."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

import sparse_elbo
from sparse_elbo.runner import build

FAMILY_MODULE = '''
"""A diagonal Gaussian stored as its log variance: a posterior family outside the package."""
import math

import torch
from torch import nn

from sparse_elbo.gaussians import DiagonalGaussian
from sparse_elbo.posteriors import PerDataPointPosterior


class LogVariancePosterior(PerDataPointPosterior):
    family = "log_variance"  # capabilities: per data point (the default kind), no closed-form moments, no features

    @staticmethod
    def parameter_count(n_data, n_latents, **settings):
        return 2 * n_data * n_latents

    def __init__(self, n_data, n_latents, init_std=0.1, n_observed=None):
        super().__init__()
        self.n_data, self.n_latents, self.init_std = n_data, n_latents, float(init_std)
        self.mean = nn.Parameter(self.initial_value("mean", n_data))
        self.log_variance = nn.Parameter(self.initial_value("log_variance", n_data))

    def initial_value(self, name, n, std=None):
        if name == "mean":
            return torch.zeros(n, self.n_latents)
        return torch.full((n, self.n_latents), 2.0 * math.log(std or self.init_std))

    def gaussian(self, params):
        log_std = 0.5 * params["log_variance"]
        return DiagonalGaussian(params["mean"], log_std.exp(), log_std)

    @torch.no_grad()
    def rescale_latents(self, scale):
        self.mean.mul_(scale.to(self.mean.dtype))
        self.log_variance.add_(2.0 * torch.log(scale.to(self.mean.dtype)))

    def state_arrays(self):
        return {"mean": self.mean.detach(), "std": (0.5 * self.log_variance.detach()).exp()}
'''
FAMILY_YAML = """
_target_: log_variance_family.LogVariancePosterior
_partial_: true
init_std: 0.1
"""


@pytest.fixture
def new_family(tmp_path, monkeypatch):
    """The family's module on the import path and its YAML on Hydra's search path: the overrides that use it."""
    (tmp_path / "log_variance_family.py").write_text(textwrap.dedent(FAMILY_MODULE))
    (tmp_path / "configs" / "posterior").mkdir(parents=True)
    (tmp_path / "configs" / "posterior" / "log_variance.yaml").write_text(FAMILY_YAML)
    monkeypatch.syspath_prepend(str(tmp_path))
    return [f"hydra.searchpath=[file://{tmp_path / 'configs'}]", "posterior=log_variance"]


SMOKE = ["debug=smoke", "dataset.grid=3", "dataset.n_data=60"]


@pytest.mark.parametrize(
    "trainer",
    ["em", pytest.param("em_subsets", marks=pytest.mark.slow), "profile_lbfgs", "lbfgs", "adam", "authors_em"],  # em_subsets:
)  # its final fit is the generic block fit run to its tolerance (tens of seconds)
def test_a_new_family_trains_with_every_trainer_that_takes_its_kind(new_family, trainer, tmp_path):
    extra = {
        "em_subsets": ["trainer.subset_size=30", "trainer.average_last_epochs=2"],
        "authors_em": ["trainer.scale_parameterisation=log_std"],
    }
    cfg = sparse_elbo.compose([*new_family, f"trainer={trainer}", *SMOKE, *extra.get(trainer, [])])
    summary = sparse_elbo.run(cfg, tmp_path / trainer, progress=False)
    results = sparse_elbo.read_results(summary.results_path)
    assert results.status == "finished" and np.isfinite(summary.elbo)
    assert results.final["posterior"]["std"].shape == (60, 6)
    assert np.isfinite(results.metrics["elbo"]).all()


def test_what_the_family_lacks_is_named_by_the_trainers_capabilities(new_family):
    """The authors' signed-scale E-step needs a feature the family does not declare; an amortised-only
    trainer does not take its kind."""
    with pytest.raises(ValueError, match="posterior=log_variance lacks signed_blocks"):
        build(sparse_elbo.compose([*new_family, "trainer=authors_em", *SMOKE]))
    with pytest.raises(ValueError, match="posterior=log_variance is not supported by trainer SemiAmortizedAdam"):
        build(sparse_elbo.compose([*new_family, "trainer=semi_amortized_adam", *SMOKE]))


def test_a_new_family_is_scored_at_a_fixed_dictionary_and_encodes_new_data(new_family, tmp_path):
    """The generic fit (block L-BFGS on L_H) reaches the diagonal family's own fast fit's max_q L_H, and the
    trained model encodes new rows through the family's generic paths."""
    from log_variance_family import LogVariancePosterior

    from sparse_elbo.data import make_bars

    data = make_bars(grid=3, n_data=80, seed=3)
    x, W = torch.as_tensor(data.x), torch.as_tensor(data.W_true)
    generic = sparse_elbo.score_dictionary(x, W, family=LogVariancePosterior, tolerance=1e-12)
    fast = sparse_elbo.score_dictionary(x, W, family="diag", tolerance=1e-12)
    assert generic.elbo == pytest.approx(fast.elbo, abs=1e-5)
    summary = sparse_elbo.run(sparse_elbo.compose([*new_family, "trainer=em", *SMOKE]), tmp_path / "run", progress=False)
    model = sparse_elbo.load(summary.results_path)
    assert model.family == "log_variance"
    codes = model.encode(data.x[:5], iterations=50)
    assert codes.mean.shape == (5, 6) and codes.std.shape == (5, 6) and np.isfinite(codes.elbo).all()
