"""Minibatch Adam for amortised and per-data-point posteriors (docs/design.md §7.5).

One epoch: a permutation of the data (``shuffle=True``; drawn from a generator seeded with the run's
seed, so runs are reproducible and a resumed run continues the same sequence), then one Adam step per
minibatch of ``batch_size`` points on ``-F_β(batch)``, the annealing-weighted objective averaged over the
batch. Parameters: W (unit-norm columns through the model's gauge), σ² and λ when the objective learns
them, and the posterior's parameters (the encoder's weights, or every ``μ_n, Σ_n``: rows outside the
batch get zero gradient). Nothing in the inner loop reads a value back to the host. ``fused_objective``
(default): where the objective has a closed-form minibatch gradient (the entropy objective with diagonal
Gaussians, ``EntropyELBO.batch_value_and_gradient``) the step takes it and backpropagates from q's moments
alone, instead of autograd through the objective's some forty operations on (batch, H) arrays.

``statistics`` (``trainer/statistics``: ``full`` | ``batch``, ``trainers/minibatch_statistics.py``) says how a
minibatch step estimates the entropy objective's data-set averages ``σ²*, λ*``. Where the schedule holds the
prior's scale at ``λ_0`` (``annealing.prior_scale=fixed``) the weights carry it into the objective, whose
annealed prior term is then the cross-entropy at ``λ_0`` (docs/design.md §8). The semi-amortised variant, W's
gradient at each batch's refined q, is ``trainers/semi_amortized.py``.

The dictionary starts from ``initialisation`` (``sparse_elbo/initialisation.py``): the model's own random
start by default, or the MAP sparse-coding dictionary (``trainer/initialisation=sparse_coding``, the amortised
experiments' choice: on natural-image patches the fields are localised from the first epoch; docs/design.md §7.5).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sparse_elbo import parallel
from sparse_elbo.annealing import AnnealingWeights
from sparse_elbo.initialisation import DictionaryStart, RandomDictionary, start_dictionary
from sparse_elbo.problem import Problem
from sparse_elbo.trainers.base import KINDS, OBJECTIVES, Capabilities, Sizes, Trainer
from sparse_elbo.trainers.minibatch_statistics import FullDataStatistics, StatisticsEstimate, StatisticsStore
from sparse_elbo.validation import invalid, require_at_least, require_positive


@dataclass
class AdamState:
    optimizer: torch.optim.Adam
    shuffle_generator: torch.Generator  # the order of the data points in each epoch
    noise_generator: torch.Generator  # the sampled objective's noise
    store: StatisticsStore | None  # full-data σ²*, λ* statistics (entropy objective, statistics=full)
    save_statistics: bool = False  # checkpoints keep store's rows (when not every epoch refreshes them)

    def state_dict(self) -> dict:
        saved = {
            "optimizer": self.optimizer.state_dict(),
            "shuffle_generator": self.shuffle_generator.get_state(),
            "noise_generator": self.noise_generator.get_state(),
        }
        if self.store is not None and self.save_statistics:
            saved["statistics"] = self.store.rows()
        return saved


class AdamTrainer(Trainer):
    capabilities = Capabilities(
        posteriors=KINDS,
        objectives=OBJECTIVES,
        annealing=True,
        prior_scales=("optimal", "fixed"),
        data_parallel=True,
        streams_data=True,
    )

    def __init__(
        self,
        max_epochs: int = 200,
        batch_size: int = 512,
        learning_rate: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        shuffle: bool = True,
        statistics: StatisticsEstimate | None = None,
        train_dictionary: bool = True,
        initialisation: DictionaryStart | None = None,
        fused_objective: bool = True,
    ):
        require_at_least(1, max_epochs=max_epochs, batch_size=batch_size)
        require_positive(learning_rate=learning_rate)
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise invalid("betas", f"must be two numbers in [0, 1), got {list(betas)}")
        self.max_epochs, self.batch_size, self.learning_rate, self.betas = (
            int(max_epochs),
            int(batch_size),
            float(learning_rate),
            betas,
        )
        self.shuffle, self.train_dictionary, self.fused_objective = bool(shuffle), bool(train_dictionary), bool(fused_objective)
        self.statistics = statistics if statistics is not None else FullDataStatistics()
        self.initialisation = initialisation if initialisation is not None else RandomDictionary()

    def start(self, problem: Problem, saved: dict | None) -> AdamState:
        device = problem.x.device
        if saved is None and self.train_dictionary:
            start_dictionary(self.initialisation, problem)
        params = problem.trainable_parameters(self.train_dictionary)
        state = AdamState(
            # fused: one pass over each parameter array per step instead of one per arithmetic operation
            torch.optim.Adam(params, lr=self.learning_rate, betas=self.betas, fused=True),
            torch.Generator(device=device).manual_seed(problem.seed),
            torch.Generator(device=device).manual_seed(problem.seed * 1_000_003 + 1),
            self.statistics.store(problem),
            save_statistics=self.statistics.saves_rows,
        )
        if saved is not None:
            if state.store is not None and "statistics" in saved:
                state.store.load(*saved["statistics"])
            state.optimizer.load_state_dict(saved["optimizer"])
            state.shuffle_generator.set_state(saved["shuffle_generator"].cpu())  # generator states live on the host
            state.noise_generator.set_state(saved["noise_generator"].cpu())
        return state

    def _batches(self, n: int, generator: torch.Generator, device) -> Iterator[tuple[torch.Tensor, int, torch.Tensor | None]]:
        """Each minibatch of the epoch: the positions of this rank's points in it (of its ``n``), its size, and
        where in it they are (None: all of it). The order is drawn over every rank's points (global indices),
        so that the minibatches do not depend on the number of ranks (with ``shuffle=False`` each minibatch is
        then mostly one rank's: the same steps, without the speed-up)."""
        ranks, size = parallel.sharing(), self.batch_size
        n_all = n if ranks is None else parallel.count(n)
        order = torch.randperm(n_all, generator=generator, device=device) if self.shuffle else torch.arange(n_all, device=device)
        if ranks is None:
            yield from ((batch, len(batch), None) for batch in order.split(size))
            return
        part = ranks.shard(n_all)
        held = torch.nonzero((order >= part.start) & (order < part.stop)).reshape(-1)  # places in the order (N_rank,)
        counts = torch.bincount(held // size, minlength=-(-n_all // size)).tolist()  # per minibatch: one sync an epoch
        for b, places in enumerate(held.split(counts)):
            yield order[places] - part.start, min(size, n_all - b * size), places - b * size

    def train_epoch(self, problem: Problem, state: AdamState, epoch: int, weights: AnnealingWeights) -> None:
        """One shuffled pass in minibatches; nothing in the loop reads a value back to the host (data-parallel:
        each step all-reduces the shared parameters' gradients, ``parallel.complete_gradients``)."""
        self.statistics.before_epoch(state.store, epoch)
        shared, trained = problem.shared_parameters(self.train_dictionary), problem.trainable_parameters(self.train_dictionary)
        for index, size, places in self._batches(problem.x.shape[0], state.shuffle_generator, problem.x.device):
            with parallel.minibatch(size, places):
                q = problem.q(index)  # the batch's Gaussians (an encoder's forward pass)
                state.optimizer.zero_grad(set_to_none=True)
                self.set_gradients(problem, state, index, q, weights)
                parallel.complete_gradients(shared, trained)
            state.optimizer.step()

    def set_gradients(self, problem: Problem, state: AdamState, index: torch.Tensor, q, weights: AnnealingWeights) -> None:
        """The gradients of ``-F_β`` of the minibatch ``index`` (Gaussians ``q``) in every trained parameter."""
        x, model, objective, store = problem.x[index], problem.model, problem.objective, state.store
        if self.fused_objective and objective.has_closed_form_batch_gradient(q):
            self._closed_form_gradient(x, q, model, objective, weights, store, index)
            return
        statistics = None if store is None else store.statistics(index, *objective.batch_statistics(x, q, model))
        value = objective(x, q, model, weights, generator=state.noise_generator, statistics=statistics)
        (-value.weighted).backward()

    def _closed_form_gradient(self, x, q, model, objective, weights, store: StatisticsStore | None, index) -> None:
        """Set the step's gradients from the objective's closed form (``batch_value_and_gradient``): W's
        directly, the posterior's parameters by backpropagating ``-∂F/∂μ, -∂F/∂s`` from q's moments."""
        statistics_of = None if store is None else functools.partial(store.statistics, index)
        _, (grad_mean, grad_std, grad_W) = objective.batch_value_and_gradient(x, q, model, weights, statistics_of)
        moments = [(moment, -grad) for moment, grad in ((q.mean, grad_mean), (q.std, grad_std)) if moment.requires_grad]
        if moments:
            torch.autograd.backward(*zip(*moments))
        if self.train_dictionary:
            with torch.no_grad():
                model.W_raw.grad = -model.raw_gradient(grad_W)

    def working_memory(self, sizes: Sizes) -> int:
        """Parameters, gradients and Adam's two moments of every parameter."""
        return 4 * (sizes.posterior_numbers + sizes.n_observed * sizes.n_latents)
