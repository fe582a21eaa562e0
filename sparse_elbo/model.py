"""The generative model ``p(z) = Π_h p(z_h; λ_h)``, ``p(x|z) = N(x; W z, σ² I_D)`` (docs/design.md §1).

Gauge ``(W_h, λ_h) → (c W_h, λ_h / c)`` is fixed in one of two ways:

- ``unit_norm`` (default, the paper's ``W̃``): ``W`` is stored unconstrained and used with unit-norm
  columns, ``W_h = W_raw_h / ||W_raw_h||``; ``λ`` is free.
- ``unit_lambda``: ``λ_h = 1`` and ``W`` is free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sparse_elbo.errors import ConfigError
from sparse_elbo.priors import LaplacePrior, Prior
from sparse_elbo.validation import invalid, require_one_of, require_positive

GAUGES = ("unit_norm", "unit_lambda")


def load_dictionary(path: str, n_observed: int, n_latents: int):
    """A user's initial dictionary (D,H) from any file ``dataset=file`` reads; checked against the data."""
    from sparse_elbo.data import read_data_file

    try:
        W = read_data_file(str(path))
    except (OSError, KeyError, ValueError) as error:
        raise ConfigError(f"init_dictionary: {error}".replace("dataset.path", "path"), key="init_dictionary") from error
    if W.shape != (n_observed, n_latents):
        raise invalid(
            "init_dictionary",
            f"={str(path)!r} has shape {W.shape}, but the data have D={n_observed} "
            f"and n_latents={n_latents}: expected ({n_observed}, {n_latents})",
        )
    if (abs(W).sum(0) == 0).any():
        raise invalid("init_dictionary", f"={str(path)!r} has an all-zero column")
    return W


class SparseCodingModel(nn.Module):
    """Parameters: ``W_raw (D,H)``, ``log_sigma2 ()``, ``log_lambda (H,)``."""

    def __init__(
        self,
        n_observed: int,
        n_latents: int,
        prior: Prior | None = None,
        gauge: str = "unit_norm",
        init_sigma2: float = 1.0,
        init_lambda: float = 1.0,
        init_dictionary: str | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if gauge not in GAUGES:
            require_one_of("gauge", gauge, GAUGES)
        if n_observed < 1 or n_latents < 1:
            raise ConfigError(f"model sizes must be >= 1, got D={n_observed}, n_latents={n_latents}")
        if not (init_sigma2 > 0 and init_lambda > 0):
            require_positive(init_sigma2=init_sigma2, init_lambda=init_lambda)
        self.n_observed, self.n_latents, self.gauge = n_observed, n_latents, gauge
        self.prior = prior if prior is not None else LaplacePrior()
        if init_dictionary:
            W = torch.as_tensor(load_dictionary(init_dictionary, n_observed, n_latents))
        else:
            W = torch.randn(n_observed, n_latents, generator=generator, dtype=torch.float64)
            W = W / W.norm(dim=0)
        self.W_raw = nn.Parameter(W.float())
        self.log_sigma2 = nn.Parameter(torch.tensor(math.log(init_sigma2)))
        self.log_lambda = nn.Parameter(torch.full((n_latents,), math.log(init_lambda)))
        if gauge == "unit_lambda":
            self.log_lambda.requires_grad_(False)
            self.log_lambda.data.zero_()

    @property
    def W(self) -> torch.Tensor:
        """The dictionary used by the likelihood, (D,H)."""
        if self.gauge == "unit_norm":
            return self.W_raw / self.W_raw.norm(dim=0)
        return self.W_raw

    @torch.no_grad()
    def raw_gradient(self, grad_W: torch.Tensor) -> torch.Tensor:
        """Pull a gradient with respect to ``W`` (D,H) back to ``W_raw`` (D,H). Under ``unit_norm``,
        ``W_h = V_h / ||V_h||`` gives ``∂/∂V_h = (g_h - W_h (W_hᵀ g_h)) / ||V_h||``; under ``unit_lambda`` it is ``g``."""
        if self.gauge == "unit_norm":
            norms = self.W_raw.norm(dim=0)  # (H,)
            W = self.W_raw / norms
            return (grad_W - W * (W * grad_W).sum(0)) / norms
        return grad_W.clone()

    @property
    def sigma2(self) -> torch.Tensor:
        return self.log_sigma2.exp()

    @property
    def lam(self) -> torch.Tensor:
        return self.log_lambda.exp()

    @torch.no_grad()
    def set_dictionary(self, W: torch.Tensor) -> None:
        """Set ``W (D,H)``; under ``unit_norm`` its columns are normalised when used."""
        self.W_raw.copy_(W)

    @torch.no_grad()
    def set_noise_and_prior_scale(self, sigma2: torch.Tensor, lam: torch.Tensor) -> None:
        self.log_sigma2.copy_(torch.log(sigma2))
        if self.gauge == "unit_norm":
            self.log_lambda.copy_(torch.log(lam))


@dataclass
class ModelAt:
    """A model's dictionary and prior with given ``σ², λ`` — what the objectives read from a model — for
    evaluating at other values (the full-data optima, a held scale) without writing them into the model."""

    W: torch.Tensor
    sigma2: torch.Tensor
    lam: torch.Tensor
    prior: object

    def parameters(self):
        """A view holds no parameters (an E-step freezes those of the model it is given)."""
        return iter(())
