"""Shared test setup: every test starts from seeded global RNGs (tests also pass explicit generators)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_global_rngs():
    torch.manual_seed(0)
    np.random.seed(0)
    yield
