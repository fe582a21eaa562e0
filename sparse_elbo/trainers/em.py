"""Variational EM (SPEC §6): E-steps on the per-data-point posteriors, M-steps on the dictionary.

One EM iteration, ``statistics="full"`` (default, SPEC §4): with ``σ², λ`` fixed at their full-data optima
``σ²*, λ*``, the E-step maximises the (annealing-weighted) analytic ELBO over every ``q_n`` — the
problem separates across data points, so blocks of ``e_step_block_size`` points (the whole data set
where memory allows) are optimised at once with L-BFGS on the block's summed objective. Diagonal
posteriors under the Laplace prior use the fused value-and-gradient of ``trainers/e_step.py``
(``fused_e_step=True``, default), which never forms an (N,D) array; other cases use autograd. Then the
M-step for ``W``:

- ``closed_form`` (default): for fixed ``q`` the expected log-likelihood is quadratic in ``W``, maximised by

      W* = (Σ_n x_n μ_nᵀ) (Σ_n μ_n μ_nᵀ + Σ_n)⁻¹,

  optionally over-relaxed, ``W ← W + ω (W* − W)`` (``m_step_overrelaxation``; any ω ∈ (0, 2] still
  does not lower the ELBO, see ``_update_dictionary``), followed by the gauge fix ``W_h → W_h / c_h``, ``z_h → c_h z_h``, ``λ_h → c_h λ_h`` (``c_h = ||W_h||``),
  which leaves the ELBO unchanged; ``σ²*, λ*`` are then recomputed in closed form. Every step is a
  coordinate ascent, so the ELBO never decreases while the annealing weights are 1.
- ``gradient``: the authors' single gradient-ascent step of size ``m_step_lr`` on the batch objective,
  after each batch, on the raw dictionary whose columns the unit-norm gauge normalises when used.

``e_step_objective="entropy"`` makes the E-step maximise the full-data ``L_H`` itself: each block's
``q`` with every other point's ``q`` fixed, and ``σ²*, λ*`` recomputed from the current ``q`` at every
evaluation instead of held at the previous ``q``'s values. Its gradient is the analytic E-step's at the
current ``σ²*, λ*`` (envelope theorem); the difference is that ``σ²`` and the codes move together, so EM
no longer needs many iterations to walk ``σ²`` down — on natural image patches the analytic E-step often
stays in a high-noise state (σ² ≈ 0.03 against 0.012) for the rest of the run. Each block's E-step
returns its share of the sufficient statistics (``SufficientStatistics``) from which the other blocks'
``σ²*, λ*`` terms and the closed-form ``W`` follow for any ``W``, so a pass needs no second sweep over
the data for its M-step.

An epoch is ``em_iterations_per_epoch`` EM iterations (warm-started E-steps of ``e_step_iterations``
L-BFGS iterations each), then an evaluation; annealing weights change per epoch.

``statistics="batch"`` is the authors' scheme: each batch of ``batch_size`` points is optimised on
its own entropy objective ``L_H`` (``σ²*, λ*`` from the batch alone — biased), in fixed order.
``fresh_posterior=True`` re-initialises ``q`` before each E-step (as the authors' code does: zero means,
standard deviations ``fresh_std``, 1 in their code, default the posterior's ``init_std``);
the default warm-starts from the previous epoch's ``q``.

Whatever the scheme, the values reported each epoch are the exact full-data ``L_H``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_elbo.evaluation import data_blocks, full_data_statistics
from sparse_elbo.objectives import AnalyticELBO, DataStatistics, EntropyELBO
from sparse_elbo.problem import Checkpoint, Evaluate, FitOutcome, Problem, Stopwatch
from sparse_elbo.trainers.e_step import DiagonalLaplaceEntropyEStep, DiagonalLaplaceEStep
from sparse_elbo.validation import require_at_least, require_one_of

M_STEPS = ("closed_form", "gradient")
STATISTICS = ("full", "batch")
INITIAL_MEANS = ("least_squares", "zeros")
E_STEP_OBJECTIVES = ("analytic", "entropy")


@dataclass
class SufficientStatistics:
    """Sums over a set of data points from which the full-data ``σ²*, λ*`` and the closed-form ``W``
    follow, for any ``W`` (float64):

        x_energy = Σ_n ||x_n||²,  cross = Σ_n x_n μ_nᵀ (D,H),  second_moment = Σ_n (μ_n μ_nᵀ + Σ_n) (H,H),
        prior = Σ_n t_n (H,)  (the prior statistic, E|z| for Laplace),  count = N of the whole data set,

    so that ``Σ_n E||x_n - W z||² = x_energy - 2 tr(Wᵀ cross) + tr(WᵀW second_moment)``."""

    x_energy: torch.Tensor
    cross: torch.Tensor
    second_moment: torch.Tensor
    prior: torch.Tensor
    count: int

    def residual(self, W: torch.Tensor) -> torch.Tensor:
        """``Σ_n E||x_n - W z||²`` for the dictionary ``W (D,H)``."""
        W = W.to(self.cross.dtype)
        return self.x_energy - 2.0 * (W * self.cross).sum() + ((W.T @ W) * self.second_moment).sum()

    def rescaled(self, scale: torch.Tensor, prior_degree: int) -> "SufficientStatistics":
        """The sums after the gauge change ``z_h → c_h z_h`` (``t(c z) = c^degree t(z)``)."""
        scale = scale.to(self.cross.dtype)
        return SufficientStatistics(
            self.x_energy, self.cross * scale, self.second_moment * torch.outer(scale, scale), self.prior * scale**prior_degree, self.count
        )

    def _combine(self, other: "SufficientStatistics", sign: float) -> "SufficientStatistics":
        return SufficientStatistics(
            self.x_energy + sign * other.x_energy, self.cross + sign * other.cross,
            self.second_moment + sign * other.second_moment, self.prior + sign * other.prior, self.count,
        )

    def __add__(self, other: "SufficientStatistics") -> "SufficientStatistics":
        return self._combine(other, 1.0)

    def __sub__(self, other: "SufficientStatistics") -> "SufficientStatistics":
        return self._combine(other, -1.0)


class EMTrainer:
    supported_families = ("diag", "full")
    supported_objectives = ("entropy",)  # σ², λ are always set to their closed-form optima

    def __init__(
        self,
        max_epochs: int = 10,
        em_iterations_per_epoch: int = 1,
        e_step_iterations: int = 100,
        e_step_block_size: int | None = None,
        e_step_max_evaluations: int | None = None,
        history_size: int = 20,
        e_step_tolerance: float = 1e-9,
        m_step: str = "closed_form",
        m_step_lr: float = 0.5,
        statistics: str = "full",
        batch_size: int = 512,
        fresh_posterior: bool = False,
        fresh_std: float | None = None,
        relative_tolerance: float = 0.0,
        initial_means: str = "least_squares",
        fused_e_step: bool = True,
        e_step_objective: str = "analytic",
        m_step_overrelaxation: float = 1.0,
    ):
        require_at_least(
            "trainer", 1, max_epochs=max_epochs, em_iterations_per_epoch=em_iterations_per_epoch,
            e_step_iterations=e_step_iterations, history_size=history_size, batch_size=batch_size,
            **({} if e_step_block_size is None else {"e_step_block_size": e_step_block_size}),
            **({} if e_step_max_evaluations is None else {"e_step_max_evaluations": e_step_max_evaluations}),
        )
        require_at_least("trainer", 0, e_step_tolerance=e_step_tolerance, relative_tolerance=relative_tolerance)
        require_one_of("trainer.m_step", m_step, M_STEPS)
        require_one_of("trainer.statistics", statistics, STATISTICS)
        require_one_of("trainer.initial_means", initial_means, INITIAL_MEANS)
        require_one_of("trainer.e_step_objective", e_step_objective, E_STEP_OBJECTIVES)
        if e_step_objective == "entropy" and statistics != "full":
            raise ValueError("trainer.e_step_objective=entropy needs trainer.statistics=full")
        if not 0 < m_step_overrelaxation <= 2:
            raise ValueError(f"trainer.m_step_overrelaxation must be in (0, 2] (beyond 2 the M-step can lower the ELBO), got {m_step_overrelaxation}")
        if not m_step_lr > 0:
            raise ValueError(f"trainer.m_step_lr must be > 0, got {m_step_lr}")
        if statistics == "full" and m_step == "gradient":
            raise ValueError("trainer.m_step=gradient needs trainer.statistics=batch (the authors' per-batch scheme)")
        self.max_epochs = int(max_epochs)
        self.em_iterations_per_epoch = int(em_iterations_per_epoch)
        self.e_step_iterations = int(e_step_iterations)
        self.e_step_block_size = None if e_step_block_size is None else int(e_step_block_size)
        self.e_step_max_evaluations = None if e_step_max_evaluations is None else int(e_step_max_evaluations)
        self.history_size = int(history_size)
        self.e_step_tolerance = float(e_step_tolerance)
        self.m_step = m_step
        self.m_step_lr = float(m_step_lr)
        self.statistics = statistics
        self.batch_size = int(batch_size)
        self.fresh_posterior = bool(fresh_posterior)
        if fresh_std is not None and not fresh_std > 0:
            raise ValueError(f"trainer.fresh_std must be > 0 (or null for the posterior's init_std), got {fresh_std}")
        self.fresh_std = None if fresh_std is None else float(fresh_std)
        self.relative_tolerance = float(relative_tolerance)
        self.initial_means = initial_means
        self.fused_e_step = bool(fused_e_step)
        self.e_step_objective = e_step_objective
        self.m_step_overrelaxation = float(m_step_overrelaxation)

    # ----------------------------------------------------------------------------------- E-step
    def e_step(self, problem: Problem, index: torch.Tensor, objective, weights,
               others: SufficientStatistics | None = None, x_energy: torch.Tensor | None = None) -> SufficientStatistics | None:
        """Maximise ``objective`` summed over the data points ``index`` w.r.t. their posteriors — or, given
        ``others`` (the sums of every other data point), the full-data ``L_H`` as a function of them, and
        then return the block's own new sums (``x_energy``: the block's Σ||x||², if known)."""
        x = problem.x[index]
        block = problem.posterior.block_parameters(index)
        optimizer = torch.optim.LBFGS(
            list(block.values()),
            lr=1.0,
            max_iter=self.e_step_iterations,
            max_eval=self.e_step_max_evaluations,  # None: torch's 1.25 × max_iter
            history_size=self.history_size,
            tolerance_grad=1e-7,
            tolerance_change=self.e_step_tolerance,
            line_search_fn="strong_wolfe",
        )
        fusable = self.fused_e_step and DiagonalLaplaceEStep.applies_to(problem.posterior, problem.model)
        if fusable and (others is not None or isinstance(objective, AnalyticELBO)):
            if others is None:
                fused = DiagonalLaplaceEStep(x, problem.model, weights)
            else:
                fused = DiagonalLaplaceEntropyEStep(
                    x, problem.model, weights, others.residual(problem.model.W.detach()), others.prior, others.count, x_energy
                )

            def closure():
                loss, block["mean"].grad, block["log_std"].grad = fused.loss_and_gradients(block["mean"], block["log_std"])
                return loss

            optimizer.step(closure)
        else:
            # statistics=full: the sum over points, each point's problem independent of the block size;
            # statistics=batch: the batch mean, as the authors' closure (-elbo) — L-BFGS's first step
            # and its tolerances depend on this scale.
            scale = x.shape[0] if self.statistics == "full" else 1.0
            self._autograd_e_step(problem, x, block, optimizer, objective, weights, scale, others)
        problem.posterior.write_block(index, {k: v.detach() for k, v in block.items()})
        return None if others is None else self._block_statistics(problem, index, block, x_energy)

    @staticmethod
    def _autograd_e_step(problem: Problem, x, block, optimizer, objective, weights, scale: float, others=None) -> None:
        model = problem.model
        model_parameters = [p for p in model.parameters() if p.requires_grad]
        other_residual = None if others is None else others.residual(model.W.detach())

        def value_of(q):
            if others is None:
                return objective(x, q, model, weights)
            residual, prior_statistic = EntropyELBO().batch_statistics(x, q, model)  # (B,), (B,H)
            statistics = DataStatistics(
                (other_residual + residual.sum()) / others.count, (others.prior + prior_statistic.sum(0)) / others.count
            )  # other points' entropies are a constant and left out
            return EntropyELBO.from_statistics(q.entropy().sum() / others.count, statistics, x.shape[1], model.prior, weights)

        if others is not None:
            scale = others.count  # -N L_H, the sum over data points

        def closure():
            optimizer.zero_grad(set_to_none=False)
            value = value_of(problem.posterior.gaussian(block))
            loss = -scale * value.weighted
            loss.backward()
            return loss

        for p in model_parameters:  # W, σ², λ are fixed here: no gradients for them (a third less work)
            p.requires_grad_(False)
        try:
            optimizer.step(closure)
        finally:
            for p in model_parameters:
                p.requires_grad_(True)

    # ----------------------------------------------------------------------------------- M-steps
    @torch.no_grad()
    def closed_form_m_step(self, problem: Problem) -> None:
        """``W* = (Σ x μᵀ)(Σ μμᵀ + Σ_n)⁻¹`` (over-relaxed by ω), then the ELBO-preserving gauge fix to
        unit-norm columns."""
        blocks = self._blocks(problem.x.shape[0], self.block_size(problem.x), problem.x.device)
        total = self._total(self._block_statistics(problem, index) for index in blocks)
        problem.posterior.rescale_latents(self._update_dictionary(problem.model, total))

    @torch.no_grad()
    def _update_dictionary(self, model, statistics: SufficientStatistics) -> torch.Tensor:
        """Set ``W`` to ``W_old + ω (W* - W_old)``, ``W* = cross second_moment⁻¹`` the maximiser of the
        expected log-likelihood (ω = ``m_step_overrelaxation``; 1: the plain M-step), with its columns
        normalised; return their norms ``c (H,)``: the latents must follow, ``z_h → c_h z_h``.

        For fixed ``q`` the residual is quadratic in ``W`` with its minimum at ``W*``, so
        ``R(W_ω) - R(W*) = (ω - 1)² (R(W_old) - R(W*))``: for ω ∈ (0, 2] the step never lowers the ELBO,
        and ω > 1 extrapolates along the direction EM moves in. EM for ``W`` is slow when the noise is
        low (each M-step moves ``W`` only a fraction of the way, as ``q`` follows ``W``); over-relaxation
        (Salakhutdinov & Roweis 2003) takes a longer step in the same direction."""
        W = torch.linalg.solve(statistics.second_moment, statistics.cross.T).T  # W* (D,H); second_moment is symmetric
        if self.m_step_overrelaxation != 1.0:
            W_old = model.W.detach().to(W.dtype)  # unit-norm columns: the gauge the latents are in
            W = W_old + self.m_step_overrelaxation * (W - W_old)
        norms = W.norm(dim=0).clamp_min(torch.finfo(W.dtype).tiny)
        model.set_dictionary((W / norms).to(model.W_raw.dtype))
        return norms

    def gradient_m_step(self, problem: Problem, index: torch.Tensor, objective, weights) -> None:
        """The authors' M-step: ``W_raw ← W_raw + η ∇_{W_raw} F_batch``, where the unit-norm gauge
        normalises the columns when W is used (their ``constrain_W=True``). Like their code this does not
        renormalise ``W_raw``: its column norms grow with every step (the gradient is orthogonal to each
        column), so the effective step on the normalised W shrinks as training goes on."""
        model = problem.model
        value = objective(problem.x[index], problem.posterior(index), model, weights)
        (grad,) = torch.autograd.grad(value.weighted, model.W_raw)
        with torch.no_grad():
            model.W_raw.add_(self.m_step_lr * grad)

    @torch.no_grad()
    def initialise_means(self, problem: Problem) -> None:
        """``μ_n = (WᵀW + εI)⁻¹ Wᵀ x_n`` (ε = 1e-3) for the initial W, so that the first ``σ²*, λ*`` reflect
        the data's scale. From ``μ = 0`` they would be ``λ* ≈ 0.8 s_init``: with prior annealing the first
        E-step then switches every latent off, and EM stays in that fixed point."""
        W = problem.model.W  # (D,H)
        gram = W.T @ W + 1e-3 * torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
        for index in self._blocks(problem.x.shape[0], self.block_size(problem.x), problem.x.device):
            block = problem.posterior.block_parameters(index)
            block["mean"] = torch.linalg.solve(gram, W.T @ problem.x[index].T).T
            problem.posterior.write_block(index, block)

    # ----------------------------------------------------------------------------------- epochs
    _blocks = staticmethod(data_blocks)

    # On a CPU, blocks of 16,384 points keep every (block, H) temporary of the E-step below glibc's
    # 32 MiB mmap threshold, so freed buffers are reused instead of being returned to the kernel and
    # page-faulted back in at every L-BFGS evaluation (measured: 204,800 patches in one block spent
    # more time in the kernel than computing). CUDA's caching allocator has no such cost.
    CPU_BLOCK_SIZE = 16384

    def block_size(self, x: torch.Tensor) -> int:
        """``e_step_block_size``, or when it is None the whole data set on CUDA and 16,384 on a CPU."""
        if self.e_step_block_size is not None:
            return self.e_step_block_size
        return x.shape[0] if x.is_cuda else self.CPU_BLOCK_SIZE

    def _fix_noise_and_prior_scale(self, problem: Problem) -> None:
        """Set the model's σ², λ to the full-data optima σ²*, λ* for the current W and q."""
        statistics, _ = full_data_statistics(problem, self.block_size(problem.x))
        problem.model.set_noise_and_prior_scale(statistics.residual / problem.x.shape[1], statistics.prior_statistic)

    @staticmethod
    @torch.no_grad()
    def _block_statistics(problem: Problem, index: torch.Tensor, block: dict | None = None,
                          x_energy: torch.Tensor | None = None) -> SufficientStatistics:
        """The sufficient statistics of the data points ``index`` (posterior parameters ``block``: the
        stored ones when None; ``x_energy``: their Σ||x||², computed when None — it never changes, and
        recomputing it per block and EM iteration cost ~3% of patches_em). Products in the parameters'
        dtype, sums accumulated in float64."""
        x, f64 = problem.x[index], torch.float64  # (B,D)
        q = problem.q(index) if block is None else problem.posterior.gaussian({k: v.detach() for k, v in block.items()})
        mean = q.mean  # (B,H)
        return SufficientStatistics(
            x.pow(2).sum(dtype=f64) if x_energy is None else x_energy,
            (x.T @ mean).to(f64),  # (D,H)
            (mean.T @ mean + q.covariance_sum()).to(f64),  # (H,H)
            problem.model.prior.statistic(mean, q.variance).sum(0, dtype=f64),  # (H,)
            problem.x.shape[0],
        )

    @staticmethod
    def _total(statistics) -> SufficientStatistics:
        statistics = list(statistics)
        return sum(statistics[1:], statistics[0])

    def entropy_em_iterations(self, problem: Problem, weights, n_iterations: int = 1) -> None:
        """EM iterations on the full-data ``L_H``. E-step: each block's ``q`` maximises ``L_H`` with every
        other point's ``q`` fixed, so ``σ²*, λ*`` move with it (the analytic E-step holds them at the
        previous ``q``'s values, and ``σ²`` then needs many EM iterations to follow ``q``). M-step: the
        closed-form ``W`` from the blocks' sufficient statistics, then the gauge fix. Ends with the
        model's ``σ², λ`` at the exact full-data optima."""
        x, model, posterior = problem.x, problem.model, problem.posterior
        blocks = self._blocks(x.shape[0], self.block_size(x), x.device)
        statistics = [self._block_statistics(problem, index) for index in blocks]
        degree = model.prior.statistic_degree
        for _ in range(n_iterations):
            total = self._total(statistics)
            for b, index in enumerate(blocks):
                if self.fresh_posterior:
                    posterior.reset_block(index, self.fresh_std)
                new = self.e_step(problem, index, None, weights, others=total - statistics[b], x_energy=statistics[b].x_energy)
                total, statistics[b] = total - statistics[b] + new, new
            scale = self._update_dictionary(model, total)
            posterior.rescale_latents(scale)
            statistics = [s.rescaled(scale, degree) for s in statistics]
        total = self._total(statistics)
        n, D = x.shape
        model.set_noise_and_prior_scale((total.residual(model.W.detach()) / (n * D)).to(x.dtype), (total.prior / n).to(x.dtype))

    def run_epoch(self, problem: Problem, weights) -> None:
        n = problem.x.shape[0]
        if self.statistics == "full":
            objective = AnalyticELBO()
            if self.e_step_objective == "entropy":
                self.entropy_em_iterations(problem, weights, self.em_iterations_per_epoch)
                return
            for _ in range(self.em_iterations_per_epoch):
                self._fix_noise_and_prior_scale(problem)
                for index in self._blocks(n, self.block_size(problem.x), problem.x.device):
                    if self.fresh_posterior:
                        problem.posterior.reset_block(index, self.fresh_std)
                    self.e_step(problem, index, objective, weights)
                self.closed_form_m_step(problem)
            return
        objective = EntropyELBO()
        for index in self._blocks(n, self.batch_size, problem.x.device):
            if self.fresh_posterior:
                problem.posterior.reset_block(index, self.fresh_std)
            self.e_step(problem, index, objective, weights)
            if self.m_step == "gradient":
                self.gradient_m_step(problem, index, objective, weights)
        if self.m_step == "closed_form":
            self.closed_form_m_step(problem)

    def fit(self, problem: Problem, evaluate: Evaluate, checkpoint: Checkpoint | None = None, state: dict | None = None) -> FitOutcome:
        """Train; after each completed epoch ``checkpoint(epoch, trainer_state)`` (if given) receives what
        is needed to continue exactly (the posteriors and W live in the problem's modules)."""
        state = state or {}
        stopwatch = Stopwatch(total=state.get("train_time", 0.0))
        previous = state.get("previous")
        final_annealed_epoch = problem.annealing.final_epoch()
        outcome = None
        if not state and self.initial_means == "least_squares":
            with stopwatch:
                self.initialise_means(problem)
        for epoch in range(state.get("epoch", -1) + 1, self.max_epochs):
            weights = problem.annealing(epoch)
            with stopwatch:
                self.run_epoch(problem, weights)
                if problem.x.is_cuda:
                    torch.cuda.synchronize()
            value = evaluate(epoch, weights, stopwatch.total)
            current = float(value.elbo)
            if (
                self.relative_tolerance > 0
                and epoch >= final_annealed_epoch
                and previous is not None
                and abs(current - previous) / max(1.0, abs(current)) < self.relative_tolerance
            ):
                outcome = FitOutcome(epoch + 1, True, "converged", stopwatch.total)
            previous = current
            if checkpoint is not None:
                checkpoint(epoch, {"epoch": epoch, "previous": previous, "train_time": stopwatch.total, "outcome": outcome})
            if outcome is not None:
                return outcome
        return state.get("outcome") or FitOutcome(self.max_epochs, False, "max_epochs", stopwatch.total)
