"""Variational EM (SPEC §6): E-steps on the per-data-point posteriors, M-steps on the dictionary.

One EM iteration, ``statistics="full"`` (default, SPEC §4): with ``σ², λ`` fixed at their full-data optima
``σ²*, λ*``, the E-step maximises the (annealing-weighted) analytic ELBO over every ``q_n`` — the
problem separates across data points, so blocks of ``e_step_block_size`` points (the whole data set
where memory allows) are optimised at once with L-BFGS on the block's summed objective. Diagonal
posteriors under the Laplace prior use the fused value-and-gradient of ``trainers/e_step.py``
(``fused_e_step=True``, default), which never forms an (N,D) array; other cases use autograd. Then the
M-step for ``W``:

- ``closed_form`` (default): for fixed ``q`` the expected log-likelihood is quadratic in ``W``, maximised by

      W = (Σ_n x_n μ_nᵀ) (Σ_n μ_n μ_nᵀ + Σ_n)⁻¹,

  followed by the gauge fix ``W_h → W_h / c_h``, ``z_h → c_h z_h``, ``λ_h → c_h λ_h`` (``c_h = ||W_h||``),
  which leaves the ELBO unchanged; ``σ²*, λ*`` are then recomputed in closed form. Every step is a
  coordinate ascent, so the ELBO never decreases while the annealing weights are 1.
- ``gradient``: the authors' single gradient-ascent step of size ``m_step_lr`` on the batch objective,
  after each batch, on the raw dictionary whose columns the unit-norm gauge normalises when used.

``e_step_objective="entropy"`` makes the E-step maximise the full-data ``L_H`` itself: each block's
``q`` with every other point's ``q`` fixed, and ``σ²*, λ*`` recomputed from the current ``q`` at every
evaluation instead of held at the previous ``q``'s values. Its gradient is the analytic E-step's at the
current ``σ²*, λ*`` (envelope theorem); the difference is that ``σ²`` and the codes move together, so EM
no longer needs many iterations to walk ``σ²`` down — on natural image patches the analytic E-step often
stays in a high-noise state (σ² ≈ 0.03 against 0.012) for the rest of the run.

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

from sparse_elbo.annealing import AnnealingWeights
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
class DataSums:
    """Sums over a set of data points behind ``σ²*`` and ``λ*``: residual (scalar) = Σ_n E||x_n - W z||²,
    prior (H,) = Σ_n t_n; count = the whole data set's size N (the divisor of the means)."""

    residual: torch.Tensor
    prior: torch.Tensor
    count: int

    def __sub__(self, other: "DataSums") -> "DataSums":
        return DataSums(self.residual - other.residual, self.prior - other.prior, self.count)

    def __add__(self, other: "DataSums") -> "DataSums":
        return DataSums(self.residual + other.residual, self.prior + other.prior, self.count)


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

    # ----------------------------------------------------------------------------------- E-step
    def e_step(self, problem: Problem, index: torch.Tensor, objective, weights, others: "DataSums | None" = None) -> "DataSums | None":
        """Maximise ``objective`` summed over the data points ``index`` w.r.t. their posteriors — or, given
        ``others`` (the sums of every other data point), the full-data ``L_H`` as a function of them, and
        then return the block's own new sums."""
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
                fused = DiagonalLaplaceEntropyEStep(x, problem.model, weights, others.residual, others.prior, others.count)

            def closure():
                loss, block["mean"].grad, block["log_std"].grad = fused.loss_and_gradients(block["mean"], block["log_std"])
                return loss

            optimizer.step(closure)
            new_sums = None if others is None else DataSums(*fused.data_sums(block["mean"], block["log_std"]), others.count)
        else:
            # statistics=full: the sum over points, each point's problem independent of the block size;
            # statistics=batch: the batch mean, as the authors' closure (-elbo) — L-BFGS's first step
            # and its tolerances depend on this scale.
            scale = x.shape[0] if self.statistics == "full" else 1.0
            self._autograd_e_step(problem, x, block, optimizer, objective, weights, scale, others)
            new_sums = None if others is None else self._data_sums(problem, index, block)
        problem.posterior.write_block(index, {k: v.detach() for k, v in block.items()})
        return new_sums

    @staticmethod
    def _autograd_e_step(problem: Problem, x, block, optimizer, objective, weights, scale: float, others=None) -> None:
        model = problem.model
        model_parameters = [p for p in model.parameters() if p.requires_grad]

        def value_of(q):
            if others is None:
                return objective(x, q, model, weights)
            residual, prior_statistic = EntropyELBO().batch_statistics(x, q, model)  # (B,), (B,H)
            statistics = DataStatistics(
                (others.residual + residual.sum()) / others.count, (others.prior + prior_statistic.sum(0)) / others.count
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
        """``W = (Σ x μᵀ)(Σ μμᵀ + Σ_n)⁻¹``, then the ELBO-preserving gauge fix to unit-norm columns."""
        x, model, posterior = problem.x, problem.model, problem.posterior
        H = model.n_latents
        cross = x.new_zeros(x.shape[1], H)  # Σ x μᵀ (D,H)
        second_moment = x.new_zeros(H, H)  # Σ (μμᵀ + Σ_n) (H,H)
        for index in self._blocks(x.shape[0], self.block_size(x), x.device):
            q = posterior(index)
            cross += x[index].T @ q.mean
            second_moment += q.mean.T @ q.mean + q.covariance_sum()
        W = torch.linalg.solve(second_moment, cross.T).T  # (D,H); second_moment is symmetric
        norms = W.norm(dim=0).clamp_min(torch.finfo(W.dtype).tiny)
        model.set_dictionary(W / norms)
        posterior.rescale_latents(norms)

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

    @torch.no_grad()
    def _data_sums(self, problem: Problem, index: torch.Tensor, block: dict | None = None) -> DataSums:
        """The sums behind ``σ²*, λ*`` of the data points ``index`` (posterior parameters ``block``: the
        stored ones when None)."""
        x, n = problem.x[index], problem.x.shape[0]
        if self.fused_e_step and DiagonalLaplaceEStep.applies_to(problem.posterior, problem.model):
            block = block or problem.posterior.block_parameters(index)
            return DataSums(*DiagonalLaplaceEStep(x, problem.model, AnnealingWeights()).data_sums(block["mean"], block["log_std"]), n)
        q = problem.q(index) if block is None else problem.posterior.gaussian(block)
        residual, prior_statistic = EntropyELBO().batch_statistics(x, q, problem.model)
        return DataSums(residual.sum(dtype=torch.float64), prior_statistic.sum(0, dtype=torch.float64), n)

    def entropy_e_step_pass(self, problem: Problem, weights) -> None:
        """One E-step pass on the full-data ``L_H``: each block's ``q`` maximises ``L_H`` with every other
        point's ``q`` fixed, so ``σ²*, λ*`` move with it (the analytic E-step holds them at the previous
        ``q``'s values, and ``σ²`` then needs many EM iterations to follow ``q``). Ends with the model's
        ``σ², λ`` at the exact full-data optima."""
        n = problem.x.shape[0]
        blocks = self._blocks(n, self.block_size(problem.x), problem.x.device)
        sums = [self._data_sums(problem, index) for index in blocks]
        total = sum(sums[1:], sums[0])
        for b, index in enumerate(blocks):
            if self.fresh_posterior:
                problem.posterior.reset_block(index, self.fresh_std)
            new = self.e_step(problem, index, None, weights, others=total - sums[b])
            total, sums[b] = total - sums[b] + new, new
        dtype = problem.x.dtype
        problem.model.set_noise_and_prior_scale((total.residual / (n * problem.x.shape[1])).to(dtype), (total.prior / n).to(dtype))

    def run_epoch(self, problem: Problem, weights) -> None:
        n = problem.x.shape[0]
        if self.statistics == "full":
            objective = AnalyticELBO()
            for _ in range(self.em_iterations_per_epoch):
                if self.e_step_objective == "entropy":
                    self.entropy_e_step_pass(problem, weights)
                else:
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
