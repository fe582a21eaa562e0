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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from sparse_elbo.errors import ConfigError

_SHARING: Ranks | None = None  # the ranks the current sums run over (``Ranks.sharing``)
_MINIBATCH: int | None = None  # the points of the global minibatch whose parts the ranks hold (``minibatch``)
_PLACES: torch.Tensor | None = None  # this rank's points' places in that minibatch


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

    def positions(self, index: torch.Tensor, n_all: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Of the indices ``index`` into all ``n_all`` data points, those in this rank's shard: their places in
        ``index`` and their positions in the shard, in ``index``'s order."""
        part = self.shard(n_all)
        places = torch.nonzero((index >= part.start) & (index < part.stop)).reshape(-1)
        return places, index[places] - part.start

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
    return _SHARING.positions(index, count(n))


def mine(index: torch.Tensor, n: int) -> torch.Tensor:
    """Of the data-point indices ``index`` (into the whole data set), the positions in this rank's shard (of
    ``n`` points) of those it holds, in ``index``'s order. Outside ``Ranks.sharing``: ``index``."""
    return held(index, n)[1]


def rows_to_main(rows_of: Callable[[slice], dict[str, torch.Tensor]], n: int, write, block_rows: int) -> None:
    """Per-data-point arrays of every rank's shard (``rows_of(rows)``: ``{name: (R, ...)}`` of this rank's ``n``
    points) handed to rank 0's ``write(start, arrays)`` (``start``: the first row's index in the whole data set)
    in blocks of at most ``block_rows`` points, in the data set's order: no process ever holds more than one
    block of another rank's rows. Every rank calls it; outside ``Ranks.sharing`` the process's own blocks."""
    if _SHARING is None:
        for start in range(0, n, block_rows):
            write(start, rows_of(slice(start, min(start + block_rows, n))))
        return
    n_all = count(n)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    if not _SHARING.is_main:
        for start in range(0, n, block_rows):
            for value in rows_of(slice(start, min(start + block_rows, n))).values():
                dist.send(value.detach().to(device).contiguous(), dst=0)
        _SHARING.barrier()
        return
    like = {name: value.detach() for name, value in rows_of(slice(0, 1)).items()}  # every rank's arrays alike
    for rank in range(_SHARING.size):
        part = Ranks(rank, _SHARING.size).shard(n_all)
        for start in range(part.start, part.stop, block_rows):
            rows = min(block_rows, part.stop - start)
            if rank == 0:
                block = rows_of(slice(start, start + rows))
            else:
                block = {name: torch.empty((rows, *v.shape[1:]), dtype=v.dtype, device=device) for name, v in like.items()}
                for value in block.values():
                    dist.recv(value, src=rank)
            write(start, block)
    _SHARING.barrier()  # a send may return before its rows arrive (NCCL): no rank leaves the group before then


@contextlib.contextmanager
def minibatch(size: int, places: torch.Tensor | None = None):
    """Within (inside ``Ranks.sharing``): a step on a global minibatch of ``size`` data points, each rank
    holding its part of it (``places``: where its points are in the minibatch); ``batch_mean`` averages over
    all ``size`` of them, ``batch_size`` is ``size``, ``batch_normal`` draws the whole minibatch's noise.
    Outside ``Ranks.sharing`` it changes nothing: the process's batch is the minibatch."""
    global _MINIBATCH, _PLACES
    previous = _MINIBATCH, _PLACES
    if _SHARING is not None:
        _MINIBATCH, _PLACES = int(size), places
    try:
        yield
    finally:
        _MINIBATCH, _PLACES = previous


def batch_normal(shape: tuple[int, ...], **kwargs) -> torch.Tensor:
    """Standard normal noise ``(K, B_rank, ...)`` for this rank's points of the minibatch: the whole
    minibatch's draw ``(K, B, ...)`` from the generator every rank holds alike (``kwargs``: ``torch.randn``'s
    dtype, device, generator), this rank's rows of it — the noise the single process draws for these points.
    ``torch.randn(shape, **kwargs)`` outside ``minibatch``."""
    if _MINIBATCH is None:
        return torch.randn(shape, **kwargs)
    whole = torch.randn((shape[0], _MINIBATCH, *shape[2:]), **kwargs)
    return whole if _PLACES is None else whole.index_select(1, _PLACES.to(whole.device))


def batch_size(n: int) -> int:
    """The size of the minibatch of which this rank holds ``n`` points (``n`` outside ``minibatch``)."""
    return n if _MINIBATCH is None else _MINIBATCH


def batch_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of per-point ``values (B_rank, ...)`` over the global minibatch (``minibatch``): its value is
    every rank's sum over the minibatch size (one all-reduce), its gradient this rank's share,
    ``∂/∂values = 1/B`` — so that the sum over ranks of every shared parameter's gradient is that of the
    single process's mean. ``values.mean(0)`` outside ``minibatch``."""
    if _MINIBATCH is None:
        return values.mean(0)
    share = values.sum(0) / _MINIBATCH
    return total(share.detach()) + (share - share.detach())


def batch_mean_change(values: torch.Tensor) -> torch.Tensor:
    """Zero, with the gradient of ``batch_mean(values)`` (a value held elsewhere that follows the minibatch's
    mean, e.g. a full-data statistic); no communication."""
    share = values.mean(0) if _MINIBATCH is None else values.sum(0) / _MINIBATCH
    return share - share.detach()


def complete_gradients(shared: list[torch.Tensor], local: list[torch.Tensor]) -> None:
    """Inside ``minibatch``: the gradients of the ``shared`` parameters (every rank holds them whole: the
    dictionary, σ², λ, an encoder's weights) summed over the ranks with one all-reduce, and a zero gradient
    for every parameter a rank's part of the minibatch did not reach (so that each rank's optimiser steps as
    the single process's does: rows outside the batch get zero, not no gradient). Nothing outside it. The sum is
    the single process's gradient while every term of the loss reaches the shared parameters through the
    minibatch's means (``batch_mean``); a term of the parameters alone (a penalty on W) would count once per rank."""
    if _MINIBATCH is None:
        return
    for parameter in (*shared, *local):
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    if shared:
        flat = torch.cat([p.grad.reshape(-1) for p in shared])
        dist.all_reduce(flat)
        start = 0
        for p in shared:
            p.grad.copy_(flat[start : start + p.numel()].view_as(p.grad))
            start += p.numel()
