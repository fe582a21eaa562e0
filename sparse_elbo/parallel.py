"""Data parallelism across processes with torch.distributed (docs/scaling.md).

A run started by ``torchrun`` (or by Slurm through Hydra's submitit launcher) finds its rank and the number
of ranks in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
``Ranks.from_environment`` joins the process group (gloo on CPUs, NCCL on CUDA). Each rank holds a contiguous
shard of the training data and of the per-data-point posteriors (``Ranks.shard``). What the algorithms need
over the whole data set are sums — EM's sufficient statistics, the full-data ELBO's terms, the counts — and
inside ``Ranks.sharing`` every such sum is completed across the ranks by one all-reduce (``summed``), so
that W, σ², λ stay identical on every rank. Outside it (a single process, or held-out data every rank holds
whole) a sum is the process's own.

    ranks = Ranks.from_environment("cpu")          # Ranks(rank=0, size=1) without torchrun
    rows = ranks.shard(n)                          # this rank's data points: a slice of 0..n-1
    with ranks.sharing():
        total = summed(local_sums)                 # Σ over every rank's points (float64)
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from sparse_elbo.errors import ConfigError

_SHARING: Ranks | None = None  # the ranks the current sums run over (``Ranks.sharing``)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a data-parallel run: ``rank`` of ``size``."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the results file, prints and logs."""
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: str = "cpu", timeout_s: float = 600.0) -> Ranks:
        """The ranks torchrun or Slurm describe in the environment (one process: rank 0 of 1). Joins the
        default process group once (gloo for CPUs, NCCL for CUDA); a collective that waits longer than
        ``timeout_s`` for a rank fails instead of hanging."""
        if "WORLD_SIZE" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR"):
            _export_submitit_ranks()
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        if not dist.is_initialized():
            backend = "nccl" if str(device).startswith("cuda") else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        return cls(dist.get_rank(), dist.get_world_size())

    def device(self, device: torch.device) -> torch.device:
        """The rank's device: its own GPU (``LOCAL_RANK``) where the run is on CUDA."""
        if device.type != "cuda" or self.size == 1:
            return device
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))

    def from_main(self, value):
        """Rank 0's ``value`` (a picklable object), on every rank."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.size > 1:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (the same answer on every rank)."""
        if self.size == 1:
            return bool(flag)
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        value = torch.tensor([float(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` data points: sizes differ by at most one, in rank order."""
        if n < self.size:
            raise ConfigError(f"{n} training data points cannot be shared by {self.size} ranks")
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    @contextlib.contextmanager
    def sharing(self):
        """Within: ``summed`` and ``count`` complete sums over the data points of every rank."""
        global _SHARING
        previous, _SHARING = _SHARING, (self if self.size > 1 else None)
        try:
            yield self
        finally:
            _SHARING = previous


def _export_submitit_ranks() -> None:
    """In a job of Hydra's submitit launcher (Slurm, or ``submitit_local``) with several tasks: the rank and the
    rendezvous that submitit's helper derives from the job, exported for torch.distributed's ``env://``."""
    from submitit.helpers import TorchDistributedEnvironment

    environment = TorchDistributedEnvironment()
    if environment.world_size > 1:
        environment.export(set_cuda_visible_devices=False)  # LOCAL_RANK picks the GPU (Ranks.device)


def leave() -> None:
    """Leave the process group, if this process joined one (before the process ends: gloo's threads must not
    outlive the interpreter)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def sharing() -> Ranks | None:
    """The ranks the current sums run over (None: this process's data are the whole data set)."""
    return _SHARING


@contextlib.contextmanager
def local():
    """Within: sums are this process's own again (data every rank holds whole, e.g. held-out points)."""
    global _SHARING
    previous, _SHARING = _SHARING, None
    try:
        yield
    finally:
        _SHARING = previous


def summed(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The sums over every rank of each of ``tensors`` (this rank's partial sums), in float64, with one
    all-reduce for all of them; the tensors themselves as float64 outside ``Ranks.sharing``."""
    as64 = [t.to(torch.float64) for t in tensors]
    if _SHARING is None:
        return tuple(as64)
    flat = torch.cat([t.reshape(-1) for t in as64])
    dist.all_reduce(flat)
    out, start = [], 0
    for t in as64:
        out.append(flat[start : start + t.numel()].reshape(t.shape))
        start += t.numel()
    return tuple(out)


def total(value: torch.Tensor) -> torch.Tensor:
    """``value`` (this rank's partial sum) summed over every rank, in its dtype; ``value`` itself outside
    ``Ranks.sharing``."""
    return value if _SHARING is None else summed(value)[0].to(value.dtype)


def mean(values: torch.Tensor, n: int) -> torch.Tensor:
    """The mean of per-point ``values`` (N, ...) over the ``n`` data points of every rank, in their dtype."""
    if _SHARING is None:
        return values.mean(0)
    return total(values.sum(0)) / n


def count(n: int) -> int:
    """The number of data points over every rank, given this rank's ``n``."""
    if _SHARING is None:
        return int(n)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor([float(n)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def held(index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Of the data-point indices ``index`` (into the whole data set), those this rank holds: their places in
    ``index`` and their positions in the rank's shard (of ``n`` points), in ``index``'s order."""
    if _SHARING is None:
        return torch.arange(len(index), device=index.device), index
    part = _SHARING.shard(count(n))
    places = torch.nonzero((index >= part.start) & (index < part.stop)).reshape(-1)
    return places, index[places] - part.start


def mine(index: torch.Tensor, n: int) -> torch.Tensor:
    """Of the data-point indices ``index`` (into the whole data set), the positions in this rank's shard (of
    ``n`` points) of those it holds, in ``index``'s order. Outside ``Ranks.sharing``: ``index``."""
    return held(index, n)[1]


def gathered(arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-data-point arrays ``{name: (N_rank, ...)}`` of every rank joined along the first axis in rank order
    (the whole data set's order), on the host; on a rank other than 0 an empty dict (rank 0 writes them).
    Only for arrays bounded by ``results.max_posterior_numbers``. Outside ``Ranks.sharing``: ``arrays``."""
    if _SHARING is None:
        return arrays
    parts = [None] * _SHARING.size if _SHARING.is_main else None
    dist.gather_object({name: value.detach().cpu() for name, value in arrays.items()}, parts, dst=0)
    if not _SHARING.is_main:
        return {}
    return {name: torch.cat([part[name] for part in parts]) for name in arrays}
