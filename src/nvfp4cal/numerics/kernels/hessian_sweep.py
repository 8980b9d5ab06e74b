"""Hessian-weighted FP8-scale sweep in Triton (the objective of :mod:`nvfp4cal.numerics.hessian`).

One program holds ``BLOCK_R`` rows of one column block ``b`` of one expert: the weight tile
``x`` [BLOCK_R, 16], that column block's Hessian ``H_b`` [16, 16], its diagonal and its bound factor
``f_b`` (:func:`nvfp4cal.numerics.hessian.pruning_factors`) stay in registers. A candidate ``k``
costs, per row::

    d   = x - sign(x) * e2m1(|x| * r_k) * s_k           (the reference's ops; no fp fusion)
    E   = tree_sum((d * d) * diag(H_b))                  (elementwise: the imatrix objective)
    err = tree_sum(d * tl.dot(d, H_b))                   (fp32 dot in IEEE precision, pairwise tree)

and the dot is skipped where ``f_b E > best`` for every row of the tile (``err >= f_b E``). The pruned
kernel (:func:`hessian_amax_triton`) walks each row's candidates from ``K_top`` (the plain sweep's
fact 1 index, :mod:`nvfp4cal.numerics.mse`) down while the weighted clipping bound ``f_b CB_k`` does not
exceed the row's best, then up from ``K_top + 1`` while ``f_b min(E_k .. E_{k+7})`` does not (the
``E`` of the next eight candidates ride along in registers), a row at a time within the tile's
lock step. Ties go to the smallest ``k`` (``<=`` going down, ``<`` going up). The baseline kernel
(:func:`hessian_amax_baseline`) evaluates all 126 candidates, as the first version did.

Parity with the torch reference: the 16-term dot products ``d @ H_b`` are summed in the order of
the backend (MKL or cuBLAS for the reference, Triton's dot here), so the two can differ in the last
bit of an error and pick different candidates where two candidates' errors are that close (a near
tie, both optimal up to fp32 rounding); skipping never drops the exact optimum (the bound's margin,
:mod:`nvfp4cal.numerics.hessian`). The plain sweep is bit-exact across devices; this one is not, and
need not be: its input, the Hessian, comes from the forward pass, whose activations already differ
between a bf16 GPU run and an fp32 CPU run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..hessian import pruning_factors
from .fp8_sweep import _e2m1, _k_top, _tables, _tree_sum16


@triton.jit
def _tile(x_ptr, h_ptr, rows_total, nb, BLOCK_R: tl.constexpr):
    """This program's rows of column block b of expert e: (rows, mask, cols, e64, b, x fp32 [R, 16], H_b)."""
    pid_r, b, e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = rows < rows_total
    cols = tl.arange(0, 16)
    e64 = e.to(tl.int64)
    row_off = (e64 * rows_total + rows.to(tl.int64)) * (nb * 16) + b * 16
    x = tl.load(x_ptr + row_off[:, None] + cols[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    h = tl.load(h_ptr + ((e64 * nb + b) * 16 + cols[:, None]) * 16 + cols[None, :])
    return rows, mask, cols, e64, b, x, h


@triton.jit
def hessian_sweep_baseline_kernel(
    x_ptr, h_ptr, out_ptr, amax_ptr, s_ptr, r_ptr, rows_total, nb, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr
):  # fmt: skip
    """x [E, rows, nb*16], h [E, nb, 16, 16] fp32, tables [E, 126] -> out [E, rows, nb] best amax."""
    rows, mask, cols, e64, b, x, h = _tile(x_ptr, h_ptr, rows_total, nb, BLOCK_R)
    ax = tl.abs(x)
    neg = x < 0
    best = tl.full((BLOCK_R,), float("inf"), tl.float32)
    best_k = tl.zeros((BLOCK_R,), tl.int32)
    for k in range(0, 126):
        s = tl.load(s_ptr + e64 * 126 + k)
        r = tl.load(r_ptr + e64 * 126 + k)
        q = _e2m1(ax * r) * s
        d = x - tl.where(neg, -q, q)
        hd = tl.dot(d, h, input_precision=PRECISION)
        err = _tree_sum16(d * hd, BLOCK_R)
        take = err < best
        best = tl.where(take, err, best)
        best_k = tl.where(take, k, best_k)
    amax = tl.load(amax_ptr + e64 * 126 + best_k)
    tl.store(out_ptr + (e64 * rows_total + rows.to(tl.int64)) * nb + b, amax, mask=mask)


@triton.jit
def _diff(x, ax, neg, s_ptr, r_ptr, k):
    """d = x - sign(x) e2m1(|x| r_k) s_k for each row's own candidate k [R] (clamped into the table)."""
    kc = tl.minimum(tl.maximum(k, 0), 125)
    s = tl.load(s_ptr + kc)
    q = _e2m1(ax * tl.load(r_ptr + kc)[:, None]) * s[:, None]
    return x - tl.where(neg, -q, q)


@triton.jit
def _diag(d, hdiag, BLOCK_R: tl.constexpr):
    return _tree_sum16((d * d) * hdiag[None, :], BLOCK_R)


@triton.jit
def hessian_sweep_kernel(
    x_ptr, h_ptr, hdiag_ptr, f_ptr, out_ptr, amax_ptr, s_ptr, r_ptr, inv_ptr, rows_total, nb,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """The pruned sweep: x [E, rows, nb*16], h [E, nb, 16, 16], hdiag [E, nb, 16], f [E, nb] fp32,
    tables [E, 126], inv [E] -> out [E, rows, nb] best amax."""
    rows, mask, cols, e64, b, x, h = _tile(x_ptr, h_ptr, rows_total, nb, BLOCK_R)
    hdiag = tl.load(hdiag_ptr + (e64 * nb + b) * 16 + cols)
    f = tl.load(f_ptr + e64 * nb + b)
    s_ptr += e64 * 126
    r_ptr += e64 * 126
    ax = tl.abs(x)
    neg = x < 0
    k_top = _k_top(tl.max(ax, axis=1), r_ptr, tl.load(inv_ptr + e64), mask, BLOCK_R)
    best = tl.full((BLOCK_R,), float("inf"), tl.float32)
    best_k = tl.zeros((BLOCK_R,), tl.int32)

    # down from K_top (a lower k wins ties) while f * CB_k <= best
    k = k_top
    active = mask & (k >= 0)
    while tl.max(active.to(tl.int32), axis=0) > 0:
        d = _diff(x, ax, neg, s_ptr, r_ptr, k)
        need = active & (f * _diag(d, hdiag, BLOCK_R) <= best)
        if tl.max(need.to(tl.int32), axis=0) > 0:
            err = _tree_sum16(d * tl.dot(d, h, input_precision=PRECISION), BLOCK_R)
            take = need & (err <= best)
            best = tl.where(take, err, best)
            best_k = tl.where(take, k, best_k)
        k = tl.where(active, k - 1, k)
        c = tl.maximum(ax - (6.0 * tl.load(s_ptr + tl.maximum(k, 0)))[:, None], 0.0)
        active = active & (k >= 0) & (f * _diag(c, hdiag, BLOCK_R) <= best)

    # up from K_top + 1 (a higher k must be strictly better) while f * min(E_k .. E_{k+7}) <= best;
    # the rule needs k >= 15 (the half-scale candidate k - 8 exists); where f > 0 no error is below 0
    k = k_top + 1
    e0 = tl.where(k <= 125, _diag(_diff(x, ax, neg, s_ptr, r_ptr, k), hdiag, BLOCK_R), float("inf"))
    e1 = tl.where(k + 1 <= 125, _diag(_diff(x, ax, neg, s_ptr, r_ptr, k + 1), hdiag, BLOCK_R), float("inf"))
    e2 = tl.where(k + 2 <= 125, _diag(_diff(x, ax, neg, s_ptr, r_ptr, k + 2), hdiag, BLOCK_R), float("inf"))
    e3 = tl.where(k + 3 <= 125, _diag(_diff(x, ax, neg, s_ptr, r_ptr, k + 3), hdiag, BLOCK_R), float("inf"))
    e4 = tl.where(k + 4 <= 125, _diag(_diff(x, ax, neg, s_ptr, r_ptr, k + 4), hdiag, BLOCK_R), float("inf"))
    e5 = tl.where(k + 5 <= 125, _diag(_diff(x, ax, neg, s_ptr, r_ptr, k + 5), hdiag, BLOCK_R), float("inf"))
    e6 = tl.where(k + 6 <= 125, _diag(_diff(x, ax, neg, s_ptr, r_ptr, k + 6), hdiag, BLOCK_R), float("inf"))
    e7 = tl.where(k + 7 <= 125, _diag(_diff(x, ax, neg, s_ptr, r_ptr, k + 7), hdiag, BLOCK_R), float("inf"))
    low = tl.minimum(
        tl.minimum(tl.minimum(e0, e1), tl.minimum(e2, e3)), tl.minimum(tl.minimum(e4, e5), tl.minimum(e6, e7))
    )
    active = mask & (k <= 125) & ((best > 0.0) | (tl.zeros_like(best) + f == 0.0)) & ((k < 15) | (f * low <= best))
    while tl.max(active.to(tl.int32), axis=0) > 0:
        need = active & (f * e0 <= best)
        if tl.max(need.to(tl.int32), axis=0) > 0:
            d = _diff(x, ax, neg, s_ptr, r_ptr, k)
            err = _tree_sum16(d * tl.dot(d, h, input_precision=PRECISION), BLOCK_R)
            take = need & (err < best)
            best = tl.where(take, err, best)
            best_k = tl.where(take, k, best_k)
        k = tl.where(active, k + 1, k)
        e0, e1, e2, e3, e4, e5, e6 = e1, e2, e3, e4, e5, e6, e7
        e7 = tl.where(k + 7 <= 125, _diag(_diff(x, ax, neg, s_ptr, r_ptr, k + 7), hdiag, BLOCK_R), float("inf"))
        low = tl.minimum(
            tl.minimum(tl.minimum(e0, e1), tl.minimum(e2, e3)), tl.minimum(tl.minimum(e4, e5), tl.minimum(e6, e7))
        )
        active = (
            active & (k <= 125) & ((best > 0.0) | (tl.zeros_like(best) + f == 0.0)) & ((k < 15) | (f * low <= best))
        )
    amax = tl.load(amax_ptr + e64 * 126 + best_k)
    tl.store(out_ptr + (e64 * rows_total + rows.to(tl.int64)) * nb + b, amax, mask=mask)


def _prepare(w: torch.Tensor, g: torch.Tensor, h: torch.Tensor):
    squeeze = w.dim() == 2
    w3, g1 = (w[None], g.reshape(1)) if squeeze else (w, g.reshape(-1))
    h4 = (h[None] if squeeze else h).to(device=w.device, dtype=torch.float32).contiguous()
    n_exp, rows, inp = w3.shape
    out = torch.empty(n_exp, rows, inp // 16, dtype=torch.float32, device=w.device)
    return squeeze, w3.detach().contiguous(), g1, h4, out


def _finish(out: torch.Tensor, g1: torch.Tensor, squeeze: bool) -> torch.Tensor:
    out[g1 == 0] = 0.0
    return out[0] if squeeze else out


def hessian_amax_triton(
    w: torch.Tensor, g: torch.Tensor, h: torch.Tensor, block_r: int = 64, num_warps: int = 4,
    precision: str = "ieee", factors: tuple[torch.Tensor, torch.Tensor] | None = None,
):  # fmt: skip
    """Best block amax per block: ``w`` [E, out, in] (or [out, in]), ``g`` [E] (or []), ``h``
    [E, in/16, 16, 16] (or [in/16, 16, 16]) -> fp32 [E, out, in/16] (or [out, in/16]).

    Experts with ``g == 0`` get zeros; column blocks whose Hessian is zero are left to the caller
    (:func:`nvfp4cal.algorithms.sweeps` gives them the plain sweep's choice, as the reference does).
    ``precision``: the dot's (``"ieee"``, or ``"tf32x3"`` on tensor cores; the bound's margin covers
    both); ``factors``: :func:`pruning_factors` of ``h`` if already computed.
    """
    squeeze, x, g1, h4, out = _prepare(w, g, h)
    n_exp, rows, nb = out.shape
    amax, s, r, inv = _tables(g1.float(), w.device)
    hdiag, f = pruning_factors(h4) if factors is None else factors
    grid = (triton.cdiv(rows, block_r), nb, n_exp)
    hessian_sweep_kernel[grid](
        x, h4, hdiag, f.contiguous(), out, amax, s, r, inv, rows, nb,
        BLOCK_R=block_r, PRECISION=precision, num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    return _finish(out, g1, squeeze)


def hessian_amax_baseline(
    w: torch.Tensor, g: torch.Tensor, h: torch.Tensor, block_r: int = 32, num_warps: int = 4, precision: str = "ieee"
):
    """The same choices with every candidate evaluated (the benchmark's baseline)."""
    squeeze, x, g1, h4, out = _prepare(w, g, h)
    n_exp, rows, nb = out.shape
    amax, s, r, _ = _tables(g1.float(), w.device)
    grid = (triton.cdiv(rows, block_r), nb, n_exp)
    hessian_sweep_baseline_kernel[grid](
        x, h4, out, amax, s, r, rows, nb, BLOCK_R=block_r, PRECISION=precision, num_warps=num_warps,
        enable_fp_fusion=False,
    )  # fmt: skip
    return _finish(out, g1, squeeze)
