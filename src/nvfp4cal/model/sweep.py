"""MSE sweep driver: walks every NVFP4 weight quantizer and replaces its block amaxes.

For each weight (each expert of fused experts separately) with global amax ``g``, the block amax
becomes the best of the 126 FP8 candidates ``c_k * g`` (see :mod:`nvfp4cal.numerics.mse`). On CUDA tensors
the Triton kernel is used when available; elsewhere, or with ``recipe.algorithm.kernel=reference``,
the torch reference (both choose the same codes: a test holds them bit-identical).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..numerics.comm import RunContext, local
from ..numerics.errors import UserError
from ..numerics.hessian import hessian_amax_reference
from ..numerics.mse import mse_amax_reference
from .quantizers import InputQuantizer, WeightQuantizer
from .view import weight_inputs, weight_quantizers

log = logging.getLogger("nvfp4cal")
KERNELS = ("auto", "reference", "triton")  # recipe.algorithm.kernel
SweepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def triton_or_reference(kernel: str, device: torch.device, load: Callable[[], Callable]) -> Callable | None:
    """``recipe.algorithm.kernel``'s implementation for tensors on ``device``: the Triton one ``load()``
    imports, or None for the torch reference (``reference``; ``auto`` off CUDA or without Triton)."""
    if kernel == "reference" or (kernel == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError("recipe.algorithm.kernel=triton needs the weights on a CUDA device (trainer=gpu)")
    try:
        return load()
    except ImportError as err:  # no usable triton: the reference computes the same choices
        if kernel == "triton":
            raise UserError(f"recipe.algorithm.kernel=triton asked for but Triton is unavailable: {err}") from err
        return None


def _sweep_kernel() -> SweepFn:
    from ..numerics.kernels.fp8_sweep import mse_amax_triton

    return mse_amax_triton


def choose_sweep(kernel: str, device: torch.device) -> tuple[str, SweepFn]:
    """(name, fn) of the implementation for weights on ``device``."""
    fn = triton_or_reference(kernel, device, _sweep_kernel)
    return ("reference", mse_amax_reference) if fn is None else ("triton", fn)


def warm_up(kernel: str, dtype: torch.dtype, device: torch.device) -> threading.Thread | None:
    """Compile (or load from Triton's cache) the sweep kernel in a background thread.

    Started before the model loads, so the JIT (seconds on a fresh machine) overlaps loading and
    calibration instead of delaying the sweep. A tiny launch with every size a multiple of 16
    gets the same specialization as real weights. Failures are left to the real call to report.
    """
    if kernel == "reference" or device.type != "cuda":
        return None

    def run():
        try:
            from ..numerics.kernels.fp8_sweep import mse_amax_triton

            torch.cuda.set_device(device)  # per thread: Triton launches on the current device
            # no random numbers: this runs beside the model's (seeded) initialization
            x = torch.linspace(-1, 1, 16 * 16 * 16, device=device).reshape(16, 16, 16).to(dtype)
            mse_amax_triton(x, x.float().abs().reshape(16, -1).amax(-1))
            torch.cuda.synchronize()
        except Exception as err:  # noqa: BLE001 (the sweep itself will raise it properly)
            log.debug("sweep kernel warm-up failed: %s", err)

    t = threading.Thread(target=run, name="nvfp4cal-kernel-warm-up", daemon=True)
    t.start()
    return t


def _hessian_blocks(wq: WeightQuantizer, iq: InputQuantizer, flat_w: torch.Tensor, g: torch.Tensor, name: str,
                    plain: tuple[str, SweepFn], fallback: list[str]) -> tuple[str, torch.Tensor]:  # fmt: skip
    """(implementation, Hessian-weighted choices [E, blocks]) for the experts (or the one matrix) of a
    weight. Experts whose input saw no token, and column blocks whose Hessian is zero, keep the
    plain sweep's choices (``plain``: its implementation for this device); such experts are listed
    in ``fallback``."""
    n = flat_w.shape[0]
    first = wq.rows[0] if wq.rows is not None and wq.block_amax.dim() > 2 else 0  # this rank's experts
    per_expert = iq.hessian.shape[0] > 1
    idx = [first + e if per_expert else 0 for e in range(n)]
    dead = [e for e in range(n) if int(iq.seen[idx[e]]) == 0]
    fallback += [f"{name}[{idx[e]}]" if per_expert else name for e in dead]
    plain_impl, plain_fn = plain
    if plain_impl == "triton":
        from ..numerics.kernels.hessian_sweep import hessian_amax_triton

        h = iq.block_hessians(idx).to(flat_w.device)
        out = hessian_amax_triton(flat_w, g, h).reshape(n, flat_w.shape[1], -1)
        plain_cols = (h.flatten(2) == 0).all(-1)[:, None, :].expand_as(out).clone()  # [E, out, nb]
        plain_cols[dead] = True
        if bool(plain_cols.any()):
            plain = plain_fn(flat_w, g).reshape(out.shape)
            out = torch.where(plain_cols, plain, out)
        return "hessian_triton", out.reshape(n, -1)
    out = torch.empty_like(wq.block_amax).reshape(n, -1)
    for e in range(n):
        if e in dead:
            out[e] = mse_amax_reference(flat_w[e], g[e])
        else:
            out[e] = hessian_amax_reference(flat_w[e], g[e], iq.block_hessians([idx[e]])[0].to(flat_w.device))
    return "hessian_reference", out


IMATRIX_FLOOR = 1e-6  # added to the normalised channel weights: a block whose inputs never fired keeps MSE


def _diag_blocks(wq: WeightQuantizer, iq: InputQuantizer, flat_w: torch.Tensor, g: torch.Tensor, name: str,
                 plain: tuple[str, SweepFn], fallback: list[str]) -> tuple[list[str], torch.Tensor]:  # fmt: skip
    """(implementations, imatrix-weighted choices [E, blocks]): each element's squared error weighted by
    its input channel's ``sum_t x_i^2`` (normalised to mean 1, plus ``IMATRIX_FLOOR``); experts whose
    input saw no token keep the plain sweep's choices (``plain``: its implementation for this device,
    Triton on a GPU) and are listed in ``fallback``."""
    n = flat_w.shape[0]
    first = wq.rows[0] if wq.rows is not None and wq.block_amax.dim() > 2 else 0  # this rank's experts
    per_expert = iq.hessian.shape[0] > 1
    out = torch.empty_like(wq.block_amax).reshape(n, -1)
    plain_impl, plain_fn = plain
    dead, live, weights = [], [], []
    for e in range(n):
        i = first + e if per_expert else 0
        h = iq.hessian[i].to(device=flat_w.device, dtype=torch.float32)
        if int(iq.seen[i]) == 0 or not bool((h > 0).any()):
            fallback.append(f"{name}[{i}]" if per_expert else name)
            dead.append(e)
        else:
            live.append(e)
            weights.append(h / h.mean() + IMATRIX_FLOOR)
    impls = []
    if live and plain_impl == "triton":  # one launch for the live experts of the weight
        from ..numerics.kernels.fp8_sweep import mse_amax_triton

        w_live = flat_w if len(live) == n else flat_w[live]
        out[live] = mse_amax_triton(w_live, g[live], weights=torch.stack(weights)).reshape(len(live), -1)
        impls.append("imatrix_triton")
    elif live:
        for e, wts in zip(live, weights, strict=True):
            out[e] = mse_amax_reference(flat_w[e], g[e], weights=wts)
        impls.append("imatrix_reference")
    if dead:
        impls.append(plain_impl)
        if plain_impl == "triton":  # one launch for the dead experts of the weight
            out[dead] = plain_fn(flat_w[dead], g[dead]).reshape(len(dead), -1)
        else:
            for e in dead:
                out[e] = plain_fn(flat_w[e], g[e])
    return impls, out


@torch.no_grad()
def mse_sweep(model: nn.Module, ctx: RunContext, kernel: str = "auto", hessian: bool = False,
              diag: bool = False) -> dict:  # fmt: skip
    """Run the FP8-scale sweep over every NVFP4 weight; returns {'kernel', 'weights', 'blocks'}.

    ``diag=True``: each element's error weighted by its input channel's mean square activation (the
    diagonal of the Hessian, llama.cpp's importance matrix; the Triton kernel where the plain sweep would
    use Triton, with the same choices as the torch reference).
    ``hessian=True``: each block's error is weighted by its input Hessian (:mod:`nvfp4cal.numerics.hessian`,
    collected during calibration; the Triton kernel where the plain sweep would use Triton, else the
    torch reference), ``'fallback'`` lists the experts that got no token and kept the plain choices.

    In a data-parallel run each rank sweeps its share of the weights (:meth:`RunContext.split`: equal
    numbers of blocks) and broadcasts its results, so every rank ends with the same block amaxes and
    N ranks sweep about N times faster. Where each rank holds rows of every weight (``trainer=fsdp``)
    every rank sweeps its own rows: blocks are independent.
    """
    items = weight_quantizers(model)
    rank, world, sharded = ctx.rank, ctx.world, ctx.sharded
    owner = [rank] * len(items) if sharded else ctx.split([wq.block_amax.numel() for _, wq, _ in items])
    mine = [it for it, r in zip(items, owner, strict=True) if r == rank]
    used, blocks, fallback = set(), 0, []
    inputs = {n: q.hessian_holder() for n, q in weight_inputs(model).items()} if hessian or diag else {}
    desc = "Hessian-weighted sweep" if hessian else "imatrix sweep" if diag else "MSE sweep"
    for name, wq, w in tqdm(mine, desc=desc, unit="weight", disable=not ctx.progress):
        w = local(w)
        if not w.numel():  # a rank without rows of this weight
            continue
        lead = w.shape[:-2]
        flat_w = w.detach().reshape(-1, *w.shape[-2:])
        g = wq.local_global_amax().reshape(-1)
        impl, fn = choose_sweep(kernel, w.device)
        if diag:
            impls, out = _diag_blocks(wq, inputs[name], flat_w, g, name, (impl, fn), fallback)
            impl = impls.pop()
            used.update(impls)
        elif hessian:
            impl, out = _hessian_blocks(wq, inputs[name], flat_w, g, name, (impl, fn), fallback)
        elif impl == "triton":  # one launch for all experts of the weight
            out = fn(flat_w, g).reshape(flat_w.shape[0], -1)
        else:
            out = torch.empty_like(wq.block_amax).reshape(flat_w.shape[0], -1)
            for e in range(flat_w.shape[0]):
                out[e] = fn(flat_w[e], g[e])
        used.add(impl)
        wq.block_amax.copy_(out.reshape(*lead, *wq.block_amax.shape[-2:]))
        wq.clear_cache()
        blocks += out.numel()
    if world > 1 and not sharded:
        for (_name, wq, _w), src in zip(items, owner, strict=True):
            ctx.comm.broadcast_(wq.block_amax, src)
            wq.clear_cache()
    if world > 1:
        gathered = ctx.comm.gather_objects((sorted(used), blocks, fallback))
        used = {k for u, _, _ in gathered for k in u}
        blocks = sum(b for _, b, _ in gathered)
        fallback = sorted({f for _, _, fb in gathered for f in fb})
    for q in inputs.values():
        if not q.full_hessian:  # a full Hessian is GPTQ's, which runs next and frees it
            q.hessian = None  # [in/16, 16, 16] per weight (and expert): free it before the export
    out = {"kernel": sorted(used), "weights": len(items), "blocks": blocks, "ranks": world}
    if hessian or diag:
        out["method"], out["fallback"] = ("imatrix_mse" if diag else "hessian_mse"), fallback
    return out
