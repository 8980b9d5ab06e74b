"""The GPTQ step: rounds every NVFP4 weight with :func:`nvfp4cal.numerics.gptq.gptq_round` under its input Hessian.

Each weight (each expert of fused experts) gets ``Q = gptq_round(W, H, steps)`` with its fixed block
steps (the experts of one weight rounded together, one pass over the columns for all), and ``W`` is
replaced by ``Q`` in place: the export then packs GPTQ's codes, and quant mode
computes with them. Experts (or Linears) whose input saw fewer than ``min_tokens`` rows keep plain
rounding (``Q = fake_quant(W)``) and are listed. Across data-parallel ranks the weights are split
like the sweep's (the Hessians were summed first) and each result is broadcast from its owner.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from ..numerics.comm import RunContext
from ..numerics.gptq import gptq_round, hessian_error, round_to_grid
from ..numerics.nvfp4 import BLOCK, block_steps, scale_2
from .view import weight_inputs, weight_quantizers

EXPERTS_PER_PASS_BYTES = 1 << 30  # experts rounded together: their fp32 Hessians (and factors) up to ~1 GiB


def _round_weight(name: str, flat: torch.Tensor, wq, iq, params, fallback: list[str]) -> dict:
    """GPTQ-round ``flat`` [E, out, in] in place, the experts with enough tokens together (in passes
    of at most ``EXPERTS_PER_PASS_BYTES`` of Hessians); the others keep plain rounding."""
    n, dev = flat.shape[0], flat.device
    g = wq.global_amax.reshape(-1)
    blk = wq.block_amax.reshape(n, flat.shape[1], -1)
    per_expert = iq.hessian.shape[0] > 1
    live = [e for e in range(n) if int(iq.seen[e if per_expert else 0]) >= params.min_tokens]
    fallback += [f"{name}[{e}]" if n > 1 else name for e in range(n) if e not in live]
    in_f = flat.shape[-1]
    per_pass = max(1, EXPERTS_PER_PASS_BYTES // (in_f * in_f * 4))
    err = sig = h_gptq = h_rtn = 0.0
    for start in range(0, n, per_pass):
        chunk = list(range(start, min(start + per_pass, n)))
        idx = chunk if per_expert else [0] * len(chunk)
        steps = torch.stack([block_steps(blk[e].to(dev), scale_2(g[e]).to(dev)) for e in chunk])
        orig = flat[chunk].float()
        h = iq.hessian[idx].to(dev)
        plain = round_to_grid(orig, steps.repeat_interleave(BLOCK, dim=-1))
        q = plain.clone()
        rows = [i for i, e in enumerate(chunk) if e in live]
        if rows:
            q[rows] = gptq_round(orig[rows], h[rows], steps[rows], params.dampening, params.block_columns,
                                 params.act_order)  # fmt: skip
        h_gptq += hessian_error(orig, q, h)
        h_rtn += hessian_error(orig, plain, h)
        err += float((orig.double() - q.double()).pow(2).sum())
        sig += float(orig.double().pow(2).sum())
        flat[chunk] = q.to(flat.dtype)
    return {
        "sqnr_db": 10 * math.log10(sig / err) if err > 0 else float("inf"),
        "rel_mse": err / sig if sig > 0 else 0.0,
        "hessian_error_vs_rtn": h_gptq / h_rtn if h_rtn > 0 else 1.0,
    }


@torch.no_grad()
def gptq_weights(model: nn.Module, ctx: RunContext, params) -> tuple[dict, dict]:
    """(summary, per-weight {sqnr_db, rel_mse, hessian_error_vs_rtn}) after rounding every weight."""
    if ctx.sharded:
        raise ValueError("GPTQ needs whole weights on each rank (calibration=layerwise, trainer=gpu or ddp)")
    items = weight_quantizers(model)
    inputs = weight_inputs(model)
    owner = ctx.split([w.numel() for _, _, w in items])
    fallback, per_weight = [], {}
    for (name, wq, w), rank in tqdm(list(zip(items, owner, strict=True)), desc="GPTQ", unit="weight",
                                    disable=not ctx.progress):  # fmt: skip
        iq = inputs[name]
        flat = w.reshape(-1, *w.shape[-2:])  # [E, out, in] (a Linear: E = 1); a view of the parameter
        if rank == ctx.rank:
            per_weight[name] = _round_weight(name, flat, wq, iq, params, fallback)
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
