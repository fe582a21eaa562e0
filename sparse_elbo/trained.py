"""A trained model, used on new data: encode, reconstruct, score (docs/design.md §12).

    model = sparse_elbo.load("outputs/runs/<date>/<time>/results.h5")
    codes = model.encode(x)            # the posterior of each row of x: mean (N,H), std (N,H) or scale_tril (N,H,H)
    x_hat = model.reconstruct(x)       # W E[z] per row (N,D)
    model.elbo(x)                      # per-row ELBO at the fitted posteriors (N,)
    model.log_px(x, samples=100)       # importance-sampled log p(x) per row, with its standard error

Everything is fitted with the trained ``W, σ², λ`` fixed: per-data-point posteriors by the E-step of
docs/design.md §6.2 (L-BFGS on the analytic ELBO, block by block, so memory stays bounded); an amortised
model's encoder gives its q at once (``refine=True`` then refines it per row, as a full covariance for a
low-rank encoder). Arrays in, arrays of the same kind out (numpy, or torch on the model's device).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sparse_elbo.errors import ConfigError, MissingFileError
from sparse_elbo.held_out import importance_sampled_log_px
from sparse_elbo.inference.fit import fit_new_data, score_dictionary
from sparse_elbo.inference.statistics import data_blocks
from sparse_elbo.model import SparseCodingModel
from sparse_elbo.objectives import AnalyticELBO
from sparse_elbo.results import Results, read_results
from sparse_elbo.validation import require_at_least


@dataclass
class Codes:
    """The posteriors of the rows of x: mean (N,H), and std (N,H) for diagonal posteriors or scale_tril
    (N,H,H) for full covariances (the other is None), and the ELBO of each row at its posterior."""

    mean: np.ndarray | torch.Tensor
    std: np.ndarray | torch.Tensor | None = None
    scale_tril: np.ndarray | torch.Tensor | None = None
    elbo: np.ndarray | torch.Tensor | None = None  # (N,) the ELBO of each row at its posterior, nats


@dataclass
class LogLikelihood:
    """Importance-sampled ``log p̂(x_n)`` (N,) and the Monte Carlo standard error of each (N,)."""

    per_row: np.ndarray | torch.Tensor
    stderr: np.ndarray | torch.Tensor


def _check_finished(results: Results, path: Path) -> None:
    if results.status != "finished":
        reason = f" ({results.attrs.get('reason')})" if results.attrs.get("reason") else ""
        raise ConfigError(
            f"{path}: the run is {results.status or 'of unknown status'}{reason}; only a finished run holds a trained model"
        )
    for key in ("W", "sigma2", "lambda"):
        if key not in results.final:
            raise ConfigError(f"{path}: /final/{key} is missing; not a complete results file")


def preprocessing(config: dict) -> dict | None:
    """How the patches of a run on ``dataset=image_patches`` were made (None for other data): the settings a
    user repeats on new patches before encoding them."""
    dataset = config.get("dataset", {})
    if not str(dataset.get("_target_", "")).endswith("make_image_patches"):
        return None
    keys = ("source", "images", "patch_size", "whiten_images", "remove_dc", "n_patches")
    return {key: dataset.get(key) for key in keys}


class TrainedModel:
    """W (D,H), σ², λ (H,) and the prior of a trained run, with its posterior family (``diag``, ``full`` or
    ``amortized`` with the trained encoder), on ``device`` in ``dtype`` (module docstring)."""

    def __init__(self, model: SparseCodingModel, posterior, source: str = "", info: dict | None = None):
        self.model, self.posterior, self.source = model, posterior, source
        self.family = posterior.family
        # a pretrained bundle's description (sparse_elbo.pretrained); for a run on image patches, its preprocessing
        self.info = info or {}

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64) -> TrainedModel:
        """The model of the finished run stored in ``path`` (a results.h5)."""
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"results={str(path)!r}: no such results file")
        results = read_results(path)
        _check_finished(results, path)
        cfg = OmegaConf.create(results.config)
        final = results.final
        info = {"preprocessing": preprocessing(results.config)} if preprocessing(results.config) else {}
        model = cls.from_arrays(
            final["W"], final["sigma2"], final["lambda"], cfg.model, cfg.posterior, device, dtype, str(path), info
        )
        if model.posterior.amortized:
            _load_encoder(model.posterior, final.get("posterior", {}), path)
        return model

    @classmethod
    def from_arrays(
        cls,
        W,
        sigma2,
        lam,
        model_cfg,
        posterior_cfg,
        device="cpu",
        dtype=torch.float64,
        source: str = "",
        info: dict | None = None,
    ) -> TrainedModel:
        """The model ``W (D,H)``, ``σ²``, ``λ (H,)`` with the prior and gauge of ``model_cfg`` and the posterior
        family of ``posterior_cfg`` (the ``model`` and ``posterior`` nodes of a run's config)."""
        W = torch.as_tensor(np.asarray(W), dtype=torch.float64)
        D, H = W.shape
        model_cfg = OmegaConf.create(model_cfg)
        prior, gauge = instantiate(model_cfg.prior), model_cfg.get("gauge", "unit_norm")
        model = SparseCodingModel(D, H, prior=prior, gauge=gauge).to(device=device, dtype=dtype)  # then the values, unrounded
        model.set_dictionary(W.to(device=device, dtype=dtype))
        lam = torch.as_tensor(np.asarray(lam), device=device, dtype=dtype)
        model.set_noise_and_prior_scale(torch.as_tensor(float(sigma2), device=device, dtype=dtype), lam)
        posterior = instantiate(OmegaConf.create(posterior_cfg))(n_data=1, n_latents=H, n_observed=D)
        return cls(model, posterior.to(device=device, dtype=dtype), source, info)

    def with_scales_fitted_to(self, x, max_iterations: int = 50) -> TrainedModel:
        """The same dictionary with σ², λ refitted to the data ``x`` (``max_{q, σ², λ} L_H`` at this W,
        ``evaluation.score_dictionary``): e.g. a dictionary learned from clean data used on noisy data, whose
        noise level is then learned, not given."""
        rows = self._tensor(x)
        score = score_dictionary(rows, self.model.W.detach(), self.model.prior, max_iterations=max_iterations)
        model = copy.deepcopy(self.model)
        with torch.no_grad():
            model.set_noise_and_prior_scale(torch.as_tensor(score.sigma2, dtype=rows.dtype), score.lam.to(rows))
        return TrainedModel(model, self.posterior, self.source, self.info)

    @property
    def n_observed(self) -> int:
        return self.model.n_observed

    @property
    def n_latents(self) -> int:
        return self.model.n_latents

    def _tensor(self, x) -> torch.Tensor:
        """x as a tensor on the model's device and dtype, checked before any compute (a tensor is checked
        where it is, without a copy to the host)."""
        if not torch.is_tensor(x):
            x = np.asarray(x)
            if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
                raise ConfigError(f"data must be real numbers, got dtype {x.dtype}")
            x = torch.as_tensor(x)
        elif x.is_complex() or x.dtype == torch.bool:
            raise ConfigError(f"data must be real numbers, got dtype {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.n_observed:
            raise ConfigError(
                f"data must have shape (N, {self.n_observed}) for this model (D = {self.n_observed}), got shape {tuple(x.shape)}"
            )
        bad = torch.nonzero(~torch.isfinite(x).all(1)).flatten()
        if bad.numel():
            raise ConfigError(f"data holds NaN/Inf values in {bad.numel()} rows (first: {bad[:5].tolist()})")
        W = self.model.W_raw
        return x.detach().to(dtype=W.dtype, device=W.device)

    def _fitted(self, x: torch.Tensor, refine: bool, iterations: int, batch_size: int):
        """(index, q) for each block of rows: the posteriors fitted with W, σ², λ fixed."""
        for index in data_blocks(x.shape[0], batch_size, x.device):
            block = x[index]
            if self.posterior.amortized and not refine:
                with torch.no_grad():
                    yield index, self.posterior(block)
                continue
            fitted = fit_new_data(block, self.posterior, self.model, iterations, block.shape[0])
            with torch.no_grad():
                yield index, fitted()

    def _like(self, reference, value: torch.Tensor):
        return value if torch.is_tensor(reference) else value.detach().cpu().numpy()

    def encode(self, x, refine: bool = True, iterations: int = 500, batch_size: int = 4096) -> Codes:
        """The posterior of each row of ``x (N,D)`` (means, and stds or scale_tril per the family) and its ELBO."""
        require_at_least(0, iterations=iterations)
        require_at_least(1, batch_size=batch_size)
        rows = self._tensor(x)
        arrays, elbos = [], []
        for index, q in self._fitted(rows, refine, iterations, batch_size):
            with torch.no_grad():
                elbos.append(AnalyticELBO()(rows[index], q, self.model).per_point)
                arrays.append(q.arrays())  # mean, and std or scale_tril (the Gaussian batch's own description)
        joined = {name: self._like(x, torch.cat([a[name] for a in arrays])) for name in arrays[0]}
        return Codes(**joined, elbo=self._like(x, torch.cat(elbos)))

    def reconstruct(self, x, **encode_settings):
        """``W E_q[z]`` per row of ``x`` (N,D): the posterior-mean reconstruction."""
        codes = self.encode(x, **encode_settings)
        mean = torch.as_tensor(codes.mean, device=self.model.W_raw.device)
        with torch.no_grad():
            return self._like(x, mean @ self.model.W.T)

    def elbo(self, x, **encode_settings):
        """The ELBO of each row of ``x`` at its fitted posterior (N,), nats."""
        return self.encode(x, **encode_settings).elbo

    def log_px(self, x, samples: int = 100, seed: int = 0, iterations: int = 500, batch_size: int = 4096) -> LogLikelihood:
        """Importance-sampled ``log p(x_n)`` per row with the fitted q as proposal, and its standard error."""
        require_at_least(2, samples=samples)
        require_at_least(1, iterations=iterations, batch_size=batch_size)
        rows = self._tensor(x)
        generator = torch.Generator(device=rows.device).manual_seed(seed)
        per_row, stderr = [], []
        for index, q in self._fitted(rows, True, iterations, batch_size):
            estimate = importance_sampled_log_px(rows[index], q, self.model, samples, generator)
            per_row.append(estimate.per_point)
            stderr.append(estimate.stderr_per_point)
        return LogLikelihood(self._like(x, torch.cat(per_row)), self._like(x, torch.cat(stderr)))


def _load_encoder(encoder: torch.nn.Module, arrays: dict, path: Path) -> None:
    """The trained encoder's weights from ``/final/posterior`` (names with ``.`` stored as ``_``)."""
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            key = name.replace(".", "_")
            if key not in arrays:
                raise ConfigError(f"{path}: the encoder's weight {key} is missing from /final/posterior")
            parameter.copy_(torch.as_tensor(np.asarray(arrays[key])))


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64) -> TrainedModel:
    """The trained model of a finished run's results file (``TrainedModel.load``)."""
    return TrainedModel.load(path, device, dtype)
