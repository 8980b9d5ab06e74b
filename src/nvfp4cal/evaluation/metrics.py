"""Quality measurements: held-out perplexity and per-weight quantization error.

* perplexity = exp(mean next-token cross-entropy) over the held-out batches, with the quantizers
  in one mode (``off`` = the original model, ``quant`` = what the export computes).
* weight SQNR (dB) = 10 log10(sum w^2 / sum (w - fq(w))^2); relative MSE = sum (w - fq(w))^2 / sum w^2,
  for every NVFP4 weight (all experts of a fused parameter together). On a GPU one Triton pass
  computes both sums (:func:`kernels.fp8_sweep.block_sqerr_triton`); elsewhere torch does.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn

from ..model.quantizers import set_mode
from ..model.view import weight_quantizers
from ..numerics.comm import RunContext, local
from ..numerics.nvfp4 import block_steps, row_chunks

NLL_CHUNK = 1024  # positions per fp32 log-softmax in token_nll (a 50k vocabulary: 200 MB)


@torch.no_grad()
def token_nll(model: nn.Module, batches: Iterable[dict], mode: str) -> torch.Tensor:
    """``-log q_t(y_t)`` of every predicted token (each row's positions but the last, rows in batch order),
    fp32 on the CPU, with every quantizer in ``mode`` (from an fp32 log-softmax, as
    :class:`..compare.Comparison` takes the quantized side); the model is left in mode ``off``.
    The held-out perplexity is ``exp(mean_t nll_t)``."""
    device = next(model.parameters()).device
    set_mode(model, mode)
    out = []
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            flat = logits[:, :-1].reshape(-1, logits.shape[-1])
            y = ids[:, 1:].reshape(-1, 1)
            for i in range(0, y.shape[0], NLL_CHUNK):  # a large vocabulary: a few positions' fp32 at a time
                part = torch.log_softmax(flat[i : i + NLL_CHUNK].float(), -1)
                out.append(part.gather(-1, y[i : i + NLL_CHUNK]).squeeze(-1).neg().cpu())
    finally:
        set_mode(model, "off")
    return torch.cat(out) if out else torch.zeros(0)


def perplexity_of(nll: torch.Tensor) -> float:
    """``exp(mean_t nll_t)`` (fp64 sum), nan without tokens."""
    return math.exp(float(nll.double().mean())) if nll.numel() else float("nan")


@torch.no_grad()
def weight_errors(model: nn.Module, ctx: RunContext, keep: bool = False) -> dict[str, dict[str, float]]:
    """{weight name: {sqnr_db, rel_mse}} under the quantizers' current block amaxes.

    ``keep=True`` leaves each fake-quant weight cached for a following ``quant``-mode forward.
    """
    sums = {}
    fused = None if keep else _fused_sqerr()
    items = weight_quantizers(model)
    for name, wq, w in items:
        w = local(w)  # a sharded run: this rank's rows; the sums are added up across ranks below
        if not w.numel():
            sums[name] = (0.0, 0.0)
        elif fused is not None and w.is_cuda:  # one Triton pass, no fake-quant copy
            s2 = wq.scale_2_bcast(w.device)
            sums[name] = fused(w, block_steps(wq.block_amax.to(w.device), s2))
        else:
            fq = wq.quantized(w) if keep else wq.fake_quant(w)
            err = sig = 0.0
            for c in row_chunks(w):  # bounded fp32 temporaries for large fused weights
                w32 = w[c].detach().float()
                err += float((fq[c].float() - w32).pow_(2).sum())  # fp32 per chunk, summed in double
                sig += float(w32.pow(2).sum())  # not in place: w32 may be the weight itself
            del fq
            sums[name] = (err, sig)
    if ctx.sharded:  # each rank summed its own rows
        flat = ctx.comm.sum_floats([float(v) for e in sums.values() for v in e], ctx.device)
        sums = {n: (flat[2 * i], flat[2 * i + 1]) for i, n in enumerate(sums)}
    out = {}
    for name, (err, sig) in sums.items():
        rel = err / sig if sig > 0 else 0.0
        out[name] = {"sqnr_db": 10 * math.log10(sig / err) if err > 0 else float("inf"), "rel_mse": rel}
    return out


def _fused_sqerr():
    """The Triton squared-error kernel, or None without a GPU / Triton (then torch computes it)."""
    if not torch.cuda.is_available():
        return None
    try:
        from ..numerics.kernels.fp8_sweep import block_sqerr_triton
    except ImportError:
        return None
    return block_sqerr_triton


def peak_memory_gib(device: torch.device | None = None) -> dict[str, float]:
    """Peak resident memory of this process so far (CPU) and, on CUDA, the peak allocated since the last reset."""
    out = {"cpu_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device is not None and device.type == "cuda":
        out["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


_ACTIVE: list[str] = []  # the stages running now, outermost first


def current_stage() -> str | None:
    """The innermost stage running now (what a stop message names)."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextmanager
def stage(stats: dict, name: str, device: torch.device | None = None):
    """Record a stage's wall time and peak memory into ``stats[name]``."""
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    _ACTIVE.append(name)
    try:
        yield
    finally:
        _ACTIVE.pop()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        stats[name] = {"seconds": round(time.perf_counter() - t0, 3), **peak_memory_gib(device)}
