"""Metrics (docs/design.md §10: Gini sparseness, field matching up to permutation and sign) and annealing
schedules (docs/design.md §8: the authors' step schedules, exponential decay, argument validation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sparse_elbo.annealing import (
    AnnealingWeights,
    ExponentialAnnealing,
    NoAnnealing,
    StepAnnealing,
    TemperatureAnnealing,
)
from sparse_elbo.gaussians import DiagonalGaussian
from sparse_elbo.metrics import gini, match_fields, posterior_sample_gini

F64 = torch.float64

# --------------------------------------------------------------------------------------------------
# Gini coefficient
# --------------------------------------------------------------------------------------------------


def _gini_reference(values: np.ndarray) -> np.ndarray:
    """Mean-absolute-difference form: G = Σ_i Σ_j | |v_i| - |v_j| | / (2 H Σ_i |v_i|), along the last axis."""
    a = np.abs(values)
    H = a.shape[-1]
    pairwise = np.abs(a[..., :, None] - a[..., None, :]).sum((-2, -1))
    return pairwise / (2 * H * a.sum(-1))


def test_gini_matches_mean_absolute_difference_formula():
    values = np.random.default_rng(0).laplace(size=(4, 6, 9))
    result = gini(torch.tensor(values, dtype=F64))
    assert result.shape == (4, 6) and result.dtype == F64
    np.testing.assert_allclose(result.numpy(), _gini_reference(values), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("H", [1, 2, 5, 10])
def test_gini_known_values(H):
    equal = torch.full((H,), 0.7, dtype=F64)
    assert float(gini(equal)) == pytest.approx(0.0, abs=1e-15)
    for h in range(H):
        one_hot = torch.zeros(H, dtype=F64)
        one_hot[h] = -2.5
        assert float(gini(one_hot)) == pytest.approx(1.0 - 1.0 / H, rel=1e-14, abs=1e-15)


def test_gini_two_values_by_hand():
    # |v| = (1, 3): pairwise |diffs| sum = 4, G = 4 / (2·2·4) = 0.25
    assert float(gini(torch.tensor([3.0, -1.0], dtype=F64))) == pytest.approx(0.25, rel=1e-14)


def test_gini_of_all_zeros_is_zero_not_nan():
    value = gini(torch.zeros(3, 5, dtype=F64))
    assert torch.all(value == 0)


@given(
    values=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=12).filter(
        lambda v: sum(abs(x) for x in v) > 1e-6
    ),
    scale=st.floats(1e-3, 1e3),
    negate=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None, derandomize=True)
def test_gini_is_invariant_to_scale_sign_and_order(values, scale, negate, seed):
    v = torch.tensor(values, dtype=F64)
    reference = float(gini(v))
    rng = np.random.default_rng(seed)
    signs = torch.tensor(rng.choice([-1.0, 1.0], size=len(values)), dtype=F64)
    perm = torch.tensor(rng.permutation(len(values)))
    transformed = (v * signs)[perm] * (-scale if negate else scale)
    assert float(gini(transformed)) == pytest.approx(reference, rel=1e-9, abs=1e-12)
    assert 0.0 <= reference <= 1.0 - 1.0 / len(values) + 1e-12
    assert reference == pytest.approx(float(_gini_reference(np.asarray(values))), rel=1e-9, abs=1e-12)


def test_posterior_sample_gini_of_a_near_deterministic_posterior_is_gini_of_the_mean():
    mean = torch.tensor([[0.0, 0.0, 4.0], [1.0, 1.0, 1.0]], dtype=F64)
    q = DiagonalGaussian(mean, torch.full_like(mean, 1e-9))
    g_mean, g_std = posterior_sample_gini(q, 50, generator=torch.Generator().manual_seed(0))
    expected = gini(mean)  # (2/3, 0)
    assert g_mean == pytest.approx(float(expected.mean()), abs=1e-6)
    assert g_std == pytest.approx(float(torch.cat([expected[:1].expand(50), expected[1:].expand(50)]).std()), abs=1e-6)


# --------------------------------------------------------------------------------------------------
# field matching
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra_learned", [0, 3])
def test_match_fields_recovers_permutation_and_sign(extra_learned):
    rng = np.random.default_rng(1)
    D, H = 20, 7
    W_true = rng.normal(size=(D, H))
    perm = rng.permutation(H + extra_learned)[:H]  # true field j sits in learned column perm[j]
    signs = rng.choice([-1.0, 1.0], size=H)
    W_learned = rng.normal(size=(D, H + extra_learned)) * 0.01  # unused columns: small, unrelated
    W_learned[:, perm] = W_true * signs * rng.uniform(0.2, 5.0, size=H)  # and arbitrary positive scales
    match = match_fields(W_learned, W_true)
    np.testing.assert_array_equal(match.assignment, perm)
    np.testing.assert_allclose(match.cosines, np.ones(H), rtol=1e-12)
    assert match.min_cosine == pytest.approx(1.0, rel=1e-12)
    assert match.recovered


def test_match_fields_rejects_an_unrelated_dictionary():
    rng = np.random.default_rng(2)
    W_true, W_random = rng.normal(size=(64, 8)), rng.normal(size=(64, 8))
    match = match_fields(W_random, W_true, threshold=0.95)
    assert match.min_cosine < 0.95 and not match.recovered
    assert match.min_cosine < 0.6  # random 64-dimensional directions are far from aligned
    assert sorted(match.assignment.tolist()) == list(range(8))


def test_match_fields_reports_the_worst_matched_field():
    rng = np.random.default_rng(3)
    W_true = rng.normal(size=(30, 4))
    W_learned = W_true.copy()
    W_learned[:, 2] = W_true[:, 2] + 0.5 * rng.normal(size=30)  # one degraded field
    expected = abs(W_learned[:, 2] @ W_true[:, 2]) / np.linalg.norm(W_learned[:, 2]) / np.linalg.norm(W_true[:, 2])
    match = match_fields(W_learned, W_true, threshold=0.999)
    np.testing.assert_array_equal(match.assignment, np.arange(4))
    assert match.min_cosine == pytest.approx(expected, rel=1e-12)
    assert match.recovered == (expected >= 0.999)


# --------------------------------------------------------------------------------------------------
# annealing schedules
# --------------------------------------------------------------------------------------------------


def test_no_annealing_is_identity():
    schedule = NoAnnealing()
    assert all(schedule(e) == AnnealingWeights(1.0, 1.0, 1.0) for e in range(5))
    assert schedule(0).is_identity and schedule.final_epoch() == 0


def test_authors_prior_step_schedule():
    schedule = StepAnnealing("prior", 10, 2)
    assert [schedule(e).prior for e in range(7)] == [10.0, 8.0, 6.0, 4.0, 2.0, 1.0, 1.0]
    assert schedule.final_epoch() == 5
    for epoch in range(12):
        w = schedule(epoch)
        assert w.prior == max(1, 2 * (5 - epoch))  # docs/design.md §8: max(1, 2(5 - epoch))
        assert w.likelihood == 1.0 and w.entropy == 1.0
        assert w.is_identity == (epoch >= 5)


def test_authors_amortised_linear_schedule():
    schedule = StepAnnealing("prior", 2, 0.1)
    for epoch in range(25):
        assert schedule(epoch).prior == pytest.approx(max(1.0, 2.0 - 0.1 * epoch), rel=1e-12)
    assert schedule.final_epoch() == 10
    assert schedule(10).prior == 1.0 and schedule(9).prior > 1.0


def test_temperature_schedule_weights_likelihood_and_prior_alike_and_leaves_the_entropy():
    schedule = TemperatureAnnealing()
    weights = [schedule(e) for e in range(8)]
    assert [w.likelihood for w in weights] == [10.0, 8.0, 6.0, 4.0, 2.0, 1.0, 1.0, 1.0]
    assert all(w.prior == w.likelihood and w.entropy == 1.0 for w in weights)
    assert schedule.final_epoch() == 5 and weights[5].is_identity and not weights[4].is_identity


@pytest.mark.parametrize("term", ["likelihood", "prior", "entropy"])
def test_step_schedule_weights_only_its_term(term):
    w = StepAnnealing(term, 4, 1)(1)
    assert getattr(w, term) == 3.0
    assert all(getattr(w, other) == 1.0 for other in ("likelihood", "prior", "entropy") if other != term)


@given(start=st.floats(1.0, 30.0), step=st.floats(0.01, 5.0))
@settings(max_examples=200, deadline=None, derandomize=True)
def test_step_schedule_reaches_exactly_one_by_final_epoch(start, step):
    schedule = StepAnnealing("prior", start, step)
    final = schedule.final_epoch()
    weights = [schedule(e).prior for e in range(final + 5)]
    assert all(a >= b for a, b in zip(weights, weights[1:]))  # monotone
    assert all(w == 1.0 for w in weights[final:])
    for epoch, w in enumerate(weights):
        assert w == pytest.approx(max(1.0, start - step * epoch), rel=1e-12)


@given(
    start=st.floats(1.0, 50.0),
    decay=st.floats(0.05, 0.95),
    tolerance=st.floats(1e-6, 0.5),
)
@example(start=10.0, decay=0.5, tolerance=1e-3)
@example(start=2.0, decay=0.5, tolerance=0.125)  # excess hits the tolerance exactly at an epoch
@example(start=1.5, decay=0.5, tolerance=0.5)  # start - 1 == tolerance
@example(start=3.0, decay=0.1, tolerance=0.02)  # 2 · 0.1² rounds to just above 0.02
@settings(max_examples=200, deadline=None, derandomize=True)
def test_exponential_schedule_is_monotone_and_exactly_one_from_final_epoch(start, decay, tolerance):
    schedule = ExponentialAnnealing("prior", start, decay, tolerance)
    final = schedule.final_epoch()
    weights = [schedule(e).prior for e in range(final + 5)]
    assert all(a >= b for a, b in zip(weights, weights[1:]))
    assert all(w >= 1.0 for w in weights)
    assert all(w == 1.0 for w in weights[final:]), f"final_epoch={final}, weights={weights}"
    if final > 0:
        assert weights[final - 1] > 1.0  # final_epoch is the first epoch at weight 1
    for epoch, w in enumerate(weights[:final]):
        assert w == pytest.approx(1.0 + (start - 1.0) * decay**epoch, rel=1e-12)


def test_exponential_schedule_values():
    schedule = ExponentialAnnealing("entropy", start=5.0, decay=0.5, tolerance=0.1)
    assert [schedule(e).entropy for e in range(7)] == [5.0, 3.0, 2.0, 1.5, 1.25, 1.125, 1.0]
    assert schedule.final_epoch() == 6
    assert schedule(3).prior == 1.0 and schedule(3).likelihood == 1.0


@pytest.mark.parametrize(
    "build, key",
    [
        (lambda: StepAnnealing("posterior"), "annealing.term"),
        (lambda: StepAnnealing("prior", start=0.5), "annealing.start"),
        (lambda: StepAnnealing("prior", step=0.0), "annealing.step"),
        (lambda: StepAnnealing("prior", step=-1.0), "annealing.step"),
        (lambda: ExponentialAnnealing("beta"), "annealing.term"),
        (lambda: ExponentialAnnealing("prior", start=0.0), "annealing.start"),
        (lambda: ExponentialAnnealing("prior", decay=1.0), "annealing.decay"),
        (lambda: ExponentialAnnealing("prior", decay=0.0), "annealing.decay"),
        (lambda: ExponentialAnnealing("prior", tolerance=0.0), "annealing.tolerance"),
    ],
)
def test_invalid_annealing_arguments_raise_value_error_naming_the_key(build, key):
    """The schedule names its own argument; the runner names it by its config path (``annealing.``)."""
    with pytest.raises(ValueError) as error:
        build()
    name = key.split(".", 1)[1]
    assert str(error.value).startswith(name) and error.value.under("annealing").key == key


@pytest.mark.parametrize("schedule", [StepAnnealing(["prior", "entropy"]), ExponentialAnnealing(("prior", "entropy"))])
def test_a_schedule_may_weight_several_terms_alike(schedule):
    weights = schedule(1)
    assert weights.prior == weights.entropy > 1.0 and weights.likelihood == 1.0
    assert schedule(schedule.final_epoch()).is_identity


@pytest.mark.parametrize("term", [[], ["prior", "posterior"]])
def test_a_list_of_terms_must_name_known_terms(term):
    with pytest.raises(ValueError, match=r"^term must"):
        StepAnnealing(term)
