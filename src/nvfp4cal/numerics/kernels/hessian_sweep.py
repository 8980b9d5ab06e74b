"""Hessian-weighted FP8-scale sweep in Triton (the objective of :mod:`nvfp4cal.numerics.hessian`).

One program holds ``BLOCK_R`` rows of one column block ``b`` of one expert: the weight tile
``x`` [BLOCK_R, 16] and that column block's Hessian ``H_b`` [16, 16] stay in registers while the
126 candidates are evaluated in ascending order::

    d   = x - sign(x) * e2m1(|x| * r_k) * s_k           (the reference's ops; no fp fusion)
    err = tree_sum(d * tl.dot(d, H_b))                   (fp32 dot in IEEE precision, pairwise tree)

ties to the smallest ``k`` (strict ``<`` in ascending order). All experts of a fused weight in one
launch (grid: row tiles x column blocks x experts).

Parity with the torch reference: the 16-term dot products ``d @ H_b`` are summed in the order of
the backend (MKL or cuBLAS for the reference, Triton's dot here), so the two can differ in the last
bit of an error and pick different candidates where two candidates' errors are that close (a near
tie, both optimal up to fp32 rounding). The plain sweep is bit-exact across devices; this one is not,
and need not be: its input, the Hessian, comes from the forward pass, whose activations already
differ between a bf16 GPU run and an fp32 CPU run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..mse import candidate_scales
from ..nvfp4 import rdiv
from .fp8_sweep import _e2m1, _tree_sum16

NCAND = 126


@triton.jit
def hessian_sweep_kernel(
    x_ptr, h_ptr, out_ptr, amax_ptr, s_ptr, r_ptr, rows_total, nb, BLOCK_R: tl.constexpr
):  # fmt: skip
    """x [E, rows, nb*16], h [E, nb, 16, 16] fp32, tables [E, 126] -> out [E, rows, nb] best amax."""
    pid_r, b, e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = rows < rows_total
    cols = tl.arange(0, 16)
    e64 = e.to(tl.int64)
    row_off = (e64 * rows_total + rows.to(tl.int64)) * (nb * 16) + b * 16
    x = tl.load(x_ptr + row_off[:, None] + cols[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    h_off = ((e64 * nb + b) * 16 + cols[:, None]) * 16 + cols[None, :]
    h = tl.load(h_ptr + h_off)
    ax = tl.abs(x)
    neg = x < 0
    best = tl.full((BLOCK_R,), float("inf"), tl.float32)
    best_k = tl.zeros((BLOCK_R,), tl.int32)
    for k in range(0, 126):
        s = tl.load(s_ptr + e64 * 126 + k)
        r = tl.load(r_ptr + e64 * 126 + k)
        q = _e2m1(ax * r) * s
        d = x - tl.where(neg, -q, q)
        hd = tl.dot(d, h, input_precision="ieee")
        err = _tree_sum16(d * hd, BLOCK_R)
        take = err < best
        best = tl.where(take, err, best)
        best_k = tl.where(take, k, best_k)
    amax = tl.load(amax_ptr + e64 * 126 + best_k)
    tl.store(out_ptr + (e64 * rows_total + rows.to(tl.int64)) * nb + b, amax, mask=mask)


def hessian_amax_triton(w: torch.Tensor, g: torch.Tensor, h: torch.Tensor, block_r: int = 32, num_warps: int = 4):
    """Best block amax per block: ``w`` [E, out, in] (or [out, in]), ``g`` [E] (or []), ``h``
    [E, in/16, 16, 16] (or [in/16, 16, 16]) -> fp32 [E, out, in/16] (or [out, in/16]).

    Experts with ``g == 0`` get zeros; column blocks whose Hessian is zero are left to the caller
    (:func:`nvfp4cal.algorithms.sweeps` gives them the plain sweep's choice, as the reference does).
    """
    squeeze = w.dim() == 2
    w3, g1 = (w[None], g.reshape(1)) if squeeze else (w, g.reshape(-1))
    h4 = (h[None] if squeeze else h).to(device=w.device, dtype=torch.float32).contiguous()
    n_exp, rows, inp = w3.shape
    nb = inp // 16
    x = w3.detach().contiguous()
    tables = [candidate_scales(gi, w.device) for gi in g1.float()]
    amax = torch.stack([t[0] for t in tables]).contiguous()
    s = torch.stack([t[1] for t in tables]).contiguous()
    r = rdiv(1.0, s).contiguous()
    out = torch.empty(n_exp, rows, nb, dtype=torch.float32, device=w.device)
    grid = (triton.cdiv(rows, block_r), nb, n_exp)
    hessian_sweep_kernel[grid](
        x, h4, out, amax, s, r, rows, nb, BLOCK_R=block_r, num_warps=num_warps, enable_fp_fusion=False
    )
    out[g1 == 0] = 0.0
    return out[0] if squeeze else out
