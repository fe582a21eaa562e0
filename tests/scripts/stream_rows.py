"""Run under torchrun (2 ranks) by tests/test_distributed.py: each rank's shard of a 53-row array passed to rank 0
by ``parallel.rows_to_main`` in blocks of 7 rows; rank 0 writes what it received, and the largest block, to
the file named by the first argument."""

import sys

import numpy as np
import torch

from sparse_elbo import parallel

ranks = parallel.Ranks.from_environment("cpu")
whole = torch.arange(53 * 3, dtype=torch.float64).reshape(53, 3)  # row r: 3r, 3r+1, 3r+2
mine = whole[ranks.shard(53)]
received, largest = np.full((53, 3), np.nan), 0


def write(start, arrays):
    global largest
    block = arrays["x"].numpy()
    received[start : start + len(block)] = block
    largest = max(largest, len(block))


with ranks.sharing():
    parallel.rows_to_main(lambda rows: {"x": mine[rows]}, mine.shape[0], write, block_rows=7)
if ranks.is_main:
    np.savez(sys.argv[1], received=received, largest=largest)
parallel.leave()
