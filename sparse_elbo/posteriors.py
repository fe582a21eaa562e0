"""Per-data-point variational posteriors (docs/design.md §5), gathered by data index.

``posterior(index)`` returns the Gaussians ``q_n`` of the data points ``index`` (all when None).
Standard deviations and the diagonal of ``L`` are stored as logs so that they stay positive.
Every parameter has the data index as its first axis, so that a trainer can optimise a block of
data points on its own: ``block = posterior.block_parameters(index)`` gives detached leaf copies,
``posterior.gaussian(block)`` the Gaussians they define, ``posterior.write_block(index, block)``
stores them back. The authors' E-step instead optimises the scale itself as a free signed number
(``fresh_signed_block``, ``signed_gaussian``, ``write_signed_block``; docs/design.md §7.4): the same
Gaussians, another path for L-BFGS.

``moments_with_pullback(gram)`` gives what the entropy ELBO needs from every q_n — marginal variances,
``tr(G Σ_n)`` and entropies — together with their hand-written chain rule (the objective's closed-form
gradient, ``objectives.EntropyELBO.value_and_gradient``), so that training does not pay for an autograd
graph over the (N,H,H) covariance factors.

Like the amortised posterior (``encoders.py``), every posterior answers ``q(x, index)`` — here ``x`` is
not needed — and ``per_data_point(x)``: a fresh posterior of the same family for new data ``x``
(held-out evaluation). Sizes are passed at the instantiate call; ``n_observed`` is accepted for
uniformity with the encoder and not used.
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from sparse_elbo import closed_forms
from sparse_elbo.gaussians import DiagonalGaussian, FullGaussian
from sparse_elbo.validation import invalid

# pullback(grad_variance (N,H), grad_trace: a 0-dim tensor shared by every point, grad_entropy a float)
#   -> ({parameter name: gradient} for every parameter except the mean, grad_gram (H,H))
# (The entropy ELBO's weight on tr(G Σ_n), -c/(2σ²*), is the same for every data point.)
Pullback = Callable[[torch.Tensor, torch.Tensor, float], tuple[dict[str, torch.Tensor], torch.Tensor]]


class Posterior(nn.Module, metaclass=ABCMeta):
    """The contract of a posterior family (per data point here, amortised in ``encoders.py``), and its
    capabilities as data: its ``family`` name (``posterior=<family>``), whether it is amortised (trainers
    declare which kinds they train), ``closed_form_moments`` (it gives ``moments_with_pullback``, the entropy
    objective's closed-form gradient; otherwise autograd), ``features`` (what some trainers need beyond the
    contract: ``signed_blocks`` for the authors' signed-scale E-step). Besides: the numbers it will hold (known
    before it is built, for the memory check), the Gaussians of data points ``index`` of ``x``, a fresh
    per-data-point posterior of the family for new data, and the arrays the results file stores. A family's
    fast paths that also depend on the prior (a fused E-step kernel, a fixed-dictionary fit) are registered
    by (family, prior) in ``sparse_elbo/inference/registry.py``."""

    family: ClassVar[str]
    amortized: ClassVar[bool] = False
    closed_form_moments: ClassVar[bool] = False
    features: ClassVar[frozenset[str]] = frozenset()

    @staticmethod
    @abstractmethod
    def parameter_count(n_data: int, n_latents: int, **settings) -> int:
        """The number of parameters the family holds for ``n_data`` points and ``n_latents`` latents."""

    @abstractmethod
    def q(self, x: torch.Tensor | None = None, index: torch.Tensor | None = None):
        """The Gaussians of the data points ``index`` (all when None) of data ``x``."""

    @abstractmethod
    def per_data_point(self, x: torch.Tensor) -> nn.Module:
        """A per-data-point posterior of the data ``x`` started from this one's Gaussians."""

    @abstractmethod
    def state_arrays(self) -> dict[str, torch.Tensor]:
        """What the results file stores of the posterior: ``{name: array}``."""

    @classmethod
    def kind(cls) -> str:
        """``amortized`` or ``per_data_point``: what trainers' capabilities list."""
        return "amortized" if cls.amortized else "per_data_point"


def _check_sizes(n_data: int, n_latents: int, init_std: float) -> None:
    if n_data < 1:
        raise invalid("n_data", f"must be >= 1, got {n_data}")
    if n_latents < 1:
        raise invalid("n_latents", f"must be >= 1, got {n_latents}")
    if not init_std > 0:
        raise invalid("init_std", f"must be > 0, got {init_std}")


def _positive_scale(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``scale`` (H,) checked positive, in the dtype of the parameters it rescales: an in-place product of a
    float32 (N,H) array with a float64 scale is computed through a float64 temporary of the array's size."""
    if not bool((scale > 0).all()):
        raise ValueError("rescale_latents needs positive scales (a sign flip is not a rescaling)")
    return scale.to(like.dtype)


class PerDataPointPosterior(Posterior):
    """Parameters per data point (data index first), with the block handling every trainer that fits
    blocks of points uses; a family defines ``gaussian(params)`` (a Gaussian batch, ``gaussians.py``) and
    ``initial_value(name, n, std)``, and holds a parameter ``mean`` (N,H). A family whose parameters the
    gauge change ``z_h → c_h z_h`` maps to parameters of the same family defines ``rescale_latents`` (EM's
    M-step needs it)."""

    def q(self, x: torch.Tensor | None = None, index: torch.Tensor | None = None):
        """The posteriors of data points ``index`` (all when None); ``x`` is not needed."""
        return self(index)

    def state_rows(self, index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        """``state_arrays``' rows of the data points ``index`` (the results file takes them in blocks). This default
        makes every row's arrays for each block; a family overrides it with its rows alone (as both shipped ones do)."""
        return {name: value[index] for name, value in self.state_arrays().items()}

    def per_data_point(self, x: torch.Tensor) -> PerDataPointPosterior:
        """A fresh posterior of this family for the data points of ``x`` (N,D), on x's device and dtype."""
        return type(self)(n_data=x.shape[0], n_latents=self.n_latents, init_std=self.init_std).to(x)

    def forward(self, index: torch.Tensor | None = None):
        params = dict(self.named_parameters())
        if index is not None:
            params = {name: value[index] for name, value in params.items()}
        return self.gaussian(params)

    def block_parameters(self, index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Detached leaf copies of the parameters of data points ``index`` (all when None)."""
        return {
            name: (value if index is None else value[index]).detach().clone().requires_grad_(True)
            for name, value in self.named_parameters()
        }

    @torch.no_grad()
    def write_block(self, index: torch.Tensor | None, block: dict[str, torch.Tensor]) -> None:
        for name, value in self.named_parameters():
            if index is None:
                value.copy_(block[name])
            else:
                value[index] = block[name].to(value.dtype)

    @torch.no_grad()
    def reset_block(self, index: torch.Tensor, std: float | None = None) -> None:
        """Re-initialise the posteriors of data points ``index`` (a fresh q, as the authors' E-step):
        zero means and ``Σ = s² I`` with ``s = std`` (default: ``init_std``)."""
        for name, value in self.named_parameters():
            value[index] = self.initial_value(name, len(index), std).to(value)


class DiagonalPosterior(PerDataPointPosterior):
    """``q_n(z) = N(μ_n, diag(s_n²))``.  Parameters: mean (N,H), log_std (N,H)."""

    family = "diag"
    closed_form_moments = True
    features = frozenset({"signed_blocks"})

    @staticmethod
    def parameter_count(n_data: int, n_latents: int, **settings) -> int:
        """Numbers the posterior holds, known before it is built: means and log-stds."""
        return 2 * n_data * n_latents

    def __init__(self, n_data: int, n_latents: int, init_std: float = 0.1, n_observed: int | None = None):
        super().__init__()
        _check_sizes(n_data, n_latents, init_std)
        self.n_data, self.n_latents = n_data, n_latents
        self.init_std = float(init_std)
        self.mean = nn.Parameter(self.initial_value("mean", n_data))  # (N,H)
        self.log_std = nn.Parameter(self.initial_value("log_std", n_data))  # (N,H)

    def initial_value(self, name: str, n: int, std: float | None = None) -> torch.Tensor:
        if name == "mean":
            return torch.zeros(n, self.n_latents)
        return torch.full((n, self.n_latents), math.log(std or self.init_std))

    def gaussian(self, params: dict[str, torch.Tensor]) -> DiagonalGaussian:
        return DiagonalGaussian(params["mean"], params["log_std"].exp(), params["log_std"])

    def fresh_signed_block(self, n: int, std: float) -> dict[str, torch.Tensor]:
        """Leaves of a fresh q for ``n`` points with the std as a free signed number: ``μ = 0``, ``s = std``."""
        return {"mean": self.mean.new_zeros(n, self.n_latents), "std": self.mean.new_full((n, self.n_latents), std)}

    def signed_gaussian(self, block: dict[str, torch.Tensor]) -> DiagonalGaussian:
        """``N(μ, diag(s²))`` for signed ``s`` (N,H): ``|s|`` is the std, ``log|s|`` its log."""
        std = block["std"].abs()
        return DiagonalGaussian(block["mean"], std, torch.log(std))

    def write_signed_block(self, index: torch.Tensor, block: dict[str, torch.Tensor]) -> None:
        self.write_block(index, {"mean": block["mean"], "log_std": torch.log(block["std"].abs())})

    @torch.no_grad()
    def rescale_latents(self, scale: torch.Tensor) -> None:
        """``z_h → c_h z_h`` (the gauge change that accompanies ``W_h → W_h / c_h``); scale (H,) > 0."""
        scale = _positive_scale(scale, self.mean)
        self.mean.mul_(scale)
        self.log_std.add_(torch.log(scale))

    @torch.no_grad()
    def moments_with_pullback(self, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Pullback]:
        """``s²`` (N,H), ``tr(G Σ_n) = Σ_h s_h² G_hh`` (N,), ``H[q_n]`` (N,) and their pullback:

        ∂/∂log s_h = 2 s_h² (ḡ_var,h + ḡ_tr G_hh) + ḡ_ent,     ∂/∂G = ḡ_tr diag(Σ_n s_n²)
        """
        variance = torch.exp(2.0 * self.log_std)  # (N,H)
        gram_diag = torch.diagonal(gram)  # (H,)
        trace = variance @ gram_diag  # (N,)
        entropy = closed_forms.gaussian_entropy_from_log_diag(self.log_std)  # (N,)

        def pullback(grad_variance, grad_trace, grad_entropy):
            grad_log_std = 2.0 * variance * (grad_variance + grad_trace * gram_diag) + grad_entropy
            return {"log_std": grad_log_std}, grad_trace * torch.diag(variance.sum(0))

        return variance, trace, entropy, pullback

    @torch.no_grad()
    def set_std(self, std: torch.Tensor) -> None:
        self.log_std.copy_(torch.log(std))

    def state_arrays(self) -> dict[str, torch.Tensor]:
        return self.state_rows(slice(None))

    def state_rows(self, index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.detach()[index], "std": self.log_std.detach()[index].exp()}


class FullCovariancePosterior(PerDataPointPosterior):
    """``q_n(z) = N(μ_n, L_n L_nᵀ)``.  Parameters: mean (N,H), the strictly lower part of L packed
    row by row (N, H(H-1)/2), and the log of L's diagonal (N,H)."""

    family = "full"
    closed_form_moments = True
    features = frozenset({"signed_blocks"})

    @staticmethod
    def parameter_count(n_data: int, n_latents: int, **settings) -> int:
        """Numbers the posterior holds, known before it is built: means and the N lower-triangular factors."""
        return n_data * (n_latents + n_latents * (n_latents + 1) // 2)

    def __init__(self, n_data: int, n_latents: int, init_std: float = 0.1, n_observed: int | None = None):
        super().__init__()
        _check_sizes(n_data, n_latents, init_std)
        self.n_data, self.n_latents = n_data, n_latents
        self.init_std = float(init_std)
        rows, cols = torch.tril_indices(n_latents, n_latents, offset=-1)
        self.n_lower = rows.numel()
        self.mean = nn.Parameter(self.initial_value("mean", n_data))  # (N,H)
        self.lower = nn.Parameter(self.initial_value("lower", n_data))  # (N,H(H-1)/2)
        self.log_diag = nn.Parameter(self.initial_value("log_diag", n_data))  # (N,H)
        diag = torch.arange(n_latents)
        # positions in the flattened (H*H) matrix of [packed strict-lower entries, diagonal entries]
        self.register_buffer("flat_index", torch.cat([rows * n_latents + cols, diag * n_latents + diag]), persistent=False)
        self.register_buffer("lower_rows", rows, persistent=False)
        self.register_buffer("lower_cols", cols, persistent=False)
        # the same values' positions in the flattened transpose U = Lᵀ (rows of U are columns of L)
        self.register_buffer(
            "flat_index_transposed", torch.cat([cols * n_latents + rows, diag * n_latents + diag]), persistent=False
        )

    def initial_value(self, name: str, n: int, std: float | None = None) -> torch.Tensor:
        if name == "mean":
            return torch.zeros(n, self.n_latents)
        if name == "lower":
            return torch.zeros(n, self.n_lower)
        return torch.full((n, self.n_latents), math.log(std or self.init_std))

    def _scale_tril(self, lower: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
        """lower (N,P), diag (N,H)  ->  L (N,H,H)"""
        H = self.n_latents
        values = torch.cat([lower, diag], dim=-1)  # (N,P+H)
        flat = values.new_zeros(values.shape[0], H * H).index_copy(1, self.flat_index, values)
        return flat.view(-1, H, H)

    @torch.no_grad()
    def moments_with_pullback(self, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Pullback]:
        """Marginal variances, ``tr(G Σ_n)`` and entropies of every q_n, and their pullback.

        With ``U_n = L_nᵀ`` (N,H,H), whose rows ``u_j`` are the columns of ``L_n``:

            Σ_hh = Σ_j U_jh²,     tr(G Σ_n) = Σ_j u_jᵀ G u_j,     H[q_n] = (H/2) log(2πe) + Σ_h log L_hh
            ∂/∂U_n = 2 (ḡ_tr U_n G + U_n diag(ḡ_var,n)),         ∂/∂G = ḡ_tr Σ_n Σ_n = ḡ_tr Σ_rows u uᵀ

        then gathered back to the stored strict-lower entries and log-diagonal
        (``∂/∂log L_hh = L_hh ∂/∂L_hh + ḡ_ent``).
        One (NH,H)x(H,H) product and a few elementwise passes: no batched small matrix products.
        """
        N, H = self.mean.shape
        diag = self.log_diag.exp()  # (N,H)
        values = torch.cat([self.lower, diag], dim=-1)  # (N,P+H)
        U = values.new_zeros(N, H * H).index_copy_(1, self.flat_index_transposed, values).view(N, H, H)
        UG = (U.view(N * H, H) @ gram).view(N, H, H)  # row j: u_jᵀ G
        trace = (UG * U).sum((-2, -1))  # (N,)
        variance = U.pow(2).sum(-2)  # (N,H)
        entropy = closed_forms.gaussian_entropy_from_log_diag(self.log_diag)  # (N,)

        def pullback(grad_variance, grad_trace, grad_entropy):
            grad_U = torch.addcmul(UG * (2.0 * grad_trace), U, 2.0 * grad_variance[:, None, :])  # (N,H,H)
            rows = U.view(N * H, H)
            grad_gram = grad_trace * (rows.T @ rows)  # (H,H)
            packed = torch.gather(grad_U.view(N, H * H), 1, self.flat_index_transposed.expand(N, -1))  # (N,P+H)
            return {"lower": packed[:, : self.n_lower], "log_diag": packed[:, self.n_lower :] * diag + grad_entropy}, grad_gram

        return variance, trace, entropy, pullback

    def scale_tril(self, index: torch.Tensor | None = None) -> torch.Tensor:
        return self(index).scale_tril

    def gaussian(self, params: dict[str, torch.Tensor]) -> FullGaussian:
        return FullGaussian(params["mean"], self._scale_tril(params["lower"], params["log_diag"].exp()), params["log_diag"])

    def fresh_signed_block(self, n: int, std: float) -> dict[str, torch.Tensor]:
        """Leaves of a fresh q for ``n`` points with L's diagonal as free signed numbers: ``μ = 0``, ``L = std·I``."""
        new = self.mean.new_zeros
        return {
            "mean": new(n, self.n_latents),
            "lower": new(n, self.n_lower),
            "diag": self.mean.new_full((n, self.n_latents), std),
        }

    def signed_gaussian(self, block: dict[str, torch.Tensor]) -> FullGaussian:
        """``N(μ, L Lᵀ)`` for L with a signed diagonal: ``H[q] = (H/2) log(2πe) + Σ_h log|L_hh|``."""
        log_diag = torch.log(block["diag"].abs())
        return FullGaussian(block["mean"], self._scale_tril(block["lower"], block["diag"]), log_diag)

    def write_signed_block(self, index: torch.Tensor, block: dict[str, torch.Tensor]) -> None:
        """Store ``L diag(sign L_hh)`` (the same ``L Lᵀ``, a positive diagonal)."""
        sign = torch.where(block["diag"] < 0, -1.0, 1.0).to(block["diag"])  # (N,H)
        lower = block["lower"] * sign[:, self.lower_cols]  # column j of L flips with L_jj
        self.write_block(index, {"mean": block["mean"], "lower": lower, "log_diag": torch.log(block["diag"].abs())})

    @torch.no_grad()
    def rescale_latents(self, scale: torch.Tensor) -> None:
        """``z → diag(c) z``: row h of L scales by c_h; scale (H,) > 0."""
        scale = _positive_scale(scale, self.mean)
        self.mean.mul_(scale)
        self.lower.mul_(scale[self.lower_rows])
        self.log_diag.add_(torch.log(scale))

    @torch.no_grad()
    def set_scale_tril(self, scale_tril: torch.Tensor) -> None:
        """Set L (N,H,H) (lower triangular, positive diagonal)."""
        rows, cols = torch.tril_indices(self.n_latents, self.n_latents, offset=-1, device=scale_tril.device)
        self.lower.copy_(scale_tril[:, rows, cols])
        self.log_diag.copy_(torch.log(torch.diagonal(scale_tril, dim1=-2, dim2=-1)))

    def state_arrays(self) -> dict[str, torch.Tensor]:
        return self.state_rows(slice(None))

    def state_rows(self, index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        rows = self.gaussian({name: value.detach()[index] for name, value in self.named_parameters()})
        return {"mean": rows.mean, "scale_tril": rows.scale_tril}
