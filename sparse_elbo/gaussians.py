"""Gaussian posterior batches ``q_n(z) = N(μ_n, Σ_n)``: the quantities the objectives need.

Each class holds one minibatch of per-data-point Gaussians and exposes
``mean (N,H)``, ``variance (N,H)`` (marginal ``Σ_n,hh``), ``entropy() (N,)``,
``trace_term(gram) (N,)`` = ``tr(G Σ_n)`` with ``G = WᵀW``, ``rsample(K) (K,N,H)`` and
``log_prob(z) (...,N)`` for samples ``z (...,N,H)`` (importance sampling). Every field has the data axis
first, so ``q[index]`` is the batch of the data points ``index``; ``diagonal`` says whether Σ_n is diagonal
(what a closed-form minibatch gradient needs), ``arrays()`` gives the arrays that describe the batch (what
``encode`` writes).

``log q(z) = -(H/2) log 2π - ½ log det Σ - ½ (z-μ)ᵀΣ⁻¹(z-μ) = H/2 - H[q] - ½ (z-μ)ᵀΣ⁻¹(z-μ)``, so each
class supplies only the Mahalanobis term; the log-determinant comes from its entropy.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from sparse_elbo import closed_forms, parallel


def _log_prob(q, z: torch.Tensor, mahalanobis: torch.Tensor) -> torch.Tensor:
    """``log q(z) = H/2 - H[q] - ½ maha``;  mahalanobis (...,N)  ->  (...,N)"""
    return 0.5 * q.mean.shape[-1] - q.entropy() - 0.5 * mahalanobis


class _Batch:
    """Indexing along the data axis, shared by the batch classes (every field has it first)."""

    def __getitem__(self, index) -> _Batch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return type(self)(**{name: None if value is None else value[index] for name, value in values.items()})


@dataclass
class DiagonalGaussian(_Batch):
    """``Σ_n = diag(s_n²)``.  mean (N,H), std (N,H)."""

    diagonal = True

    mean: torch.Tensor
    std: torch.Tensor
    log_std: torch.Tensor | None = None  # (N,H), when the std is stored as a log (exact entropy for tiny s)

    @property
    def variance(self) -> torch.Tensor:
        return self.std**2

    def entropy(self) -> torch.Tensor:
        """``(H/2) log(2πe) + Σ_h log s_h``  ->  (N,)"""
        log_std = self.log_std if self.log_std is not None else torch.log(self.std)
        return closed_forms.gaussian_entropy_from_log_diag(log_std)

    def covariance_sum(self) -> torch.Tensor:
        """``Σ_n Σ_n``  ->  (H,H)"""
        return torch.diag(self.variance.sum(0))

    def trace_term(self, gram: torch.Tensor) -> torch.Tensor:
        """``tr(G Σ) = Σ_h s_h² G_hh``;  gram (H,H)  ->  (N,)"""
        return self.variance @ torch.diagonal(gram)

    def rsample(self, n_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``z = μ + s ⊙ ε``  ->  (K,N,H)"""
        eps = parallel.batch_normal(
            (n_samples, *self.mean.shape), dtype=self.mean.dtype, device=self.mean.device, generator=generator
        )
        return self.mean + self.std * eps

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """z (...,N,H)  ->  (...,N)"""
        return _log_prob(self, z, ((z - self.mean) / self.std).pow(2).sum(-1))

    def arrays(self) -> dict[str, torch.Tensor]:
        """``mean``, ``std`` (N,H) each."""
        return {"mean": self.mean, "std": self.std}


@dataclass
class FullGaussian(_Batch):
    """``Σ_n = L_n L_nᵀ`` with lower-triangular ``L_n``.  mean (N,H), scale_tril (N,H,H)."""

    diagonal = False

    mean: torch.Tensor
    scale_tril: torch.Tensor
    log_diag: torch.Tensor | None = None  # (N,H) = log|L_hh|, when stored as a log

    @property
    def variance(self) -> torch.Tensor:
        """``Σ_hh = Σ_j L_hj²``  ->  (N,H)"""
        return self.scale_tril.pow(2).sum(-1)

    def entropy(self) -> torch.Tensor:
        """``(H/2) log(2πe) + Σ_h log|L_hh|``  ->  (N,)"""
        log_diag = self.log_diag
        if log_diag is None:
            log_diag = torch.log(torch.diagonal(self.scale_tril, dim1=-2, dim2=-1).abs())
        return closed_forms.gaussian_entropy_from_log_diag(log_diag)

    def covariance_sum(self) -> torch.Tensor:
        """``Σ_n L_n L_nᵀ``  ->  (H,H)"""
        return torch.einsum("nij,nkj->ik", self.scale_tril, self.scale_tril)

    def trace_term(self, gram: torch.Tensor) -> torch.Tensor:
        """``tr(G L Lᵀ) = Σ_ij (G L)_ij L_ij``;  gram (H,H)  ->  (N,)"""
        return ((gram @ self.scale_tril) * self.scale_tril).sum((-2, -1))

    def rsample(self, n_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``z = μ + L ε``  ->  (K,N,H)"""
        eps = parallel.batch_normal(
            (n_samples, *self.mean.shape), dtype=self.mean.dtype, device=self.mean.device, generator=generator
        )
        return self.mean + torch.einsum("nij,knj->kni", self.scale_tril, eps)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``||L⁻¹(z-μ)||²`` by a triangular solve;  z (...,N,H)  ->  (...,N)"""
        centred = (z - self.mean).unsqueeze(-1)  # (...,N,H,1)
        white = torch.linalg.solve_triangular(self.scale_tril.expand(*centred.shape[:-1], -1), centred, upper=False)
        return _log_prob(self, z, white.pow(2).sum((-2, -1)))

    def arrays(self) -> dict[str, torch.Tensor]:
        """``mean`` (N,H), ``scale_tril`` (N,H,H)."""
        return {"mean": self.mean, "scale_tril": self.scale_tril}


@dataclass
class LowRankGaussian(_Batch):
    """``Σ_n = V_n V_nᵀ + diag(d_n²)``.  mean (N,H), factor V (N,H,R), diag_std d (N,H).

    Entropy and trace without a Cholesky factor (docs/design.md §2): the matrix determinant lemma
    ``log det Σ = Σ_h log d_h² + log det(I_R + Vᵀ diag(d⁻²) V)`` and
    ``tr(WᵀWΣ) = ||W V||_F² + Σ_h d_h² ||W_h||²``.
    """

    diagonal = False

    mean: torch.Tensor
    factor: torch.Tensor
    diag_std: torch.Tensor

    @property
    def variance(self) -> torch.Tensor:
        return self.factor.pow(2).sum(-1) + self.diag_std**2

    def entropy(self) -> torch.Tensor:
        scaled = self.factor / self.diag_std.unsqueeze(-1)  # (N,H,R)
        rank = self.factor.shape[-1]
        capacitance = (
            torch.eye(rank, dtype=self.mean.dtype, device=self.mean.device) + scaled.transpose(-1, -2) @ scaled
        )  # (N,R,R)
        logdet = 2.0 * torch.log(self.diag_std).sum(-1) + torch.logdet(capacitance)
        return closed_forms.gaussian_entropy_from_logdet(logdet, self.mean.shape[-1])

    def covariance_sum(self) -> torch.Tensor:
        """``Σ_n (V_n V_nᵀ + diag(d_n²))``  ->  (H,H)"""
        return torch.einsum("nir,nkr->ik", self.factor, self.factor) + torch.diag(self.diag_std.pow(2).sum(0))

    def trace_term(self, gram: torch.Tensor) -> torch.Tensor:
        """``tr(G (VVᵀ + D²)) = Σ (G V) ⊙ V + Σ_h d_h² G_hh``  ->  (N,)"""
        low_rank = ((gram @ self.factor) * self.factor).sum((-2, -1))
        return low_rank + self.diag_std.pow(2) @ torch.diagonal(gram)

    def rsample(self, n_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        shape = (n_samples, *self.mean.shape)
        kwargs = dict(dtype=self.mean.dtype, device=self.mean.device, generator=generator)
        eps_low = parallel.batch_normal((n_samples, *self.factor.shape[:-2], self.factor.shape[-1]), **kwargs)
        eps_diag = parallel.batch_normal(shape, **kwargs)
        return self.mean + torch.einsum("nhr,knr->knh", self.factor, eps_low) + self.diag_std * eps_diag

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Woodbury: ``rᵀΣ⁻¹r = ||r/d||² - uᵀC⁻¹u`` with ``u = Vᵀ(r/d²)``, ``C = I + Vᵀ diag(d⁻²) V`` (R,R);
        z (...,N,H)  ->  (...,N)"""
        scaled_residual = (z - self.mean) / self.diag_std  # r/d (...,N,H)
        scaled = self.factor / self.diag_std.unsqueeze(-1)  # V/d (N,H,R)
        rank = self.factor.shape[-1]
        capacitance = torch.eye(rank, dtype=self.mean.dtype, device=self.mean.device) + scaled.transpose(-1, -2) @ scaled
        u = torch.einsum("nhr,...nh->...nr", scaled, scaled_residual)  # (...,N,R)
        solved = torch.linalg.solve(capacitance.expand(*u.shape[:-1], rank, rank), u.unsqueeze(-1)).squeeze(-1)
        return _log_prob(self, z, scaled_residual.pow(2).sum(-1) - (u * solved).sum(-1))

    def arrays(self) -> dict[str, torch.Tensor]:
        """``mean`` (N,H) and the Cholesky factor ``scale_tril`` (N,H,H) of ``VVᵀ + diag(d²)``."""
        covariance = self.factor @ self.factor.mT + torch.diag_embed(self.diag_std**2)
        return {"mean": self.mean, "scale_tril": torch.linalg.cholesky(covariance)}
