"""The FSDP adapter (``trainer=fsdp``): FSDP2 through Lightning's ModelParallelStrategy.

Every parameter is split along dim 0 across the ranks (``torch.chunk`` rows: rank ``r`` holds rows
``[r * ceil(n / N), ...)``), one ``fully_shard`` unit per decoder layer plus the root. What each
step needs, and why nothing ever gathers the whole model:

* calibration: FSDP gathers one layer at a time in the forward; input amaxes are all-reduced (MAX).
* weight max calibration: NVFP4 blocks run along the input dim, so block amaxes are row-local.
  A weight quantizer keeps the block amaxes of its rank's rows (``WeightQuantizer.rows``); the
  global amax ``g = max |w|`` (per expert for fused experts) is all-reduced with MAX.
* MSE sweep and SQNR: per block, so each rank sweeps its own rows of every weight - no gathers,
  N ranks sweep N times faster; the SQNR sums are all-reduced.
* export: :class:`UnitGate` unshards one unit (layer) at a time on every rank, with its quantizers'
  block amaxes all-gathered; global rank 0 packs and writes it, the others follow in lock step.

A model can also start on the meta device (``model.path`` loaders with ``sharded=True``): each
rank then allocates only its rows and fills them from the checkpoint (or a seeded random init).
What each rank holds is ``RunContext.holding == "rows"`` (:mod:`nvfp4cal.numerics.comm`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard

from ..checkpoint.plan import TensorSource
from ..model.experts import QuantExpertsMixin
from ..model.insert import share_global_amax
from ..model.quantizers import InputQuantizer, KVCastQuantizer, WeightQuantizer
from ..model.view import check_finite, decoder_layers, fp8_weights, quant_sources, weight_quantizers
from ..numerics import nvfp4
from ..numerics.comm import Comm, RunContext, TorchComm, local, rows
from ..numerics.errors import UserError

log = logging.getLogger("nvfp4cal")
# fill(param_name, out, start, stop, rows): write rows [start, stop) of dim 0 of the named
# parameter (``rows`` rows in all) into ``out``
Fill = Callable[[str, torch.Tensor, int, int, int], None]


class ShardedStrategy(ModelParallelStrategy):
    """FSDP2 over every rank (data-parallel size = world size, no tensor parallelism).

    The run context recognises it (:func:`nvfp4cal.lightning.module.holding`: each rank holds rows of
    every parameter) and uses ``shard_model`` (the module's ``configure_model`` calls it) and
    ``tensor_source`` (how the export reads full tensors: one gathered unit at a time).
    """

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    @staticmethod
    def shard_model(model: nn.Module, mesh, ctx: RunContext, fill: Fill | None = None) -> dict:
        return shard_model(model, mesh, ctx, fill)

    @staticmethod
    def tensor_source(model: nn.Module) -> UnitGate:
        return UnitGate(model, TorchComm())


def shard_model(model: nn.Module, mesh, ctx: RunContext, fill: Fill | None = None) -> dict:
    """``fully_shard`` each decoder layer and the root, allocate and fill meta rows, localize quantizers.

    Returns {"ranks", "param_bytes_per_rank", "param_bytes"}: what each rank holds of the parameters.
    """
    layers = decoder_layers(model)
    if not layers:
        raise UserError(f"trainer=fsdp: {type(model).__name__} has no decoder-layer list to shard; use trainer=ddp")
    fp8 = fp8_weights(model)
    if fp8:
        raise UserError(f"trainer=fsdp does not hold format fp8 weights ({fp8[0][0]}, ...) yet; use trainer=ddp or "
                        "calibration=layerwise")  # fmt: skip
    for _, layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _materialize(model, ctx, fill)
    for _, wq, w in weight_quantizers(model):
        calibrate_rows(wq, w, ctx)
    share_global_amax(model)
    params = list(model.parameters())
    held = sum(local(p).numel() * p.element_size() for p in params)
    per_rank = ctx.comm.gather_objects(held)
    total = sum(p.numel() * p.element_size() for p in params)
    if ctx.rank0:
        gib = ", ".join(f"{b / 2**30:.3f}" for b in per_rank)
        log.info("sharded over %d ranks: they hold %s of %.3f GiB of parameters", len(per_rank), gib, total / 2**30)
    return {"ranks": len(per_rank), "param_bytes_per_rank": per_rank, "param_bytes": total}


def _materialize(model: nn.Module, ctx: RunContext, fill: Fill | None) -> None:
    """Allocate this rank's rows of meta parameters and fill them; quantizer statistics start at zero."""
    if not any(local(p).is_meta for p in model.parameters()):
        return
    if fill is None:
        raise UserError("trainer=fsdp: the model starts on the meta device but its loader gave no weights")
    rank, world, device = ctx.rank, ctx.world, ctx.device
    keep = {n: b.detach().to(device) for n, b in model.named_buffers() if not b.is_meta}  # RoPE tables, ...
    model.to_empty(device=device)  # FSDP2: each rank allocates its own rows only
    with torch.no_grad():
        for n, b in keep.items():
            model.get_buffer(n).copy_(b)
        for n, p in model.named_parameters():
            total = p.shape[0] if p.dim() else 1
            start, stop = rows(total, rank, world) if p.dim() else (0, 1)
            fill(n, local(p), start, stop, total)
        check_finite(model)  # this rank's rows
        for m in model.modules():
            if isinstance(m, InputQuantizer):
                m.amax.zero_()
                m.seen.zero_()
            elif isinstance(m, QuantExpertsMixin):
                m.tokens.zero_()
            elif isinstance(m, KVCastQuantizer):
                m.amax.fill_(nvfp4.FP8_MAX)


@torch.no_grad()
def calibrate_rows(wq: WeightQuantizer, w: torch.Tensor, ctx: RunContext) -> None:
    """Max-calibrate ``wq`` from this rank's rows of the sharded weight ``w`` ([*lead, out, in]).

    ``block_amax`` becomes ``[local rows, ...]``; the global amax (a scalar, or one per expert
    for fused experts, whose experts are the rows) is the all-reduced MAX of every rank's part.
    """
    wl = local(w)
    start, stop = rows(w.shape[0], ctx.rank, ctx.world)
    wq.rows = (start, stop)
    wq.block_amax = torch.zeros(*wl.shape[:-1], wl.shape[-1] // nvfp4.BLOCK, dtype=torch.float32, device=wl.device)
    g = torch.zeros(wq.global_amax.shape, dtype=torch.float32, device=wl.device)
    if wl.numel():
        part = wq.calibrate_blocks(wl)
        if g.dim() == 0:
            g = part
        else:
            g[start:stop] = part
    ctx.comm.max_(g)
    wq.global_amax = g.reshape(wq.global_amax.shape)
    wq.clear_cache()


class UnitGate(TensorSource):
    """The export's tensors under FSDP: one unit unsharded at a time, entered in the same order on every rank.

    ``tensor(name)`` (global rank 0, producing the export) enters the unit that owns ``name`` and
    returns the full tensor; ``follow(name)`` (the other ranks) takes part in the same gathers.
    The owning unit's weight quantizers hold their full block amaxes while it is entered.
    """

    def __init__(self, model: nn.Module, comm: Comm):
        self.model, self.comm = model, comm
        self.units = [(f"{n}.", m) for n, m in decoder_layers(model)]
        self.quant = {}
        for pname, src in quant_sources(model)[0].items():
            n = model.get_parameter(pname).shape[0]  # the global shape: the weight's rows (or experts)
            self.quant.setdefault(self._unit(pname), []).append((src.weight, n))
        self.current: nn.Module | None = None
        self.saved: list = []

    def _unit(self, name: str) -> nn.Module:
        for prefix, m in self.units:
            if name.startswith(prefix):
                return m
        return self.model

    def follow(self, name: str | None) -> None:
        if name is None:
            return
        unit = self._unit(name)
        if unit is self.current:
            return
        self.leave()
        unit.unshard()
        for wq, n in self.quant.get(unit, []):
            self.saved.append((wq, wq.block_amax, wq.rows))
            wq.block_amax, wq.rows = self.comm.gather_rows(wq.block_amax, n), None
        self.current = unit

    def tensor(self, name: str) -> torch.Tensor:
        """The full tensor; a CPU one is copied (file writer threads may still read it after the reshard)."""
        self.follow(name)
        try:
            t = self.model.get_parameter(name).detach()
        except AttributeError:
            t = self.model.get_buffer(name).detach()
        return t if t.is_cuda else t.clone()

    def close(self) -> None:
        self.leave()

    def leave(self) -> None:
        if self.current is None:
            return
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()  # pending copies out of the unsharded weights
        for wq, blk, r in self.saved:
            wq.block_amax, wq.rows = blk, r
            wq.clear_cache()
        self.saved = []
        self.current.reshard()
        self.current = None
