"""Amortised posteriors (docs/design.md §5): an encoder network ``x_n → q(z|x_n) = N(μ(x_n), Σ(x_n))``.

The default trunk is the authors' ResNet-style MLP:

    h₀ = Linear(D → Hid)(x),                      Hid = hidden_width (default 2D)
    h_{b+1} = h_b + Linear(B → Hid)(a(Linear(Hid → B)(a(h_b))))      B = block_width (default 3D)
    μ = Linear(Hid → H)(a(h)),   s = softplus(Linear(Hid → H)(a(h))) + std_floor

with ``n_blocks`` residual blocks and activation ``a``. With ``compute_dtype="bfloat16"`` the trunk and the
mean and std heads run under ``torch.autocast`` (bfloat16 matrix products, float32 accumulation; the weights,
their gradients and the optimiser's state stay in the data's dtype) and their outputs are cast back before
the softplus, so every closed form of the objective sees the data's dtype. Where the hardware multiplies
bfloat16 natively (CPUs with AVX512-BF16 or AMX, GPUs of compute capability 8.0 and later) this roughly
triples the encoder's matrix rate; elsewhere bfloat16 products are emulated and far slower than float32
(docs/design.md §5). ``compute_dtype="auto"`` chooses bfloat16 for float32 data on such hardware and the
data's dtype everywhere else. The covariance head is

- ``diag``:    ``Σ = diag(s²)``                                  -> ``DiagonalGaussian``
- ``lowrank``: ``Σ = V Vᵀ + diag(s²)``, ``V = Linear(Hid → H·R)`` -> ``LowRankGaussian`` (entropy by the
  matrix determinant lemma and ``tr(WᵀWΣ) = ||WV||_F² + Σ_h s_h²||W_h||²``, no Cholesky; docs/design.md §2).

The encoder takes the data, so trainers and evaluation ask ``posterior.q(x, index)`` (through
``Problem.q``); its kind, ``amortized``, lets a trainer refuse it where it needs per-data-point
parameters (the EM E-step). ``per_data_point(x)`` gives per-data-point posteriors for ``x`` initialised at
the encoder's output (diagonal for ``diag``, full covariance ``L = chol(VVᵀ + diag(s²))`` for ``lowrank``),
for refining q per data point and measuring the amortisation gap.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.nn import functional as F

from sparse_elbo.gaussians import DiagonalGaussian, LowRankGaussian
from sparse_elbo.posteriors import DiagonalPosterior, FullCovariancePosterior, Posterior
from sparse_elbo.validation import invalid, require_at_least, require_one_of

COMPUTE_DTYPES = (None, "bfloat16", "auto")


@functools.cache
def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 in hardware: a CPU with AVX512-BF16 or AMX, a CUDA GPU of
    compute capability 8.0 or later. Elsewhere torch emulates bfloat16 products, far slower than float32.
    Asked once per device (every forward pass consults it)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


class ResidualBlock(nn.Module):
    """``h + Linear(B → Hid)(a(Linear(Hid → B)(a(h))))``."""

    def __init__(self, width: int, block_width: int, activation: nn.Module):
        super().__init__()
        self.expand = nn.Linear(width, block_width)
        self.contract = nn.Linear(block_width, width)
        self.activation = activation

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.contract(self.activation(self.expand(self.activation(h))))


class _DiagonalHead(nn.Module):
    """``Σ = diag(s²)``."""

    def __init__(self, width: int, n_latents: int, rank: int):
        super().__init__()

    def gaussian(self, mean: torch.Tensor, std: torch.Tensor, h: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(mean, std)

    @staticmethod
    def per_data_point(q: DiagonalGaussian) -> DiagonalPosterior:
        posterior = DiagonalPosterior(q.mean.shape[0], q.mean.shape[1]).to(q.mean)
        posterior.write_block(None, {"mean": q.mean, "log_std": torch.log(q.std)})
        return posterior


class _LowRankHead(nn.Module):
    """``Σ = V Vᵀ + diag(s²)`` with ``V (N,H,R)``, started small so that q starts nearly diagonal."""

    def __init__(self, width: int, n_latents: int, rank: int):
        super().__init__()
        self.n_latents, self.rank = n_latents, rank
        self.factor = nn.Linear(width, n_latents * rank)
        with torch.no_grad():
            self.factor.weight.mul_(0.1)
            self.factor.bias.zero_()

    def gaussian(self, mean: torch.Tensor, std: torch.Tensor, h: torch.Tensor) -> LowRankGaussian:
        V = self.factor(h).view(*mean.shape, self.rank)  # (N,H,R)
        return LowRankGaussian(mean, V, std)

    @staticmethod
    def per_data_point(q: LowRankGaussian) -> FullCovariancePosterior:
        covariance = q.factor @ q.factor.transpose(-1, -2) + torch.diag_embed(q.diag_std.pow(2))  # (N,H,H)
        posterior = FullCovariancePosterior(q.mean.shape[0], q.mean.shape[1]).to(q.mean)
        with torch.no_grad():
            posterior.mean.copy_(q.mean)
            posterior.set_scale_tril(torch.linalg.cholesky(covariance))
        return posterior


COVARIANCES = {"diag": _DiagonalHead, "lowrank": _LowRankHead}


class AmortizedPosterior(Posterior):
    """Encoder ``x (N,D) → q(z|x)`` (module docstring). Sizes ``n_observed`` (D) and ``n_latents`` (H) are
    passed at the instantiate call; ``n_data`` is accepted like every posterior's but not needed."""

    family = "amortized"
    amortized = True

    @staticmethod
    def parameter_count(
        n_latents: int,
        n_observed: int,
        covariance: str = "diag",
        rank: int = 2,
        hidden_width: int | None = None,
        block_width: int | None = None,
        n_blocks: int = 2,
        **settings,
    ) -> int:
        """Numbers the encoder holds, known before it is built (its weights and biases)."""
        hidden = 2 * n_observed if hidden_width is None else int(hidden_width)
        block = 3 * n_observed if block_width is None else int(block_width)
        heads = (2 + (int(rank) if covariance == "lowrank" else 0)) * (hidden + 1) * n_latents
        return (n_observed + 1) * hidden + int(n_blocks) * (2 * hidden * block + hidden + block) + heads

    def __init__(
        self,
        n_observed: int,
        n_latents: int,
        n_data: int | None = None,
        covariance: str = "diag",
        rank: int = 2,
        hidden_width: int | None = None,
        block_width: int | None = None,
        n_blocks: int = 2,
        std_floor: float = 1e-3,
        init_std: float = 0.1,
        activation: nn.Module | None = None,
        compute_dtype: str | None = None,
    ):
        super().__init__()
        require_one_of("covariance", covariance, tuple(COVARIANCES))
        require_one_of("compute_dtype", compute_dtype, tuple(COMPUTE_DTYPES))
        hidden_width = 2 * n_observed if hidden_width is None else int(hidden_width)
        block_width = 3 * n_observed if block_width is None else int(block_width)
        require_at_least(
            1,
            rank=rank,
            hidden_width=hidden_width,
            block_width=block_width,
            n_observed=n_observed,
            n_latents=n_latents,
        )
        require_at_least(0, n_blocks=n_blocks, std_floor=std_floor)
        if not init_std > std_floor:
            raise invalid("init_std", f"must be > std_floor={std_floor}, got {init_std}")
        self.n_observed, self.n_latents = int(n_observed), int(n_latents)
        self.covariance, self.rank, self.std_floor = covariance, int(rank), float(std_floor)
        self.compute_dtype = compute_dtype
        self.activation = activation if activation is not None else nn.ReLU()
        self.input = nn.Linear(self.n_observed, hidden_width)
        self.blocks = nn.Sequential(*[ResidualBlock(hidden_width, block_width, self.activation) for _ in range(int(n_blocks))])
        self.mean_head = nn.Linear(hidden_width, self.n_latents)
        self.std_head = nn.Linear(hidden_width, self.n_latents)
        self.head = COVARIANCES[covariance](hidden_width, self.n_latents, self.rank)
        with torch.no_grad():  # s = init_std (approximately) at the start: softplus(b) = init_std - floor
            self.std_head.weight.mul_(0.1)
            self.std_head.bias.fill_(math.log(math.expm1(init_std - std_floor)))

    def matmul_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype of the encoder's matrix products for the data ``x``: bfloat16 (under autocast) or x's own."""
        bfloat16 = self.compute_dtype == "bfloat16" or (
            self.compute_dtype == "auto" and x.dtype == torch.float32 and native_bfloat16(x.device)
        )
        return torch.bfloat16 if bfloat16 else x.dtype

    def forward(self, x: torch.Tensor):
        """x (N,D)  ->  a Gaussian batch of N posteriors."""
        dtype = self.matmul_dtype(x)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != x.dtype):
            h = self.activation(self.blocks(self.input(x)))  # (N,Hid)
            mean, std_input = self.mean_head(h), self.std_head(h)  # (N,H), (N,H)
        h, mean, std_input = h.to(x.dtype), mean.to(x.dtype), std_input.to(x.dtype)
        std = F.softplus(std_input) + self.std_floor  # (N,H)
        return self.head.gaussian(mean, std, h)

    def q(self, x: torch.Tensor, index: torch.Tensor | None = None):
        """The posteriors of data points ``index`` of ``x`` (all when None)."""
        return self(x if index is None else x[index])

    @torch.no_grad()
    def per_data_point(self, x: torch.Tensor) -> nn.Module:
        """Per-data-point posteriors for ``x`` initialised at the encoder's output (for refinement)."""
        return self.head.per_data_point(self(x))

    def state_arrays(self) -> dict[str, torch.Tensor]:
        """The encoder's weights (``/final/posterior`` in results), names with ``.`` as ``_``."""
        return {name.replace(".", "_"): value.detach() for name, value in self.named_parameters()}
