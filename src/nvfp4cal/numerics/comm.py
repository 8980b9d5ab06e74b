"""The run context: who this process is, where its weights live, how ranks talk - decided once.

:class:`RunContext` is built once per run from the Trainer (``callback.run_context``) or by hand
(:meth:`RunContext.single` for one process); every step takes it as an argument instead of asking
``torch.distributed`` or the strategy. Its :class:`Comm` is the only place collectives happen:

* :class:`Comm` - one process: every collective is the identity.
* :class:`TorchComm` - ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

``holding`` says how the model's weights are held: ``"whole"`` (every rank has all of every
weight: one process or DDP) or ``"rows"`` (FSDP2: each rank holds the ``torch.chunk`` rows
``[r * ceil(n / N), ...)`` of dim 0 of every parameter, see :func:`rows`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def is_sharded(t) -> bool:
    """A DTensor (a parameter of an FSDP2-sharded module)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a sharded tensor (the tensor itself otherwise)."""
    return t.to_local() if is_sharded(t) else t


def rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``n`` that ``torch.chunk`` (and so FSDP2) gives to ``rank`` of ``world``."""
    per = math.ceil(n / world) if n else 0
    start = min(rank * per, n)
    return start, min(start + per, n)


class Comm:
    """Collectives of a one-process run: nothing to exchange, every call returns its input."""

    rank, world = 0, 1

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise MAX over ranks, in place."""
        return t

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise SUM over ranks, in place."""
        return t

    def broadcast_(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """``src``'s values on every rank, in place."""
        return t

    def gather_rows(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """The full ``[n, ...]`` tensor from every rank's :func:`rows` of it."""
        return t

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj``, in rank order."""
        return [obj]

    def sum_floats(self, values: list[float], device: torch.device) -> list[float]:
        """Per-rank partial sums added up (float64)."""
        return list(values)

    def barrier(self) -> None:
        pass


class TorchComm(Comm):
    """Collectives over the default ``torch.distributed`` process group."""

    def __init__(self):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def max_(self, t):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def sum_(self, t):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_(self, t, src):
        dist.broadcast(t, src=src)
        return t

    def gather_rows(self, t, n):
        per = math.ceil(n / self.world)
        padded = torch.zeros((per, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat(parts)[:n]

    def gather_objects(self, obj):
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum_floats(self, values, device):
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self):
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def default_comm() -> Comm:
    """:class:`TorchComm` when a process group of several ranks is up, else :class:`Comm`."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchComm()
    return Comm()


@dataclass(frozen=True)
class RunContext:
    """Rank, world size, device, progress display, weight holding and collectives of one run."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = False  # show progress bars (global rank 0 only, when the trainer shows them)
    holding: str = "whole"  # "whole" | "rows" (see the module docstring)
    comm: Comm = field(default_factory=Comm)
    # how the export reads the model's tensors: None = the model's own; else model -> a tensor source
    # (export.plan.TensorSource: FSDP's gathered units, layers streamed from disk, ...)
    tensors: Callable | None = None

    @classmethod
    def single(cls, device: torch.device | str = "cpu", progress: bool = False) -> RunContext:
        """One process holding the whole model."""
        return cls(torch.device(device), progress, "whole", Comm())

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world(self) -> int:
        return self.comm.world

    @property
    def rank0(self) -> bool:
        return self.comm.rank == 0

    @property
    def sharded(self) -> bool:
        return self.holding == "rows"

    def split(self, sizes: list[int]) -> list[int]:
        """The rank that works on each of ``len(sizes)`` items: largest first, each to the least
        loaded rank (ties: the lower rank), so the ranks get about equal work. Same answer on every rank."""
        load, owner = [0] * self.world, [0] * len(sizes)
        for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += sizes[i]
        return owner
