"""EM on epoch subsets (trainers/subsets.py, ``trainer=em_subsets``): which points each epoch uses, the subset's
own σ²*, λ*, the tail-averaged dictionary, the final fit of every posterior, the records over a subset and the
settings it refuses."""

from __future__ import annotations

import pytest
import torch
from support import small_problem

from sparse_elbo.annealing import AnnealingWeights, StepAnnealing
from sparse_elbo.errors import ConfigError
from sparse_elbo.evaluation import evaluate_problem
from sparse_elbo.inference.e_step import BlockLBFGS, EntropyEStep
from sparse_elbo.inference.fit import score_dictionary
from sparse_elbo.objectives import entropy_statistics
from sparse_elbo.posteriors import DiagonalPosterior
from sparse_elbo.problem import Problem
from sparse_elbo.trainers.em import EMTrainer
from sparse_elbo.trainers.restarts import RestartEveryEpoch
from sparse_elbo.trainers.subsets import EpochSubsetEM


def annealed_problem(n_data=100, seed=0):
    problem = small_problem("diag", n_data=n_data, seed=seed)
    problem.annealing = StepAnnealing(start=3.0, step=1.0)  # β_prior 3, 2, then 1 from epoch 2
    return problem


def test_the_annealed_epochs_share_one_subset_and_every_later_epoch_draws_a_fresh_one():
    problem = annealed_problem()
    trainer = EpochSubsetEM(max_epochs=6, subset_size=40)
    points = [trainer.epoch_points(problem, epoch) for epoch in range(6)]
    for p in points:
        assert len(p) == 40 and len(torch.unique(p)) == 40 and bool((p[1:] > p[:-1]).all())  # sorted, distinct
    assert torch.equal(points[0], points[1])  # annealed epochs 0 and 1
    for a in range(1, 6):
        for b in range(a + 1, 6):
            assert not torch.equal(points[a], points[b])
    again = EpochSubsetEM(max_epochs=6, subset_size=40)  # a resumed run draws the same subsets
    assert all(torch.equal(p, again.epoch_points(problem, e)) for e, p in enumerate(points))
    other_seed = annealed_problem(seed=1)
    assert not torch.equal(trainer.epoch_points(other_seed, 3), points[3])


def test_a_subset_at_least_the_datas_size_is_em_on_every_point_without_averaging_or_final_fit():
    problem = annealed_problem(n_data=100, seed=5)
    kwargs = {"max_epochs": 3, "e_step": EntropyEStep(), "driver": BlockLBFGS(iterations=5)}
    trainer = EpochSubsetEM(**kwargs, subset_size=100, average_last_epochs=2)
    reference = annealed_problem(n_data=100, seed=5)
    plain = EMTrainer(**kwargs, restarts=RestartEveryEpoch())
    states = trainer.start(problem, None), plain.start(reference, None)
    for epoch in range(3):
        assert torch.equal(trainer.epoch_points(problem, epoch), torch.arange(100))
        assert trainer.evaluated_points(problem, epoch) is None
        trainer.train_epoch(problem, states[0], epoch, problem.annealing(epoch))
        plain.train_epoch(reference, states[1], epoch, reference.annealing(epoch))
    assert states[0].recent_dictionaries == []
    torch.testing.assert_close(problem.model.W, reference.model.W, rtol=0, atol=0)
    torch.testing.assert_close(problem.posterior.mean, reference.posterior.mean, rtol=0, atol=0)


def test_a_subset_epoch_fits_only_its_points_and_ends_at_the_subsets_own_optima():
    """σ², λ after a subset epoch are σ²*, λ* of the subset's q (computed here by the evaluation's own pass
    over those points), and the posteriors of the other points are those of the gauge-fixed start."""
    problem = annealed_problem(n_data=100, seed=3)
    trainer = EpochSubsetEM(
        max_epochs=6, subset_size=40, e_step=EntropyEStep(), driver=BlockLBFGS(iterations=10), em_iterations_per_epoch=2
    )
    state = trainer.start(problem, None)
    trainer.train_epoch(problem, state, 2, AnnealingWeights())  # the first unannealed epoch: a fresh subset
    points = trainer.epoch_points(problem, 2)
    statistics, _ = entropy_statistics(problem.x, problem.q, problem.model, block_size=16, points=points)
    torch.testing.assert_close(problem.model.sigma2.detach(), statistics.residual / problem.x.shape[1], rtol=1e-10, atol=0)
    torch.testing.assert_close(problem.model.lam.detach(), statistics.prior_statistic, rtol=1e-10, atol=0)
    untouched = torch.ones(100, dtype=torch.bool)
    untouched[points] = False
    std = problem.posterior.log_std.detach().exp()[untouched]
    assert torch.allclose(std / std[:1], torch.ones_like(std))  # the initial scale, only rescaled per latent


def test_evaluation_over_points_equals_the_evaluation_of_those_points_alone():
    problem = small_problem("diag", n_data=60, seed=2)
    with torch.no_grad():
        problem.posterior.mean.normal_(generator=torch.Generator().manual_seed(0))
    points = torch.tensor([1, 4, 5, 9, 17, 23, 30, 31, 44, 52, 58, 59])
    alone = DiagonalPosterior(len(points), problem.posterior.mean.shape[1]).double()
    with torch.no_grad():
        alone.mean.copy_(problem.posterior.mean[points])
        alone.log_std.copy_(problem.posterior.log_std[points])
    subset = Problem(problem.x[points], problem.model, alone, problem.objective, problem.annealing)
    expected = evaluate_problem(subset, AnnealingWeights())
    for block_size in (5, 16384):  # blocks, and one pass
        value = evaluate_problem(problem, AnnealingWeights(), block_size=block_size, points=points)
        torch.testing.assert_close(value.elbo, expected.elbo, rtol=1e-12, atol=0)
        torch.testing.assert_close(value.sigma2, expected.sigma2, rtol=1e-12, atol=0)


def test_the_run_ends_at_the_mean_of_the_last_dictionaries_with_every_posterior_fitted_there():
    problem = annealed_problem(n_data=100, seed=4)
    trainer = EpochSubsetEM(
        max_epochs=5,
        subset_size=40,
        e_step=EntropyEStep(),
        driver=BlockLBFGS(iterations=10),
        em_iterations_per_epoch=3,
        average_last_epochs=2,
    )
    state = trainer.start(problem, None)
    for epoch in range(5):
        trainer.train_epoch(problem, state, epoch, problem.annealing(epoch))
        if epoch == 3:
            W3 = problem.model.W.detach().clone()
        recorded = trainer.evaluated_points(problem, epoch)  # the epoch's record: its subset, then every point
        assert recorded is None if epoch == 4 else torch.equal(recorded, trainer.epoch_points(problem, epoch))
    assert len(state.recent_dictionaries) == 2 and torch.equal(state.recent_dictionaries[0], W3)
    mean = (W3 + state.recent_dictionaries[1]) / 2
    torch.testing.assert_close(problem.model.W.detach(), mean / mean.norm(dim=0), rtol=1e-12, atol=1e-12)
    final = float(evaluate_problem(problem, AnnealingWeights()).elbo)  # over all 100 points
    assert final == pytest.approx(score_dictionary(problem.x, problem.model.W.detach()).elbo, abs=1e-6)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"subset_size": 0}, "subset_size must be >= 1"),
        ({"average_last_epochs": 11}, "average_last_epochs must be at most max_epochs (10)"),
        ({"average_last_epochs": 0}, "average_last_epochs must be >= 1"),
    ],
)
def test_subset_settings_that_cannot_work_are_rejected_naming_the_key(kwargs, message):
    with pytest.raises(ConfigError) as error:
        EpochSubsetEM(max_epochs=10, **kwargs)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("setting", [{"restarts": None}, {"relative_tolerance": 1e-3}, {"train_dictionary": False}])
def test_what_subsets_need_is_not_a_setting_that_could_be_wrong(setting):
    """Fresh posteriors for each subset, a run of exactly max_epochs epochs and a trained W are what the
    trainer is: none of them can be set otherwise (plain EM has no subsets, and EM's trainer has no such flag)."""
    with pytest.raises(TypeError):
        EpochSubsetEM(**setting)
    assert EpochSubsetEM().stop_rule is None and isinstance(EpochSubsetEM().restarts, RestartEveryEpoch)
    with pytest.raises(TypeError):
        EMTrainer(subset_size=40)
