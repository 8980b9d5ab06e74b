"""Hessian-weighted FP8-scale sweep: the torch reference (and a brute force in fp64 that guards it).

A quantized Linear ``y = x W^T`` with NVFP4 weight blocks ``w_b`` (16 input channels ``b`` of one
output row) sees a weight error ``dw_b = w_b - q(w_b)`` as an output error whose energy over the
calibration tokens is ``sum_t (x_{t,b} . dw_b)^2 = dw_b^T H_b dw_b`` with the per-block input Hessian

    H_b = sum over tokens t of x_{t,b} x_{t,b}^T        (16 x 16; accumulated in fp64, used in fp32)

(the cross terms between blocks are left out: each block's scale is chosen alone). For every block
the sweep picks, among the 126 candidates ``amax_k = c_k * g`` of :mod:`nvfp4cal.numerics.mse`, the one with
the smallest

    err_k = tree_sum(d_k * (d_k @ H_b)),   d_k = x - sign(x) * e2m1(|x| * r_k) * s_k   (fp32)

ties to the smallest ``k``. ``d_k @ H_b`` is an fp32 matmul; the final sum over the 16 elements is
the fixed pairwise ``tree_sum``. For ``H_b = c I`` with ``c`` a power of two every step is exact up
to the factor ``c``, so the choices are exactly the plain sweep's.

The plain sweep's pruning facts do not carry over: with off-diagonal terms a candidate whose every
element error is smaller can have a larger weighted error (``H = [[1, 1], [1, 1]]``:
``d = (0.1, -0.1)`` costs 0, ``d = (0.05, 0)`` costs 0.0025), and the clipped elements alone do not
bound ``err_k`` from below. So every candidate is evaluated (one batched matmul per candidate set).
Blocks whose ``H_b`` is zero (input channels that never fired; dead experts) keep the plain sweep's
choice.
"""

from __future__ import annotations

import torch

from .mse import candidate_scales, mse_amax_reference, tree_sum
from .nvfp4 import BLOCK, e2m1_round, rdiv

DEFAULT_CHUNK = 1 << 11  # blocks per step: 2048 x 126 x 16 fp32 = 16 MiB per temporary


@torch.no_grad()
def block_hessian(x: torch.Tensor) -> torch.Tensor:
    """``sum_t x_{t,b} x_{t,b}^T`` for rows ``x`` [..., in] -> fp32 [in/16, 16, 16] (one batched matmul)."""
    xb = x.detach().reshape(-1, x.shape[-1] // BLOCK, BLOCK).float().transpose(0, 1)  # [nb, t, 16]
    return xb.transpose(1, 2) @ xb


def weighted_errors(xb: torch.Tensor, s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """err for blocks ``xb`` [nb, rows, 16] (signed fp32) of one column block each, at scales ``s``
    [m], with the column blocks' Hessians ``h`` [nb, 16, 16] -> [nb, rows, m]."""
    sc = s.view(1, 1, -1, 1)
    ax = xb.abs().unsqueeze(2)
    q = e2m1_round(ax * rdiv(1.0, sc)).mul_(sc)
    d = torch.where(xb.unsqueeze(2) < 0, -q, q).neg_().add_(xb.unsqueeze(2))  # x - q(x)
    nb, rows, m, _ = d.shape
    hd = torch.bmm(d.reshape(nb, rows * m, BLOCK), h).reshape(d.shape)
    return tree_sum(d.mul_(hd))


def hessian_amax_reference(
    w: torch.Tensor, g: torch.Tensor, h: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Best block amax per block of ``w`` [out, in] under ``h`` [in/16, 16, 16] -> fp32 [out * in/16].

    Blocks are ordered as ``w.reshape(-1, 16)`` (row-major), like :func:`mse.mse_amax_reference`.
    """
    out_f, in_f = w.shape
    nb = in_f // BLOCK
    if float(g) == 0.0:
        return torch.zeros(out_f * nb, dtype=torch.float32, device=w.device)
    amax_k, s_k = candidate_scales(g, w.device)
    h = h.to(device=w.device, dtype=torch.float32)
    best = mse_amax_reference(w, g).reshape(out_f, nb)  # kept where H_b is zero
    live = (h.flatten(1) != 0).any(-1).nonzero().squeeze(-1)
    if not live.numel():
        return best.reshape(-1)
    xb = w.detach().float().reshape(out_f, nb, BLOCK)[:, live].transpose(0, 1)  # [nlive, out, 16]
    hl = h[live]
    rows = max(1, chunk // max(1, live.numel()))
    for r in range(0, out_f, rows):
        err = weighted_errors(xb[:, r : r + rows], s_k, hl)  # [nlive, rows, 126]
        best[r : r + rows, live] = amax_k[err.argmin(-1)].transpose(0, 1)  # first minimum: smallest k
    return best.reshape(-1)


def brute_force_fp64(w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every candidate's weighted error in fp64 (the definition, for tests): ([blocks] chosen amax
    by the fp64 objective, [blocks, 126] fp64 errors)."""
    out_f, in_f = w.shape
    nb = in_f // BLOCK
    amax_k, s_k = candidate_scales(g, w.device)
    x = w.detach().float().reshape(out_f, nb, 1, BLOCK)
    sc = s_k.view(1, 1, -1, 1)
    q = e2m1_round(x.abs() * rdiv(1.0, sc)) * sc
    d = (x - torch.where(x < 0, -q, q)).double()  # exact: both are fp32
    err = torch.einsum("rbki,bij,rbkj->rbk", d, h.double(), d).reshape(out_f * nb, -1)
    return amax_k[err.argmin(-1)], err
