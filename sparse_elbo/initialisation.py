"""Starting dictionaries for a trainer (``trainer.initialisation``).

``SparseCodingDictionary`` is MAP sparse coding with an L1 penalty (Olshausen & Field; the method of
optimal directions of Engan et al. 1999 for the dictionary), used only to find where to start:

    min_{W, S}  ½ Σ_n ||x_n - W s_n||² + α Σ_n ||s_n||₁,   ||W_h|| = 1,

alternating ``code_iterations`` FISTA steps on every code (Beck & Teboulle 2009; step 1/L with L the
largest eigenvalue of WᵀW, warm-started) with the least-squares dictionary
``W = (Σ_n x_n s_nᵀ)(Σ_n s_n s_nᵀ)⁻¹`` and renormalised columns, for ``iterations`` rounds. An atom that
no code uses any more is restarted at a random data point.

The penalty is set relative to the data's scale: ``α = sparsity · sqrt(mean_n ||x_n||² / H)``, the size
of one code entry if the data's energy were shared evenly by H unit-norm atoms.

Why: on the default bars (rank 9 with 10 bars, Laplace sources, σ = 0.1) joint L-BFGS from a random
dictionary needs thousands of iterations before the bars appear, because only the prior's weak sparsity
decides which 10 vectors of the 9-dimensional signal subspace they are. A strong L1 penalty makes that
decision at once: the start already lies close to the bars (docs/design.md §7.2).
"""

from __future__ import annotations

from typing import Protocol

import torch

from sparse_elbo import parallel
from sparse_elbo.problem import Problem
from sparse_elbo.validation import require_at_least, require_positive


class DictionaryStart(Protocol):
    """A starting dictionary: ``start(x (N,D), W (D,H) the model's own start, generator) -> W (D,H)``;
    ``holds_all_rows``: it reads every row of x at once (a run whose data stay in their file refuses it)."""

    holds_all_rows: bool

    def __call__(self, x: torch.Tensor, W: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...


@torch.no_grad()
def start_dictionary(initialisation, problem: Problem) -> None:
    """Set the model's W to ``initialisation(x, W, generator)`` of the model's own start (generator seeded
    with the run's seed); an initialisation that returns the model's own W leaves it bit for bit."""
    generator = torch.Generator(device=problem.x.device).manual_seed(problem.seed)
    own = problem.model.W
    start = initialisation(problem.x, own, generator)
    if start is not own:
        problem.model.set_dictionary(start)


def _rows(x: torch.Tensor, places: torch.Tensor | None, picks: torch.Tensor) -> torch.Tensor:
    """The rows ``picks`` (places in the working set over every rank) of the working data  ->  (P,D), on every
    rank: the rank that holds a row contributes it, the others zeros, and the sum is all-reduced."""
    if places is None:
        return x[picks]
    match = (picks[:, None] == places[None, :]).to(x.dtype)  # (P, n_local)
    return parallel.summed(match @ x)[0].to(x.dtype)


class RandomDictionary:
    """Keep the model's own start (random unit-norm columns, or ``model.init_dictionary``)."""

    holds_all_rows = False  # it reads no data

    def __call__(self, x: torch.Tensor, W: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return W


class SparseCodingDictionary:
    """MAP L1 sparse coding (FISTA codes, least-squares dictionary) from the model's start; see the module."""

    def __init__(self, sparsity: float = 0.8, iterations: int = 100, code_iterations: int = 10, n_points: int | None = None):
        require_at_least(1, iterations=iterations, code_iterations=code_iterations)
        require_at_least(1, n_points=n_points)
        require_positive(sparsity=sparsity)
        self.sparsity = float(sparsity)
        self.iterations = int(iterations)
        self.code_iterations = int(code_iterations)
        self.n_points = None if n_points is None else int(n_points)

    @property
    def holds_all_rows(self) -> bool:
        """Whether it learns from every data point at once (all of them in memory)."""
        return self.n_points is None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, W: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x (N,D), W (D,H) the model's start  ->  W (D,H) with unit-norm columns, learned from all of x or from
        ``n_points`` of its rows drawn at random (``generator``) when x has more. Data-parallel, x is this rank's
        shard: the rows are drawn from the whole data set, and the sums the dictionary needs are all-reduced."""
        x, positions, n = self._working_set(x, generator)  # (n_local,D); their places in the working set
        H = W.shape[1]
        penalty = self.sparsity * (parallel.mean(x.pow(2).sum(-1), n) / H).sqrt()  # α ()
        W = W / W.norm(dim=0).clamp_min(torch.finfo(x.dtype).tiny)
        codes = x.new_zeros(x.shape[0], H)  # S (N,H)
        for _ in range(self.iterations):
            codes = self._codes(x, W, codes, penalty)
            sums = parallel.summed(torch.linalg.vector_norm(codes, 1, dim=0), codes.T @ codes, codes.T @ x)
            usage, second_moment, cross = (part.to(x.dtype) for part in sums)  # Σ|s_nh| (H,), Σ s sᵀ (H,H), Σ s xᵀ (H,D)
            ridge = 1e-10 * second_moment.diagonal().max().clamp_min(1.0)
            W = torch.linalg.solve(second_moment + ridge * torch.eye(H, dtype=x.dtype, device=x.device), cross).T
            norms = W.norm(dim=0)  # (H,)
            unused = (usage == 0) | (norms == 0)
            if bool(unused.any()):  # restart dead atoms at random data points
                picks = torch.randint(n, (int(unused.sum()),), generator=generator, device=generator.device).to(x.device)
                W[:, unused] = _rows(x, positions, picks).T
                norms = W.norm(dim=0)
                codes[:, unused] = 0.0
            W = W / norms
            codes.mul_(norms)  # the same product W S at the new column scale (codes is this loop's own array)
        return W

    def _working_set(self, x: torch.Tensor, generator: torch.Generator):
        """The rows to learn from: all, or ``n_points`` drawn at random; with their places in that set over
        every rank (None in one process: the rows are the set) and its size."""
        n_all = parallel.count(x.shape[0])
        rows = None
        if self.n_points is not None and self.n_points < n_all:
            rows = torch.randperm(n_all, generator=generator, device=generator.device)[: self.n_points]
        if parallel.sharing() is None:
            return (x if rows is None else x[rows.to(x.device)]), None, x.shape[0] if rows is None else len(rows)
        start = parallel.sharing().shard(n_all).start
        if rows is None:
            return x, start + torch.arange(x.shape[0], device=x.device), n_all
        places, local = parallel.held(rows.cpu(), x.shape[0])
        return x[local.to(x.device)], places.to(x.device), len(rows)

    def _codes(self, x: torch.Tensor, W: torch.Tensor, codes: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
        """FISTA on ½||x_n - W s_n||² + α||s_n||₁ for every n, warm-started at ``codes`` (N,H).

        A step from the momentum point m: ``z = m - (m G - Wᵀx)/L``, ``s = z - clamp(z, -α/L, α/L)`` (the
        soft threshold), ``m = s + c (s - s_previous)``. Every (N,H) array is written in place into one of
        four buffers: a step allocates nothing, where fresh arrays of this size cost the kernel a page
        fault per page on every allocation."""
        gram = W.T @ W  # G (H,H)
        lipschitz = float(torch.linalg.eigvalsh(gram)[-1])  # L, read once per call (addmm takes a number)
        threshold = penalty / lipschitz  # α/L ()
        scaled_projection = (x @ W).div_(lipschitz)  # Wᵀx_n / L (N,H)
        momentum_point, previous = codes.clone(), codes  # m, s_previous (N,H)
        current, clamped = torch.empty_like(codes), torch.empty_like(codes)  # s, clamp(z) (N,H)
        t = 1.0
        for _ in range(self.code_iterations):
            torch.addmm(scaled_projection, momentum_point, gram, alpha=-1.0 / lipschitz, out=current).add_(momentum_point)
            current.sub_(torch.clamp(current, -threshold, threshold, out=clamped))
            t_next = 0.5 * (1.0 + (1.0 + 4.0 * t * t) ** 0.5)
            torch.sub(current, previous, out=momentum_point).mul_((t - 1.0) / t_next).add_(current)
            if previous is codes:  # the warm start is the caller's; from here on the buffers rotate
                previous = torch.empty_like(codes)
            previous, current, t = current, previous, t_next
        return previous
