"""GPTQ for NVFP4: E2M1 rounding with error feedback under fixed block scales (torch, fp32).

For a weight ``W`` [out, in] with input Hessian ``H = sum_t x_t x_t^T`` [in, in] and per-block steps
``step[o, b]`` (E4M3 block scale times ``s2``, fixed before: max calibration or the FP8 sweep), GPTQ
minimises ``tr((W - Q) H (W - Q)^T)`` one column at a time: column ``j`` is rounded to the grid,
``q_j = sign(w_j) * e2m1_round(|w_j| / step_j) * step_j`` (step of the block holding ``j``), and its
error, divided by ``U[j, j]``, is spread over the columns not yet rounded through row ``j`` of ``U``,
the upper Cholesky factor of ``(H + lambda I)^-1`` (``lambda = dampening * mean(diag H)``). Columns
are processed in groups of ``block_columns`` with the update to later groups applied once per group
(the lazy batch update); with ``act_order`` columns go by decreasing ``diag H`` while each keeps the
step of its own block. Channels that never saw input (``H[j, j] = 0``) are rounded plainly.

Every ``Q`` is on the grid of the fixed steps, so packing it gives exactly GPTQ's E2M1 codes.
"""

from __future__ import annotations

import torch

from .nvfp4 import BLOCK, round_to_step


def hessian_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)`` (float64), summed over a leading batch of experts if there is one."""
    d = w.double() - q.double()
    return float((d @ h.double() * d).sum())


def _gather_columns(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x[e][:, perm[e]]`` for every expert ``e`` of ``x`` [E, rows, in] (``perm`` [E, in])."""
    return x.gather(-1, perm[:, None, :].expand_as(x))


def gptq_columns_torch(
    w: torch.Tensor, u1: torch.Tensor, col_step: torch.Tensor, live: torch.Tensor, q: torch.Tensor, i1: int
) -> torch.Tensor:
    """One group's column loop (the reference of the Triton kernel): round columns ``i1 .. i1 + nb`` of ``w``
    [E, out, in] into ``q`` in place, each column's scaled error spread over the group's later columns through
    ``u1`` [E, nb, nb] (the group's diagonal block of ``U``); returns the errors [E, out, nb] for the lazy-batch
    update. ``w`` itself is left as it is."""
    nb = u1.shape[-1]
    w1 = w[..., i1 : i1 + nb].clone()
    err1 = torch.zeros_like(w1)
    for i in range(nb):
        col = w1[..., i]  # [E, out]
        qc = round_to_step(col, col_step[..., i1 + i])
        q[..., i1 + i] = qc
        e = (col - qc) * (live[:, i1 + i] / u1[:, i, i])[:, None]
        w1[..., i:] -= e[..., None] * u1[:, i, None, i:]
        err1[..., i] = e
    return err1


@torch.no_grad()
def gptq_round(
    w: torch.Tensor,
    h: torch.Tensor,
    steps: torch.Tensor,
    dampening: float = 0.01,
    block_columns: int = 128,
    act_order: bool = False,
    columns=None,
) -> torch.Tensor:
    """GPTQ-rounded ``w`` [out, in] (fp32, on the grid of ``steps`` [out, in/16]) under ``h`` [in, in].

    A leading batch dimension (``w`` [E, out, in], ``h`` [E, in, in], ``steps`` [E, out, in/16]) rounds
    E independent matrices (the experts of a fused-experts weight) in one pass over the columns: each
    expert's result is what it would get alone (up to the batched kernels' rounding). ``columns``: one
    group's column loop (:func:`gptq_columns_torch`, the default, or
    :func:`nvfp4cal.numerics.kernels.gptq.gptq_columns_triton`: the same codes)."""
    columns = columns or gptq_columns_torch
    single = w.dim() == 2
    if single:
        w, h, steps = w[None], h[None], steps[None]
    n, out_f, in_f = w.shape
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    col_step = steps.float().repeat_interleave(BLOCK, dim=-1)  # [E, out, in]: each column's step
    diag = h.diagonal(dim1=-2, dim2=-1)  # a view: writes go to h
    dead = diag == 0  # [E, in]
    diag.masked_fill_(dead, 1.0)
    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=True)  # [E, in]
        w, col_step, dead = _gather_columns(w, perm), _gather_columns(col_step, perm), dead.gather(-1, perm)
        h = _gather_columns(h, perm).gather(-2, perm[:, :, None].expand(n, in_f, in_f))
        diag = h.diagonal(dim1=-2, dim2=-1)
    diag.add_(dampening * diag.mean(-1, keepdim=True))
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    live = (~dead).to(w.dtype)  # 0 where no input ever reached the channel: nothing to compensate
    w, col_step = w.contiguous(), col_step.contiguous()
    q = torch.zeros_like(w)
    for i1 in range(0, in_f, block_columns):
        i2 = min(i1 + block_columns, in_f)
        err1 = columns(w, u[:, i1:i2, i1:i2], col_step, live, q, i1)
        w[..., i2:] -= err1 @ u[:, i1:i2, i2:]  # the lazy-batch update of the later columns
    if act_order:
        q = _gather_columns(q, torch.argsort(perm, dim=-1))
    return q[0] if single else q
