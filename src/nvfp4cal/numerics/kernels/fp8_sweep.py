"""FP8-scale MSE sweep in Triton: a baseline over all 126 candidates and the fast pruned kernel.

Both compute the objective of :mod:`nvfp4cal.numerics.mse` with the same fp32 operations in the same
order, so their choices equal the torch reference bit for bit:

* ``y = |x| * r_k``, ``q = e2m1(y)`` by magic-number rounding (``(y + M) - M`` rounds to the grid
  spacing ``h`` of y's binade, ties to even; ``M = 1.5 * 2^23 * h``, ``h = 0.5 | 1 | 2``, then
  ``min(q, 6)``), ``d = |x| - q * s_k``, ``err = tree_sum(d * d)`` with the pairwise tree
  ((e0+e1)+(e2+e3))+... written out with reshape/split.
* Launched with ``enable_fp_fusion=False``: no multiply-add contraction (torch does none either).

Each program holds ``BLOCK_B`` blocks of 16 elements. The fast kernel evaluates a window of
``WINDOW`` candidates just below ``K_top`` (fact 1 of :mod:`nvfp4cal.numerics.mse`), then keeps going down
one candidate at a time only in blocks whose clipping lower bound (fact 2) does not exclude the
rest; blocks near the subnormal floor start from the top candidate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..mse import WINDOW
from ..nvfp4 import FP4_MAX, div, fp8_candidates, rdiv


@triton.jit
def _e2m1(y):
    h = tl.where(y < 2.0, 0.5, tl.where(y < 4.0, 1.0, 2.0))
    m = h * 12582912.0  # 1.5 * 2^23 * h
    q = (y + m) - m
    return tl.minimum(q, 6.0)


@triton.jit
def _tree_sum16(e, BLOCK_B: tl.constexpr):
    e = tl.reshape(e, (BLOCK_B, 8, 2))
    a, b = tl.split(e)
    e = tl.reshape(a + b, (BLOCK_B, 4, 2))
    a, b = tl.split(e)
    e = tl.reshape(a + b, (BLOCK_B, 2, 2))
    a, b = tl.split(e)
    e = tl.reshape(a + b, (BLOCK_B, 1, 2))
    a, b = tl.split(e)
    return tl.reshape(a + b, (BLOCK_B,))


@triton.jit
def _err(ax, s, r, BLOCK_B: tl.constexpr):
    """ax [B, 16], s and r [B] -> err [B]."""
    y = ax * r[:, None]
    d = ax - _e2m1(y) * s[:, None]
    return _tree_sum16(d * d, BLOCK_B)


@triton.jit
def _bound(ax, s, BLOCK_B: tl.constexpr):
    d = tl.maximum(ax - (6.0 * s)[:, None], 0.0)
    return _tree_sum16(d * d, BLOCK_B)


@triton.jit
def _load(x_ptr, n_blocks, BLOCK_B: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = rows < n_blocks
    cols = tl.arange(0, 16)
    x = tl.load(x_ptr + rows[:, None] * 16 + cols[None, :], mask=mask[:, None], other=0.0)
    return rows, mask, tl.abs(x.to(tl.float32))


@triton.jit
def mse_sweep_baseline_kernel(x_ptr, out_ptr, amax_ptr, s_ptr, r_ptr, n_blocks, BLOCK_B: tl.constexpr):
    """All 126 candidates for every block (the straightforward fused kernel)."""
    rows, mask, ax = _load(x_ptr, n_blocks, BLOCK_B)
    best = tl.full((BLOCK_B,), float("inf"), tl.float32)
    best_k = tl.zeros((BLOCK_B,), tl.int32)
    for k in range(0, 126):
        s = tl.load(s_ptr + k + tl.zeros((BLOCK_B,), tl.int32))
        r = tl.load(r_ptr + k + tl.zeros((BLOCK_B,), tl.int32))
        e = _err(ax, s, r, BLOCK_B)
        take = e < best  # ascending k: strict, so ties keep the smallest k
        best = tl.where(take, e, best)
        best_k = tl.where(take, k, best_k)
    tl.store(out_ptr + rows, tl.load(amax_ptr + best_k), mask=mask)


@triton.jit
def _sq(x, s, r, h, W: tl.constexpr):
    """(x - e2m1(x * r) * s)^2 for one element per lane (the same ops as :func:`_err`), times the element's
    weight ``h`` where ``W`` (the imatrix objective's ``(d * d) * h``)."""
    y = x * r
    m = tl.where(y < 2.0, 6291456.0, tl.where(y < 4.0, 12582912.0, 25165824.0))
    d = x - tl.minimum((y + m) - m, 6.0) * s
    e = d * d
    if W:
        e = e * h
    return e


@triton.jit
def _err16(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
           h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, h11, h12, h13, h14, h15, s, r, W: tl.constexpr):  # fmt: skip
    """err of a block held as 16 per-lane values (weights ``h`` where ``W``), summed in the pairwise tree."""
    a = (_sq(x0, s, r, h0, W) + _sq(x1, s, r, h1, W)) + (_sq(x2, s, r, h2, W) + _sq(x3, s, r, h3, W))
    b = (_sq(x4, s, r, h4, W) + _sq(x5, s, r, h5, W)) + (_sq(x6, s, r, h6, W) + _sq(x7, s, r, h7, W))
    c = (_sq(x8, s, r, h8, W) + _sq(x9, s, r, h9, W)) + (_sq(x10, s, r, h10, W) + _sq(x11, s, r, h11, W))
    d = (_sq(x12, s, r, h12, W) + _sq(x13, s, r, h13, W)) + (_sq(x14, s, r, h14, W) + _sq(x15, s, r, h15, W))
    return (a + b) + (c + d)


@triton.jit
def _cl(x, c6, h, W: tl.constexpr):
    d = tl.maximum(x - c6, 0.0)
    e = d * d
    if W:
        e = e * h
    return e


@triton.jit
def _bound16(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
             h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, h11, h12, h13, h14, h15, s, W: tl.constexpr):  # fmt: skip
    """Clipping lower bound at scale s: the tree sum of max(0, x - 6 s)^2 (times the weights where ``W``)."""
    c6 = 6.0 * s
    a = (_cl(x0, c6, h0, W) + _cl(x1, c6, h1, W)) + (_cl(x2, c6, h2, W) + _cl(x3, c6, h3, W))
    b = (_cl(x4, c6, h4, W) + _cl(x5, c6, h5, W)) + (_cl(x6, c6, h6, W) + _cl(x7, c6, h7, W))
    c = (_cl(x8, c6, h8, W) + _cl(x9, c6, h9, W)) + (_cl(x10, c6, h10, W) + _cl(x11, c6, h11, W))
    d = (_cl(x12, c6, h12, W) + _cl(x13, c6, h13, W)) + (_cl(x14, c6, h14, W) + _cl(x15, c6, h15, W))
    return (a + b) + (c + d)


@triton.jit
def _wcol(w_ptr, cols, mask, j: tl.constexpr, W: tl.constexpr, x):
    """Weight of element ``j`` of each lane's block (its input channel's); ``x`` (unused) where not ``W``."""
    if W:
        return tl.load(w_ptr + cols + j, mask=mask, other=0.0)
    else:
        return x


@triton.jit
def _col(x_ptr, rows, mask, j: tl.constexpr):
    return tl.abs(tl.load(x_ptr + rows * 16 + j, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _above(a, r_ptr, k):
    """P(k) = fl(a * r_k) > 3, with P = true below k = 0 and false above k = 125."""
    p = a * tl.load(r_ptr + tl.minimum(tl.maximum(k, 0), 125)) > 3.0
    return tl.where(k < 0, True, tl.where(k > 125, False, p))


@triton.jit
def _k_top(a, r_ptr, inv_g, mask, BLOCK_B: tl.constexpr):
    """K_top = max{k : fl(a * r_k) > 3} per lane (-1 where none): estimated from the bits of
    t = a * 896 / g (the candidate index of the largest E4M3 value <= t), then settled exactly on
    k_est - 2 .. k_est + 2; a program where the estimate is off by more than 2 counts exactly."""
    t = tl.minimum(a * inv_g, 448.0)
    bits = t.to(tl.int32, bitcast=True)
    k_est = tl.where(t > 0.0, ((bits >> 23) - 120) * 8 + ((bits >> 20) & 7) - 1, -1)
    k_est = tl.minimum(tl.maximum(k_est, -1), 125)
    p0 = _above(a, r_ptr, k_est - 2)
    p4 = _above(a, r_ptr, k_est + 2)
    n_true = p0.to(tl.int32) + _above(a, r_ptr, k_est - 1).to(tl.int32) + _above(a, r_ptr, k_est).to(tl.int32)
    k_top = k_est - 3 + n_true + _above(a, r_ptr, k_est + 1).to(tl.int32) + p4.to(tl.int32)
    if tl.max((mask & (~p0 | p4)).to(tl.int32), axis=0) > 0:  # estimate off by more than 2: count exactly
        count = tl.zeros((BLOCK_B,), tl.int32)
        for k in range(0, 126):
            count += (a * tl.load(r_ptr + k) > 3.0).to(tl.int32)  # r_ptr: per lane or one table
        k_top = count - 1
    return k_top


@triton.jit
def mse_sweep_fast_kernel(
    x_ptr,
    out_ptr,
    amax_ptr,
    s_ptr,
    r_ptr,
    inv_ptr,
    w_ptr,
    n_blocks,
    blocks_per_expert,
    n_experts,
    nb,
    BLOCK_B: tl.constexpr,
    WINDOW: tl.constexpr,
    WEIGHTED: tl.constexpr,
):
    """Pruned sweep, one block of 16 per lane: window below K_top, then a walk down while the bound allows.
    ``WEIGHTED``: each element's error times its input channel's weight, ``w`` [E, nb * 16] fp32 (both
    pruning facts hold for weights >= 0, :func:`nvfp4cal.numerics.mse.mse_amax_reference`)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = rows < n_blocks
    expert = tl.minimum(rows // blocks_per_expert, n_experts - 1)  # each expert has its own g and tables
    amax_ptr += expert * 126
    s_ptr += expert * 126
    r_ptr += expert * 126
    x0, x1, x2, x3 = (
        _col(x_ptr, rows, mask, 0),
        _col(x_ptr, rows, mask, 1),
        _col(x_ptr, rows, mask, 2),
        _col(x_ptr, rows, mask, 3),
    )
    x4, x5, x6, x7 = (
        _col(x_ptr, rows, mask, 4),
        _col(x_ptr, rows, mask, 5),
        _col(x_ptr, rows, mask, 6),
        _col(x_ptr, rows, mask, 7),
    )
    x8, x9, x10, x11 = (
        _col(x_ptr, rows, mask, 8),
        _col(x_ptr, rows, mask, 9),
        _col(x_ptr, rows, mask, 10),
        _col(x_ptr, rows, mask, 11),
    )
    x12, x13, x14, x15 = (
        _col(x_ptr, rows, mask, 12),
        _col(x_ptr, rows, mask, 13),
        _col(x_ptr, rows, mask, 14),
        _col(x_ptr, rows, mask, 15),
    )
    a = tl.maximum(
        tl.maximum(tl.maximum(x0, x1), tl.maximum(x2, x3)), tl.maximum(tl.maximum(x4, x5), tl.maximum(x6, x7))
    )
    a = tl.maximum(
        a,
        tl.maximum(
            tl.maximum(tl.maximum(x8, x9), tl.maximum(x10, x11)), tl.maximum(tl.maximum(x12, x13), tl.maximum(x14, x15))
        ),
    )
    cols = expert * (nb * 16) + ((rows - expert * blocks_per_expert) % nb) * 16  # the lane's weights
    h0 = _wcol(w_ptr, cols, mask, 0, WEIGHTED, x0)
    h1 = _wcol(w_ptr, cols, mask, 1, WEIGHTED, x0)
    h2 = _wcol(w_ptr, cols, mask, 2, WEIGHTED, x0)
    h3 = _wcol(w_ptr, cols, mask, 3, WEIGHTED, x0)
    h4 = _wcol(w_ptr, cols, mask, 4, WEIGHTED, x0)
    h5 = _wcol(w_ptr, cols, mask, 5, WEIGHTED, x0)
    h6 = _wcol(w_ptr, cols, mask, 6, WEIGHTED, x0)
    h7 = _wcol(w_ptr, cols, mask, 7, WEIGHTED, x0)
    h8 = _wcol(w_ptr, cols, mask, 8, WEIGHTED, x0)
    h9 = _wcol(w_ptr, cols, mask, 9, WEIGHTED, x0)
    h10 = _wcol(w_ptr, cols, mask, 10, WEIGHTED, x0)
    h11 = _wcol(w_ptr, cols, mask, 11, WEIGHTED, x0)
    h12 = _wcol(w_ptr, cols, mask, 12, WEIGHTED, x0)
    h13 = _wcol(w_ptr, cols, mask, 13, WEIGHTED, x0)
    h14 = _wcol(w_ptr, cols, mask, 14, WEIGHTED, x0)
    h15 = _wcol(w_ptr, cols, mask, 15, WEIGHTED, x0)
    k_top = _k_top(a, r_ptr, tl.load(inv_ptr + expert), mask, BLOCK_B)
    low = k_top - WINDOW + 1 < 15  # no half-scale shortcut near the subnormal floor: start at the top
    k = tl.where(low, 125, k_top)
    best = tl.full((BLOCK_B,), float("inf"), tl.float32)
    best_k = k
    for _ in range(0, WINDOW):  # going down: a later (lower) k wins ties
        e = _err16(
            x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
            h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, h11, h12, h13, h14, h15,
            tl.load(s_ptr + k), tl.load(r_ptr + k), WEIGHTED,
        )  # fmt: skip
        take = e <= best
        best = tl.where(take, e, best)
        best_k = tl.where(take, k, best_k)
        k -= 1
    kc = tl.maximum(k, 0)
    bound = _bound16(
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
        h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, h11, h12, h13, h14, h15,
        tl.load(s_ptr + kc), WEIGHTED,
    )  # fmt: skip
    active = mask & (k >= 0) & (bound <= best)
    while tl.max(active.to(tl.int32), axis=0) > 0:
        kc = tl.maximum(k, 0)
        e = _err16(
            x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
            h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, h11, h12, h13, h14, h15,
            tl.load(s_ptr + kc), tl.load(r_ptr + kc), WEIGHTED,
        )  # fmt: skip
        take = active & (e <= best)
        best = tl.where(take, e, best)
        best_k = tl.where(take, k, best_k)
        k = tl.where(active, k - 1, k)
        kc = tl.maximum(k, 0)
        bound = _bound16(
            x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
            h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, h11, h12, h13, h14, h15,
            tl.load(s_ptr + kc), WEIGHTED,
        )  # fmt: skip
        active = active & (k >= 0) & (bound <= best)
    tl.store(out_ptr + rows, tl.load(amax_ptr + best_k), mask=mask)


_CANDIDATES: dict[torch.device, torch.Tensor] = {}


def _tables(g: torch.Tensor, device) -> tuple[torch.Tensor, ...]:
    """amax_k, s_k, r_k ([E, 126] for E global amaxes) and 896 / g [E], with torch's fp32 ops on the device."""
    c = _CANDIDATES.get(device)
    if c is None:
        c = _CANDIDATES[device] = fp8_candidates(device)
    g = g.reshape(-1, 1)
    amax_k = c * g
    s_k = div(amax_k, FP4_MAX)  # the reference's ops, IEEE on every device
    return amax_k.contiguous(), s_k.contiguous(), rdiv(1.0, s_k).contiguous(), rdiv(896.0, g).reshape(-1)


def _launch(kernel, x: torch.Tensor, g: torch.Tensor, block_b: int, weights=None, **kw) -> torch.Tensor:
    g = torch.as_tensor(g, dtype=torch.float32, device=x.device).reshape(-1)
    xb = x.detach().reshape(-1, 16)
    if not xb.is_contiguous():
        xb = xb.contiguous()
    n = xb.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=xb.device)
    if n == 0:
        return out
    if n % g.numel():
        raise ValueError(f"{n} blocks do not split evenly over {g.numel()} global amaxes")
    tables = _tables(g, xb.device)
    grid = (triton.cdiv(n, block_b),)
    if kernel is mse_sweep_baseline_kernel:
        if g.numel() != 1:
            raise ValueError("the baseline kernel takes one global amax")
        kernel[grid](xb, out, *tables[:3], n, BLOCK_B=block_b, enable_fp_fusion=False, **kw)
    else:
        wts = xb if weights is None else weights.to(device=xb.device, dtype=torch.float32).contiguous()
        nb = 1 if weights is None else weights.shape[-1] // 16
        if weights is not None and weights.numel() != g.numel() * nb * 16:
            raise ValueError(f"weights {tuple(weights.shape)} do not match {g.numel()} experts")
        kernel[grid](
            xb, out, *tables, wts, n, n // g.numel(), g.numel(), nb, BLOCK_B=block_b, WEIGHTED=weights is not None,
            enable_fp_fusion=False, **kw,
        )  # fmt: skip
    # g == 0: every candidate amax is 0, and so is the answer (all blocks are zero)
    return out


def mse_amax_baseline(x: torch.Tensor, g: torch.Tensor, block_b: int = 128) -> torch.Tensor:
    """Best block amax per block of 16, all 126 candidates evaluated (the benchmark's baseline)."""
    return _launch(mse_sweep_baseline_kernel, x, g, block_b)


def mse_amax_triton(
    x: torch.Tensor,
    g: torch.Tensor,
    block_b: int = 128,
    window: int = WINDOW,
    num_warps: int = 4,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Best block amax per block of 16 (fp32 [n_blocks]); same choices as :func:`mse.mse_amax_reference`.

    ``g`` may hold one global amax per expert ([E]); then ``x`` is [E, ...] (all experts of a fused
    weight in one launch, no host synchronisation per expert) and expert ``e`` uses ``g[e]``.
    ``weights`` [E, in] (or [in]): each element's error times its input channel's weight (the imatrix
    sweep, the reference's ``weights``), ``x``'s last dim being ``in``.
    """
    return _launch(mse_sweep_fast_kernel, x, g, block_b, weights, WINDOW=window, num_warps=num_warps)


@triton.jit
def block_sqerr_kernel(x_ptr, s_ptr, r_ptr, err_ptr, sig_ptr, n_blocks, BLOCK_B: tl.constexpr):
    """Per program: sum over its blocks of (|x| - e2m1(|x| * r) * s)^2 and of x^2 (fp32 partials)."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = rows < n_blocks
    cols = tl.arange(0, 16)
    x = tl.load(x_ptr + rows[:, None] * 16 + cols[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    ax = tl.abs(x)
    s = tl.load(s_ptr + rows, mask=mask, other=1.0)
    r = tl.load(r_ptr + rows, mask=mask, other=1.0)
    e = tl.where(mask, _err(ax, s, r, BLOCK_B), 0.0)
    tl.store(err_ptr + pid, tl.sum(e, axis=0))
    tl.store(sig_ptr + pid, tl.sum(tl.sum(ax * ax, axis=1), axis=0))


def block_sqerr_triton(x: torch.Tensor, step: torch.Tensor, block_b: int = 256) -> tuple[float, float]:
    """(sum (x - fq(x))^2, sum x^2) of ``x`` [..., in] quantized with per-block steps ``step`` [..., in/16].

    One pass over the weight, no fake-quant copy: the weight SQNR of a report in a millisecond or
    two per fused weight. Uses the sweep objective's arithmetic (``|x| * (1/step)``), which equals
    the fake quant's ``|x| / step`` except for rare last-bit ties; sums are fp32 per program, then fp64.
    """
    xb = x.detach().reshape(-1, 16)
    if not xb.is_contiguous():
        xb = xb.contiguous()
    n = xb.shape[0]
    s = step.detach().float().reshape(-1).contiguous()
    r = rdiv(1.0, s)
    grid = (triton.cdiv(n, block_b),)
    err = torch.empty(grid[0], dtype=torch.float32, device=xb.device)
    sig = torch.empty_like(err)
    block_sqerr_kernel[grid](xb, s, r, err, sig, n, BLOCK_B=block_b, enable_fp_fusion=False)
    return float(err.sum(dtype=torch.float64)), float(sig.sum(dtype=torch.float64))
