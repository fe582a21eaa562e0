"""What a trainer works on: data on the device, the model, the posterior, the objective, the schedule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_elbo.annealing import AnnealingWeights, Schedule
from sparse_elbo.model import SparseCodingModel
from sparse_elbo.objectives import Objective
from sparse_elbo.posteriors import Posterior


@dataclass
class Problem:
    """x (N,D) on the run's device and dtype; components already built and moved there;
    x_held_out (M,D): data never trained on, for held-out metrics (None when there is no split)."""

    x: torch.Tensor
    model: SparseCodingModel
    posterior: Posterior
    objective: Objective
    annealing: Schedule
    seed: int = 0
    x_held_out: torch.Tensor | None = None

    def q(self, index: torch.Tensor | None = None):
        """The Gaussians ``q_n`` of the data points ``index`` (all when None): the per-data-point
        posteriors' own parameters, or the encoder applied to ``x[index]``."""
        return self.posterior.q(self.x, index)

    def loss_and_gradients(self, weights: AnnealingWeights, generator: torch.Generator | None = None) -> torch.Tensor:
        """The loss ``-N · F_β`` (the weighted objective summed over data points) at the current parameters;
        sets ``.grad`` of every parameter it depends on. In closed form when the objective has one for this
        posterior family (``EntropyELBO`` with per-data-point posteriors), otherwise by autograd."""
        n_data = self.x.shape[0]
        if self.objective.has_closed_form_gradient(self.posterior):
            value, gradients = self.objective.value_and_gradient(self.x, self.posterior, self.model, weights)
            for parameter, gradient in gradients.items():
                parameter.grad = -gradient
            return -n_data * value.weighted
        for parameter in [*self.posterior.parameters(), *self.model.parameters()]:
            parameter.grad = None
        loss = -n_data * self.objective(self.x, self.q(), self.model, weights, generator=generator).weighted
        loss.backward()
        return loss.detach()

    def trainable_parameters(self, train_dictionary: bool = True) -> list[torch.nn.Parameter]:
        """W (if trained), σ² and λ (if the objective learns them) and every posterior parameter."""
        params = list(self.posterior.parameters())
        if train_dictionary:
            params.append(self.model.W_raw)
        if self.objective.learns_noise_and_prior_scale:
            params.append(self.model.log_sigma2)
            if self.model.log_lambda.requires_grad:
                params.append(self.model.log_lambda)
        return params

    def shared_parameters(self, train_dictionary: bool = True) -> list[torch.nn.Parameter]:
        """Of ``trainable_parameters``, those every rank of a data-parallel run holds whole (W, σ², λ, an encoder's
        weights), as opposed to the per-data-point posteriors' rows of its own shard."""
        held = set() if self.posterior.amortized else {id(p) for p in self.posterior.parameters()}
        return [p for p in self.trainable_parameters(train_dictionary) if id(p) not in held]
