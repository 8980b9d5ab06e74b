"""The GPTQ step: rounds every NVFP4 weight with :func:`nvfp4cal.numerics.gptq.gptq_round` under its input Hessian
(Linears that read one input - q/k/v, gate/up - share one Hessian and one pass over the columns).

Each weight (each expert of fused experts) gets ``Q = gptq_round(W, H, steps)`` with its fixed block
steps (the experts of one weight rounded together, one pass over the columns for all), and ``W`` is
replaced by ``Q`` in place: the export then packs GPTQ's codes, and quant mode
computes with them. Experts (or Linears) whose input saw fewer than ``min_tokens`` rows keep plain
rounding (``Q = fake_quant(W)``) and are listed. Across data-parallel ranks the weights are split
like the sweep's (the Hessians were summed first) and each result is broadcast from its owner. On CUDA
(``recipe.algorithm.kernel``: auto or triton) each group of ``block_columns`` columns is one launch of
:mod:`nvfp4cal.numerics.kernels.gptq` instead of a Python loop over its columns (the same codes).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from tqdm.auto import tqdm

from ..numerics.comm import RunContext
from ..numerics.gptq import gptq_round, hessian_error
from ..numerics.nvfp4 import BLOCK, block_steps, round_to_step, scale_2
from .sweep import triton_or_reference
from .view import weight_inputs, weight_quantizers

log = logging.getLogger("nvfp4cal")
EXPERTS_PER_PASS_BYTES = 1 << 30  # experts rounded together: their fp32 Hessians (and factors) up to ~1 GiB


def _columns_kernel():
    from ..numerics.kernels.gptq import gptq_columns_triton

    return gptq_columns_triton


class ColumnLoop:
    """GPTQ's column loop for one run: the Triton kernel (``recipe.algorithm.kernel``: auto on CUDA, triton)
    or None for the torch loop. Under ``auto`` a kernel that fails its first (tiny) launch falls back to the
    torch loop, which gives the same codes, with one warning."""

    def __init__(self, kernel: str):
        self.kernel, self.chosen = kernel, {}

    def __call__(self, device: torch.device):
        if device not in self.chosen:
            fn = triton_or_reference(self.kernel, device, _columns_kernel)
            if fn is not None and self.kernel == "auto":
                try:  # compile once on a tiny problem
                    w = torch.zeros(1, 1, BLOCK, device=device)
                    fn(w, torch.eye(BLOCK, device=device)[None], torch.ones_like(w), w[:, 0], w.clone(), 0)
                except Exception as err:  # noqa: BLE001 (the torch loop gives the same codes)
                    log.warning("GPTQ column kernel unavailable (%s); using the torch loop", str(err).splitlines()[0])
                    fn = None
            self.chosen[device] = fn
        return self.chosen[device]


def _round_group(members: list[tuple[str, torch.Tensor, object]], iq, params, fallback: list[str],
                 columns: ColumnLoop) -> dict:  # fmt: skip
    """GPTQ-round in place the weights ``members`` = [(name, flat [E, out, in], weight quantizer)] that share
    the Hessian of ``iq``: one weight (its experts with enough tokens together, in passes of at most
    ``EXPERTS_PER_PASS_BYTES`` of Hessians; the others keep plain rounding), or Linears that read one input
    (q/k/v, gate/up) stacked by rows into one pass - GPTQ treats rows independently under one Hessian, so
    each gets what it gets alone, up to the matmuls' summation order. Returns each member's figures."""
    flats = [f for _, f, _ in members]
    flat = flats[0] if len(members) == 1 else torch.cat(flats, dim=1)  # [E, rows of all members, in]
    n, dev = flat.shape[0], flat.device
    gs = [wq.global_amax.reshape(-1) for _, _, wq in members]
    blks = [wq.block_amax.reshape(n, f.shape[1], -1) for _, f, wq in members]
    per_expert = iq.hessian.shape[0] > 1
    live = [e for e in range(n) if int(iq.seen[e if per_expert else 0]) >= params.min_tokens]
    fallback += [f"{name}[{e}]" if n > 1 else name for name, _, _ in members for e in range(n) if e not in live]
    bounds = [0]
    for f in flats:
        bounds.append(bounds[-1] + f.shape[1])
    in_f = flat.shape[-1]
    per_pass = max(1, EXPERTS_PER_PASS_BYTES // (in_f * in_f * 4))
    sums = [dict.fromkeys(("err", "sig", "h_gptq", "h_rtn"), 0.0) for _ in members]
    for start in range(0, n, per_pass):
        chunk = list(range(start, min(start + per_pass, n)))
        idx = chunk if per_expert else [0] * len(chunk)
        steps = torch.stack([torch.cat([block_steps(b[e].to(dev), scale_2(g[e]).to(dev)) for b, g in zip(blks, gs, strict=True)])
                             for e in chunk])  # fmt: skip
        orig = flat[chunk].float()
        h = iq.hessian[idx].to(dev)
        plain = round_to_step(orig, steps.repeat_interleave(BLOCK, dim=-1))
        q = plain.clone()
        rows = [i for i, e in enumerate(chunk) if e in live]
        if rows:
            q[rows] = gptq_round(orig[rows], h[rows], steps[rows], params.dampening, params.block_columns,
                                 params.act_order, columns(dev))  # fmt: skip
        for m, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            o, qm, pm = orig[:, a:b], q[:, a:b], plain[:, a:b]
            sums[m]["h_gptq"] += hessian_error(o, qm, h)
            sums[m]["h_rtn"] += hessian_error(o, pm, h)
            sums[m]["err"] += float((o.double() - qm.double()).pow(2).sum())
            sums[m]["sig"] += float(o.double().pow(2).sum())
            flats[m][chunk] = qm.to(flats[m].dtype)
    return {
        name: {
            "sqnr_db": 10 * math.log10(x["sig"] / x["err"]) if x["err"] > 0 else float("inf"),
            "rel_mse": x["err"] / x["sig"] if x["sig"] > 0 else 0.0,
            "hessian_error_vs_rtn": x["h_gptq"] / x["h_rtn"] if x["h_rtn"] > 0 else 1.0,
        }
        for (name, _, _), x in zip(members, sums, strict=True)
    }


def _groups(items: list, inputs: dict) -> list[list[int]]:
    """Indices of ``items`` rounded in one pass: Linears by the input quantizer that holds their Hessian
    (siblings that share one together, in their order; any other Linear alone), every fused-experts weight alone."""
    groups, by_holder = [], {}
    for i, (name, _, w) in enumerate(items):
        key = id(inputs[name].hessian_holder()) if w.dim() == 2 else None
        if key is not None and key in by_holder:
            by_holder[key].append(i)
            continue
        groups.append([i])
        if key is not None:
            by_holder[key] = groups[-1]
    return groups


@torch.no_grad()
def gptq_weights(model: nn.Module, ctx: RunContext, params) -> tuple[dict, dict]:
    """(summary, per-weight {sqnr_db, rel_mse, hessian_error_vs_rtn}) after rounding every weight."""
    if ctx.sharded:
        raise ValueError("GPTQ needs whole weights on each rank (calibration=layerwise, trainer=gpu or ddp)")
    items = weight_quantizers(model)
    inputs = weight_inputs(model)
    groups = _groups(items, inputs)
    owner = ctx.split([sum(items[i][2].numel() for i in g) for g in groups])
    fallback, per_weight, columns = [], {}, ColumnLoop(params.kernel)
    for group, rank in tqdm(list(zip(groups, owner, strict=True)), desc="GPTQ", unit="pass",
                            disable=not ctx.progress):  # fmt: skip
        # [E, out, in] (a Linear: E = 1); views of the parameters
        members = [(items[i][0], items[i][2].reshape(-1, *items[i][2].shape[-2:]), items[i][1]) for i in group]
        if rank == ctx.rank:
            holder = inputs[members[0][0]].hessian_holder()
            per_weight.update(_round_group(members, holder, params, fallback, columns))
        for i in group:
            _, wq, w = items[i]
            if ctx.world > 1:  # every rank takes the owner's rounded weight
                buf = w.detach().contiguous()
                ctx.comm.broadcast_(buf, rank)
                w.copy_(buf)
            wq.clear_cache()
    for q in inputs.values():
        q.hessian = None  # [in, in] per weight (and expert): free it
    if ctx.world > 1:
        gathered = ctx.comm.gather_objects((per_weight, fallback))
        per_weight = {k: v for pw, _ in gathered for k, v in pw.items()}
        fallback = sorted({f for _, fb in gathered for f in fb})
    ratios = [v["hessian_error_vs_rtn"] for v in per_weight.values()]
    summary = {"weights": len(items), "fallback": sorted(fallback),
               "hessian_error_vs_rtn_mean": sum(ratios) / len(ratios) if ratios else None}  # fmt: skip
    return summary, per_weight
