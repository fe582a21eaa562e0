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

The entropy objective's ``σ²*, λ*`` are data-set averages (docs/design.md §3); ``statistics`` says how a minibatch
step estimates them:

- ``full`` (default): the per-data-point statistics ``r_n = ||x_n - Wμ_n||² + tr(WᵀWΣ_n)`` and
  ``t_nh = E|z_h|`` are stored for every data point (recomputed exactly at the start of every
  ``statistics_refresh_every``-th epoch, and each batch's rows replaced by their new values as it
  passes), so that ``σ²* = mean_n r_n / D`` and
  ``λ* = mean_n t_n`` are full-data values. The batch enters as
  ``S = S_full + (mean_B s - stopgrad(mean_B s))``: the value is the full-data statistic and the
  gradient the batch estimate of its gradient, so the step is the minibatch estimate of the gradient of
  the full-data ``L_H`` (unbiased up to the staleness of the other rows: at most one epoch when every
  epoch starts with a refresh, at most one epoch plus the batches since the last pass without it —
  the refresh is an encoder pass over all data, about a third of an epoch's matrix products).
- ``batch``: ``σ²*, λ*`` from the minibatch alone — what the authors' code does (biased; kept for
  reproduction).

Whatever the estimator, the values reported after each epoch are the exact full-data ones.

``annealed_prior_scale`` (entropy objective): ``optimal`` (default) weights ``H[p(z; λ*)]`` by ``β_prior``, an
objective without a maximum while ``β_prior > 1`` (docs/design.md §8: every latent switches off); ``fixed``
weights instead the cross-entropy ``-mean_n E_qn[log p(z; λ_0)]`` at one shared scale ``λ_0`` — the mean
statistic of the least-squares codes of the starting dictionary — while ``β_prior > 1``, as the EM's
fixed-scale annealing does: a sparser prior of scale ``λ_0/β_prior``, bounded, with every latent in use.

``dictionary_posterior``: which q gives W's gradient. ``encoder`` (default): the encoder's output, as in the
authors' code. ``refined`` (semi-amortised; amortised posteriors, the entropy objective, no annealing): each
batch's output refined per data point — full covariances, ``refine_iterations`` fixed-point iterations
(``inference/fixed_point.py``) at the refined posteriors' own full-data ``σ²*, λ*`` — so that W follows the
per-point optimum instead of the encoder's errors; the encoder is still trained on its own ELBO, and it
alone is the model's posterior (docs/design.md §7.5).

The dictionary starts from ``initialisation`` (``sparse_elbo/initialisation.py``): the model's own random
start by default, or the MAP sparse-coding dictionary (``trainer/initialisation=sparse_coding``, the amortised
experiments' choice: on natural-image patches the fields are localised from the first epoch; docs/design.md §7.5).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from sparse_elbo import closed_forms
from sparse_elbo.annealing import AnnealingWeights
from sparse_elbo.errors import ConfigError
from sparse_elbo.inference.fixed_point import FixedPointFit
from sparse_elbo.inference.statistics import data_blocks
from sparse_elbo.initialisation import RandomDictionary, start_dictionary
from sparse_elbo.objectives import DataStatistics
from sparse_elbo.problem import Problem
from sparse_elbo.trainers.base import FAMILIES, OBJECTIVES, Capabilities, Sizes, Trainer
from sparse_elbo.trainers.em import ANNEALED_PRIOR_SCALES
from sparse_elbo.validation import require_at_least, require_one_of, require_positive

STATISTICS = ("full", "batch")
DICTIONARY_POSTERIORS = ("encoder", "refined")


class StatisticsStore:
    """Per-data-point ``r_n (N,)`` and ``t_n (N,H)`` with their running sums (statistics=full)."""

    def __init__(self, problem: Problem, block_size: int):
        self.problem, self.block_size = problem, block_size
        n, H = problem.x.shape[0], problem.model.n_latents
        self.residual = problem.x.new_zeros(n)  # r (N,)
        self.prior_statistic = problem.x.new_zeros(n, H)  # t (N,H)
        self.filled = False  # rows hold values (after a refresh or a load)

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute every row exactly for the current W and q."""
        problem = self.problem
        for index in data_blocks(problem.x.shape[0], self.block_size, problem.x.device):
            r, t = problem.objective.batch_statistics(problem.x[index], problem.q(index), problem.model)
            self.residual[index], self.prior_statistic[index] = r, t
        self.residual_sum, self.prior_sum = self.residual.sum(), self.prior_statistic.sum(0)
        self.filled = True

    def load(self, residual: torch.Tensor, prior_statistic: torch.Tensor) -> None:
        """Rows saved by a checkpoint."""
        self.residual.copy_(residual)
        self.prior_statistic.copy_(prior_statistic)
        self.residual_sum, self.prior_sum = self.residual.sum(), self.prior_statistic.sum(0)
        self.filled = True

    def means(self) -> DataStatistics:
        """The full-data means of the stored rows (no gradient)."""
        n = self.residual.shape[0]
        return DataStatistics(residual=self.residual_sum / n, prior_statistic=self.prior_sum / n)

    def statistics(self, index: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> DataStatistics:
        """Full-data means with the batch's rows replaced by ``r (B,), t (B,H)`` (which carry gradients):
        value = full-data mean, gradient = that of the batch mean. Stores the new rows."""
        n = self.residual.shape[0]
        with torch.no_grad():
            self.residual_sum = self.residual_sum - self.residual[index].sum() + r.detach().sum()
            self.prior_sum = self.prior_sum - self.prior_statistic[index].sum(0) + t.detach().sum(0)
            self.residual[index], self.prior_statistic[index] = r.detach(), t.detach()
        r_mean, t_mean = r.mean(), t.mean(0)
        return DataStatistics(
            residual=self.residual_sum / n + (r_mean - r_mean.detach()),
            prior_statistic=self.prior_sum / n + (t_mean - t_mean.detach()),
        )


@dataclass
class AdamState:
    optimizer: torch.optim.Adam
    shuffle_generator: torch.Generator  # the order of the data points in each epoch
    noise_generator: torch.Generator  # the sampled objective's noise
    store: StatisticsStore | None  # full-data σ²*, λ* statistics (entropy objective, statistics=full)
    refined: StatisticsStore | None = None  # the same for the refined q (dictionary_posterior=refined)
    save_statistics: bool = False  # checkpoints keep store's rows (when not every epoch refreshes them)
    annealing_scale: float | None = None  # λ_0 of the annealed epochs (annealed_prior_scale=fixed)

    def state_dict(self) -> dict:
        saved = {
            "optimizer": self.optimizer.state_dict(),
            "shuffle_generator": self.shuffle_generator.get_state(),
            "noise_generator": self.noise_generator.get_state(),
            "annealing_scale": self.annealing_scale,
        }
        if self.store is not None and self.save_statistics:
            saved["statistics"] = (self.store.residual, self.store.prior_statistic)
        if self.refined is not None:
            saved["refined_statistics"] = (self.refined.residual, self.refined.prior_statistic)
        return saved


class AdamTrainer(Trainer):
    capabilities = Capabilities(families=FAMILIES, objectives=OBJECTIVES, annealing=True)

    def __init__(
        self,
        max_epochs: int = 200,
        batch_size: int = 512,
        learning_rate: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        shuffle: bool = True,
        statistics: str = "full",
        statistics_block_size: int = 16384,
        statistics_refresh_every: int = 1,
        train_dictionary: bool = True,
        initialisation=None,
        dictionary_posterior: str = "encoder",
        refine_iterations: int = 10,
        annealed_prior_scale: str = "optimal",
        fused_objective: bool = True,
    ):
        require_at_least("trainer", 1, max_epochs=max_epochs, batch_size=batch_size, statistics_block_size=statistics_block_size)
        require_one_of("trainer.statistics", statistics, STATISTICS)
        require_at_least("trainer", 0, statistics_refresh_every=statistics_refresh_every)
        require_positive("trainer", learning_rate=learning_rate)
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"trainer.betas must be two numbers in [0, 1), got {list(betas)}")
        self.max_epochs = int(max_epochs)
        self.batch_size = int(batch_size)
        self.learning_rate = float(learning_rate)
        self.betas = betas
        self.shuffle = bool(shuffle)
        self.statistics = statistics
        self.statistics_block_size = int(statistics_block_size)
        self.statistics_refresh_every = int(statistics_refresh_every)
        self.train_dictionary = bool(train_dictionary)
        self.initialisation = initialisation if initialisation is not None else RandomDictionary()
        require_one_of("trainer.dictionary_posterior", dictionary_posterior, DICTIONARY_POSTERIORS)
        require_at_least("trainer", 1, refine_iterations=refine_iterations)
        self.refine_iterations = int(refine_iterations)
        require_one_of("trainer.annealed_prior_scale", annealed_prior_scale, ANNEALED_PRIOR_SCALES)
        self.fixed_annealing_scale = annealed_prior_scale == "fixed"
        self.fused_objective = bool(fused_objective)
        if self.fixed_annealing_scale:  # the fixed scale replaces the entropy objective's H[p(z; λ*)]
            self.capabilities = Capabilities(families=FAMILIES, objectives=("entropy",), annealing=True)
        self.refined = dictionary_posterior == "refined"
        if self.refined:
            if statistics != "full":
                raise ConfigError(f"trainer.dictionary_posterior=refined needs trainer.statistics=full, got {statistics!r}")
            # the refined q maximise the unweighted entropy objective, starting from an encoder's output
            self.capabilities = Capabilities(families=("amortized",), objectives=("entropy",), annealing=False)

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
            # the full-data store is only needed where the objective uses σ²*, λ* (the entropy objective)
            StatisticsStore(problem, self.statistics_block_size)
            if self.statistics == "full" and not problem.objective.learns_noise_and_prior_scale
            else None,
            save_statistics=self.statistics_refresh_every != 1,
        )
        if self.refined:
            state.refined = StatisticsStore(problem, self.statistics_block_size)
            if saved is None:
                state.refined.refresh()  # the encoder's statistics until each point is first refined
            else:
                state.refined.load(*saved["refined_statistics"])
        if self.fixed_annealing_scale:  # λ_0 of the run (or, resuming a run saved without it, of the current W)
            kept = None if saved is None else saved.get("annealing_scale")
            state.annealing_scale = kept if kept is not None else self._annealing_scale(problem)
        if saved is not None:
            if state.store is not None and "statistics" in saved:
                state.store.load(*saved["statistics"])
            state.optimizer.load_state_dict(saved["optimizer"])
            state.shuffle_generator.set_state(saved["shuffle_generator"].cpu())  # generator states live on the host
            state.noise_generator.set_state(saved["noise_generator"].cpu())
        return state

    def _annealing_scale(self, problem: Problem) -> float:
        """λ_0: the mean prior statistic of the least-squares codes ``(WᵀW + εI)⁻¹Wᵀx_n`` of the starting W
        (the statistic of a point mass at μ, ``|μ|^degree``)."""
        W, total = problem.model.W.detach(), 0.0
        for index in data_blocks(problem.x.shape[0], self.statistics_block_size, problem.x.device):
            codes = closed_forms.least_squares_codes(problem.x[index], W)  # (B,H)
            total += float(codes.abs().pow(problem.model.prior.statistic_degree).sum())
        return total / (problem.x.shape[0] * problem.model.n_latents)

    def _batches(self, n: int, generator: torch.Generator, device) -> tuple[torch.Tensor, ...]:
        order = torch.randperm(n, generator=generator, device=device) if self.shuffle else torch.arange(n, device=device)
        return order.split(self.batch_size)

    def train_epoch(self, problem: Problem, state: AdamState, epoch: int, weights: AnnealingWeights) -> None:
        """One shuffled pass in minibatches; nothing in the loop reads a value back to the host."""
        x, model, objective, store = problem.x, problem.model, problem.objective, state.store
        every = self.statistics_refresh_every
        if store is not None and (not store.filled or (every > 0 and epoch % every == 0)):
            store.refresh()
        fixed = {}  # the entropy objective's prior term at λ_0 while β_prior > 1 (annealed_prior_scale=fixed)
        if state.annealing_scale is not None and weights.prior != 1.0:
            fixed["prior_scale"] = x.new_full((model.n_latents,), state.annealing_scale)
        for index in self._batches(x.shape[0], state.shuffle_generator, x.device):
            x_batch, q = x[index], problem.q(index)
            state.optimizer.zero_grad(set_to_none=True)
            if self.fused_objective and objective.has_closed_form_batch_gradient(q):
                self._closed_form_gradient(x_batch, q, model, objective, weights, store, index, fixed)
            else:
                statistics = None
                if store is not None:
                    statistics = store.statistics(index, *objective.batch_statistics(x_batch, q, model))
                value = objective(x_batch, q, model, weights, generator=state.noise_generator, statistics=statistics, **fixed)
                (-value.weighted).backward()
            if state.refined is not None and self.train_dictionary:
                self._refined_dictionary_gradient(x_batch, q, model, state.refined, index)
            state.optimizer.step()

    def _closed_form_gradient(self, x, q, model, objective, weights, store: StatisticsStore | None, index, fixed: dict) -> None:
        """Set the step's gradients from the objective's closed form (``batch_value_and_gradient``): W's
        directly, the posterior's parameters by backpropagating ``-∂F/∂μ, -∂F/∂s`` from q's moments."""
        statistics_of = None if store is None else functools.partial(store.statistics, index)
        _, (grad_mean, grad_std, grad_W) = objective.batch_value_and_gradient(x, q, model, weights, statistics_of, **fixed)
        moments = [(moment, -grad) for moment, grad in ((q.mean, grad_mean), (q.std, grad_std)) if moment.requires_grad]
        if moments:
            torch.autograd.backward(*zip(*moments))
        if self.train_dictionary:
            with torch.no_grad():
                model.W_raw.grad = -model.raw_gradient(grad_W)

    @torch.no_grad()
    def _refined_dictionary_gradient(self, x: torch.Tensor, q, model, refined: StatisticsStore, index: torch.Tensor) -> None:
        """Replace W's gradient by the one at the batch's q refined per data point (semi-amortised): the
        encoder's output, refined by ``refine_iterations`` fixed-point iterations at the refined posteriors'
        own full-data ``σ²*, λ*`` (``refined``), gives ``∂F/∂W = (C - W S)/(B σ²)`` with ``C = Σ_n x_n μ_nᵀ``
        (D,H), ``S = Σ_n (μ_n μ_nᵀ + Σ_n)`` (H,H) over the batch; the batch's rows of ``refined`` follow."""
        W = model.W.detach()  # (D,H)
        means = refined.means()
        sigma2 = closed_forms.optimal_sigma2(means.residual, x.shape[1])
        lam = closed_forms.optimal_lambda(means.prior_statistic)
        fit = FixedPointFit.at_scales(x, W, model.prior, sigma2, lam, q.mean.detach(), q.variance.detach().sqrt())
        for _ in range(self.refine_iterations):
            fit.step(line_search_steps=30)
        mean, covariance = fit.mean, fit.covariance  # (B,H), (B,H,H)
        second_moment = mean.T @ mean + covariance.sum(0)
        gradient = closed_forms.dictionary_gradient(x.T @ mean, second_moment, W, sigma2) / x.shape[0]
        model.W_raw.grad = -model.raw_gradient(gradient)
        residual = closed_forms.residual_energy(x, W, mean, (covariance * (W.T @ W)).sum((-2, -1)))  # (B,)
        refined.statistics(index, residual, model.prior.statistic(mean, torch.diagonal(covariance, dim1=-2, dim2=-1)))

    def working_memory(self, sizes: Sizes) -> int:
        """Parameters, gradients and Adam's two moments of every parameter."""
        return 4 * (sizes.posterior_numbers + sizes.n_observed * sizes.n_latents)
