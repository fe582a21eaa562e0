"""Per-data-point variational posteriors (SPEC §5), gathered by data index.

``posterior(index)`` returns the Gaussians ``q_n`` of the data points ``index`` (all when None).
Standard deviations and the diagonal of ``L`` are stored as logs so that they stay positive.
"""

from __future__ import annotations

import torch
from torch import nn

from sparse_elbo.gaussians import DiagonalGaussian, FullGaussian


def _check_sizes(n_data: int, n_latents: int, init_std: float) -> None:
    if n_data < 1:
        raise ValueError(f"posterior: n_data must be >= 1, got {n_data}")
    if n_latents < 1:
        raise ValueError(f"n_latents must be >= 1, got {n_latents}")
    if not init_std > 0:
        raise ValueError(f"posterior.init_std must be > 0, got {init_std}")


class DiagonalPosterior(nn.Module):
    """``q_n(z) = N(μ_n, diag(s_n²))``.  Parameters: mean (N,H), log_std (N,H)."""

    family = "diag"

    def __init__(self, n_data: int, n_latents: int, init_std: float = 0.1):
        super().__init__()
        _check_sizes(n_data, n_latents, init_std)
        self.n_data, self.n_latents = n_data, n_latents
        self.mean = nn.Parameter(torch.zeros(n_data, n_latents))
        self.log_std = nn.Parameter(torch.full((n_data, n_latents), float(torch.log(torch.tensor(init_std)))))

    def forward(self, index: torch.Tensor | None = None) -> DiagonalGaussian:
        mean = self.mean if index is None else self.mean[index]  # (N,H)
        log_std = self.log_std if index is None else self.log_std[index]  # (N,H)
        return DiagonalGaussian(mean, log_std.exp(), log_std)

    @torch.no_grad()
    def rescale_latents(self, scale: torch.Tensor) -> None:
        """``z_h → c_h z_h`` (the gauge change that accompanies ``W_h → W_h / c_h``); scale (H,)."""
        self.mean.mul_(scale)
        self.log_std.add_(torch.log(scale.abs()))

    @torch.no_grad()
    def set_std(self, std: torch.Tensor) -> None:
        self.log_std.copy_(torch.log(std))

    def state_arrays(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.detach(), "std": self.log_std.detach().exp()}


class FullCovariancePosterior(nn.Module):
    """``q_n(z) = N(μ_n, L_n L_nᵀ)``.  Parameters: mean (N,H), the strictly lower part of L packed
    row by row (N, H(H-1)/2), and the log of L's diagonal (N,H)."""

    family = "full"

    def __init__(self, n_data: int, n_latents: int, init_std: float = 0.1):
        super().__init__()
        _check_sizes(n_data, n_latents, init_std)
        self.n_data, self.n_latents = n_data, n_latents
        rows, cols = torch.tril_indices(n_latents, n_latents, offset=-1)
        self.mean = nn.Parameter(torch.zeros(n_data, n_latents))
        self.lower = nn.Parameter(torch.zeros(n_data, rows.numel()))
        self.log_diag = nn.Parameter(torch.full((n_data, n_latents), float(torch.log(torch.tensor(init_std)))))
        diag = torch.arange(n_latents)
        # positions in the flattened (H*H) matrix of [packed strict-lower entries, diagonal entries]
        self.register_buffer("flat_index", torch.cat([rows * n_latents + cols, diag * n_latents + diag]), persistent=False)
        self.register_buffer("lower_rows", rows, persistent=False)

    def scale_tril(self, index: torch.Tensor | None = None) -> torch.Tensor:
        lower = self.lower if index is None else self.lower[index]  # (N,P)
        log_diag = self.log_diag if index is None else self.log_diag[index]  # (N,H)
        H = self.n_latents
        values = torch.cat([lower, log_diag.exp()], dim=-1)  # (N,P+H)
        flat = values.new_zeros(values.shape[0], H * H).index_copy(1, self.flat_index, values)
        return flat.view(-1, H, H)  # (N,H,H)

    def forward(self, index: torch.Tensor | None = None) -> FullGaussian:
        mean = self.mean if index is None else self.mean[index]  # (N,H)
        log_diag = self.log_diag if index is None else self.log_diag[index]  # (N,H)
        return FullGaussian(mean, self.scale_tril(index), log_diag)

    @torch.no_grad()
    def rescale_latents(self, scale: torch.Tensor) -> None:
        """``z → diag(c) z``: row h of L scales by c_h; scale (H,) positive."""
        self.mean.mul_(scale)
        self.lower.mul_(scale[self.lower_rows])
        self.log_diag.add_(torch.log(scale.abs()))

    @torch.no_grad()
    def set_scale_tril(self, scale_tril: torch.Tensor) -> None:
        """Set L (N,H,H) (lower triangular, positive diagonal)."""
        rows, cols = torch.tril_indices(self.n_latents, self.n_latents, offset=-1, device=scale_tril.device)
        self.lower.copy_(scale_tril[:, rows, cols])
        self.log_diag.copy_(torch.log(torch.diagonal(scale_tril, dim1=-2, dim2=-1)))

    def state_arrays(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.detach(), "scale_tril": self.scale_tril().detach()}
