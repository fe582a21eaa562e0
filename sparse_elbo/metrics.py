"""Evaluation metrics (docs/design.md §10): sparseness and ground-truth field matching."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def gini(values: torch.Tensor) -> torch.Tensor:
    """Gini coefficient of ``|v|`` along the last axis (0 = all equal, 1 - 1/H = one non-zero):

        G = Σ_i (2i - H - 1) |v|_(i) / (H Σ_i |v|_(i)),   |v|_(1) ≤ … ≤ |v|_(H)

    values (...,H) -> (...)
    """
    H = values.shape[-1]
    sorted_abs = values.abs().sort(dim=-1).values
    ranks = torch.arange(1, H + 1, dtype=values.dtype, device=values.device)
    total = sorted_abs.sum(-1)
    weighted = (sorted_abs * (2 * ranks - H - 1)).sum(-1)
    return weighted / (H * total.clamp_min(torch.finfo(values.dtype).tiny))


def sample_gini(q, n_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The Gini coefficient of ``|z|`` of samples ``z ~ q_n``  ->  (K,N)."""
    return gini(q.rsample(n_samples, generator=generator))  # of (K,N,H)


def posterior_sample_gini(q, n_samples: int, generator: torch.Generator | None = None) -> tuple[float, float]:
    """Mean and std of the Gini coefficient of ``|z|`` over samples ``z ~ q_n`` and data points."""
    g = sample_gini(q, n_samples, generator)
    return float(g.mean()), float(g.std())


@dataclass
class FieldMatch:
    """Learned-to-true matching up to permutation and sign.  assignment[j] = learned index matched
    to true field j; cosines (H_true,) the matched |cosine|; recovered: min |cosine| ≥ threshold."""

    assignment: np.ndarray
    cosines: np.ndarray
    min_cosine: float
    recovered: bool


def match_fields(W_learned: np.ndarray, W_true: np.ndarray, threshold: float = 0.95) -> FieldMatch:
    """Hungarian matching on ``|cos(W_true_j, W_learned_h)|`` (sign-invariant).

    W_learned (D,H), W_true (D,H_true) with H ≥ H_true.
    """
    learned = W_learned / np.linalg.norm(W_learned, axis=0).clip(1e-300)
    true = W_true / np.linalg.norm(W_true, axis=0).clip(1e-300)
    similarity = np.abs(true.T @ learned)  # (H_true,H)
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    cosines = similarity[rows, cols]
    min_cos = float(cosines.min())
    return FieldMatch(assignment=cols, cosines=cosines, min_cosine=min_cos, recovered=min_cos >= threshold)


# A 16x16 field whose localisation index is above this is noise-like: spread over the patch as noise is (the most
# localised of 2,000 random Gaussian 16x16 fields scores 0.887; scripts/bench_small_fields.py measures it).
NOISE_LIKE_LOCALISATION_16X16 = 0.88


def localisation_index(W: np.ndarray, image_shape: tuple[int, int]) -> np.ndarray:
    """Spatial spread of each field's energy relative to that of a uniform field (1 ≈ unlocalised,
    small = localised):

        e_hp = W_hp² / Σ_p W_hp²,   c_h = Σ_p e_hp r_p,   spread_h = sqrt(Σ_p e_hp ||r_p - c_h||²)
        index_h = spread_h / spread(uniform field),   spread(uniform)² = (rows² - 1)/12 + (cols² - 1)/12

    W (D,H) with D = rows·cols  ->  (H,)
    """
    rows, cols = image_shape
    energy = W**2 / np.clip((W**2).sum(0, keepdims=True), 1e-300, None)  # (D,H)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    coords = np.stack([r.ravel(), c.ravel()], axis=1).astype(np.float64)  # (D,2)
    centre = energy.T @ coords  # (H,2)
    squared_distance = ((coords[None, :, :] - centre[:, None, :]) ** 2).sum(-1)  # (H,D)
    spread = np.sqrt((energy.T * squared_distance).sum(-1))  # (H,)
    uniform = np.sqrt((rows**2 - 1) / 12 + (cols**2 - 1) / 12)
    return spread / uniform


def field_grid(W: np.ndarray, lam: np.ndarray, image_shape: tuple[int, int] | None = None) -> np.ndarray:
    """The dictionary as one grey image: the fields ordered by λ (largest first), each scaled to its own
    max |w| (0.5 = 0), tiled row by row in a near-square grid with one-pixel borders. ``image_shape``: a field's
    (rows, cols); None: square fields (or one row of D pixels).  W (D,H), lam (H,)  ->  (R,C) in [0, 1]"""
    D, H = W.shape
    side = int(round(math.sqrt(D)))
    rows, cols = image_shape if image_shape is not None else ((side, side) if side * side == D else (1, D))
    n_cols = math.ceil(math.sqrt(H))
    n_rows = math.ceil(H / n_cols)
    grid = np.full((n_rows * (rows + 1) + 1, n_cols * (cols + 1) + 1), 0.5)
    for k, h in enumerate(np.argsort(-np.asarray(lam))):
        field = W[:, h].reshape(rows, cols)
        limit = float(np.abs(field).max()) or 1.0
        r, c = divmod(k, n_cols)
        grid[1 + r * (rows + 1) : 1 + r * (rows + 1) + rows, 1 + c * (cols + 1) : 1 + c * (cols + 1) + cols] = (
            0.5 + 0.5 * field / limit
        )
    return grid
