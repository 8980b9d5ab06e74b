"""GPTQ's inner loop in Triton: one launch rounds a group of ``block_columns`` columns of every row (and every
expert) with error feedback, instead of a Python loop of several launches per column.

The torch reference is :func:`nvfp4cal.numerics.gptq.gptq_columns_torch`; for the columns
``i1 .. i1 + nb`` of the working weight ``W`` [E, out, in] (``U`` the upper Cholesky factor of the damped
inverse Hessian, ``live`` 0 for channels no input reached), column by column::

    q_i  = sign(w_i) * e2m1(|w_i| / step_i) * step_i
    e_i  = (w_i - q_i) * (live_i / U[i, i])
    w_j -= e_i * U[i, j]        for the group's columns j >= i

Each program holds ``BLOCK_R`` rows of one expert and all ``nb`` columns of the group in registers and walks
the columns in order; a column is read out of the tile as a masked row sum (one non-zero term: exact). The
same fp32 operations in the same order as the reference: ``|w| / step`` and ``live / U[i, i]`` correctly
rounded (``div_rn``), ``e2m1`` by magic-number rounding as :func:`nvfp4cal.numerics.nvfp4.e2m1_round`, the
update as a multiply then a subtract (launched with ``enable_fp_fusion=False``: no contraction). Columns
``j < i`` get ``e_i * U[i, j] = 0`` (``U`` is upper triangular), which leaves them as they are. So ``q``
and ``e`` equal the reference's bit for bit, up to the sign of a zero error. The lazy-batch update of the
later columns (``W[:, i2:] -= E @ U[i1:i2, i2:]``) stays a batched matmul in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _e2m1(y):
    m = tl.where(y >= 4.0, 25165824.0, tl.where(y >= 2.0, 12582912.0, 6291456.0))  # 1.5 * 2^23 * h
    return tl.minimum((y + m) - m, 6.0)


@triton.jit
def gptq_columns_kernel(
    w_ptr, u_ptr, step_ptr, live_ptr, q_ptr, err_ptr,
    rows, nb, in_f, i1, B,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Program (row tile, expert): columns ``i1 .. i1 + nb`` of ``BLOCK_R`` rows; ``W``, ``step``, ``q`` are
    [E, rows, in] (contiguous), ``U`` [E, B, B] (the group's diagonal block), ``err`` [E, rows, B],
    ``live`` [E, in]."""
    pid_r, e = tl.program_id(0), tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    rmask, cmask = r < rows, c < nb
    m2 = rmask[:, None] & cmask[None, :]
    base = e.to(tl.int64) * rows * in_f + r[:, None].to(tl.int64) * in_f + i1 + c[None, :]
    w = tl.load(w_ptr + base, mask=m2, other=0.0)
    st = tl.load(step_ptr + base, mask=m2, other=1.0)
    q = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    err = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    ub = u_ptr + e.to(tl.int64) * B * B
    for i in range(nb):
        sel = (c == i)[None, :]
        col = tl.sum(tl.where(sel, w, 0.0), axis=1)
        s = tl.sum(tl.where(sel, st, 0.0), axis=1)
        mag = _e2m1(tl.math.div_rn(tl.abs(col), s)) * s
        qc = tl.where(col < 0.0, -mag, mag)
        lv = tl.load(live_ptr + e.to(tl.int64) * in_f + i1 + i)
        f = tl.math.div_rn(lv, tl.load(ub + i * B + i))
        ec = (col - qc) * f
        urow = tl.load(ub + i * B + c, mask=cmask, other=0.0)
        w = w - ec[:, None] * urow[None, :]
        q = tl.where(sel, qc[:, None], q)
        err = tl.where(sel, ec[:, None], err)
    tl.store(q_ptr + base, q, mask=m2)
    eb = e.to(tl.int64) * rows * B + r[:, None].to(tl.int64) * B + c[None, :]
    tl.store(err_ptr + eb, err, mask=m2)


def gptq_columns_triton(
    w: torch.Tensor, u1: torch.Tensor, col_step: torch.Tensor, live: torch.Tensor, q: torch.Tensor, i1: int,
    block_r: int = 16, num_warps: int = 8,
) -> torch.Tensor:  # fmt: skip
    """Round columns ``i1 .. i1 + u1.shape[-1]`` of ``w`` [E, rows, in] (fp32, contiguous) into ``q`` (same
    shape) and return their scaled errors ``err`` [E, rows, nb] for the lazy-batch update. ``u1``
    [E, nb, nb] is the group's diagonal block of ``U``; ``col_step`` [E, rows, in]; ``live`` [E, in].
    Four fp32 tiles of ``block_r x next_pow2(nb)`` live in registers: 8 warps keep 16 x 128 of them at 64
    registers a thread."""
    n, rows, in_f = w.shape
    nb = u1.shape[-1]
    u1 = u1.contiguous()
    err = torch.empty((n, rows, nb), dtype=torch.float32, device=w.device)
    grid = (triton.cdiv(rows, block_r), n)
    gptq_columns_kernel[grid](
        w, u1, col_step, live, q, err, rows, nb, in_f, i1, nb,
        BLOCK_R=block_r, BLOCK_C=triton.next_power_of_2(nb), num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    return err
