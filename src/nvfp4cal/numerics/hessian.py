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
bound ``err_k`` from below (:func:`hessian_amax_exhaustive` evaluates every candidate: the definition).
Blocks whose ``H_b`` is zero (input channels that never fired; dead experts) keep the plain sweep's choice.

A bound that does hold (the reference and the Triton kernel skip candidates by it, :func:`pruning_factors`): with
``D = diag(H_b)`` and ``mu`` the smallest eigenvalue of the correlation matrix ``C = D^-1/2 H_b D^-1/2``
(channels whose ``H_ii`` is 0 get ``C_ii = 1``; their rows of ``H_b`` are zero, so they add nothing),

    err_k = d^T H_b d = (D^1/2 d)^T C (D^1/2 d) >= mu * |D^1/2 d|^2 = mu * E_k,   E_k = sum_i H_ii d_i^2

``E_k`` is the imatrix sweep's objective, elementwise and cheap, and both facts of
:mod:`nvfp4cal.numerics.mse` hold for it (weights ``H_ii >= 0``): (1) for ``k > K_top``, ``k >= 15``:
``E_k >= E_{k-8}``, so ``E_k' >= min(E_k .. E_{k+7})`` for every ``k' >= k > K_top``, ``k >= 15`` (go down
by 8 until the index falls in ``k .. k+7``); (2) ``E_k >= CB_k = sum_i H_ii max(0, |x_i| - 6 s_k)^2``,
which grows as ``k`` falls. So once a block's best weighted error so far is ``B``, candidate ``k`` can
be skipped when ``mu E_k > B``, the walk down stops when ``mu CB_k > B`` and the walk up when
``mu min(E_k .. E_{k+7}) > B``. Scaling the weights by ``D^-1/2`` is what makes this useful: ``H_b`` of
real activations is badly conditioned (SmolLM2-135M: median ``kappa`` 6 to 6,000 per weight) because
channels differ in scale, while ``mu`` stays 0.3-0.7 (the median per weight), so about a dozen of the
126 candidates stay live per block.

fp32: the kernel compares fp32 values, so it uses ``f = mu' (1 - 16u) / ((1 + 2^-12)(1 + 4096 u / mu'))``
instead of ``mu`` (``u = 2^-24``, ``mu' = mu - 1e-12`` from an fp64 ``eigvalsh``; ``f = 0``, no skipping,
where ``mu' < 1e-6``). The ``(1 - 16u)`` covers the fp32 evaluation of ``E`` (non-negative terms, 6
roundings deep); ``4096 u / mu'`` that of ``B``, whose error is at most ``~64 u |d|^T |H_b| |d| <=
1024 u E <= 1024 u err / mu`` (``|H_ij| <= sqrt(H_ii H_jj)``, Cauchy-Schwarz over 16 terms; 64 u covers
an fp32 dot and a tensor-core ``tf32x3`` one, whose products lose ~3 * 2^-22 each), four times over. Then a skipped
candidate's exact error exceeds the exact error of a candidate the kernel evaluated by a factor
``1 + 2^-12``: the exact optimum is never skipped, and the kernel's choice differs from the
exhaustive reference only where fp32 evaluation decides (near ties).
"""

from __future__ import annotations

import torch

from .mse import FIRST_WITH_HALF, candidate_scales, k_tops, mse_amax_reference, tree_sum
from .nvfp4 import BLOCK, FP4_MAX, e2m1_round, rdiv

DEFAULT_CHUNK = 1 << 11  # blocks per step: 2048 x 126 x 16 fp32 = 16 MiB per temporary


@torch.no_grad()
def block_hessian(x: torch.Tensor) -> torch.Tensor:
    """``sum_t x_{t,b} x_{t,b}^T`` for rows ``x`` [..., in] -> fp32 [in/16, 16, 16] (one batched matmul)."""
    xb = x.detach().reshape(-1, x.shape[-1] // BLOCK, BLOCK).float().transpose(0, 1)  # [nb, t, 16]
    return xb.transpose(1, 2) @ xb


def pruning_factors(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``diag(H_b)`` [..., 16] fp32, ``f`` [...] fp32) for block Hessians ``h`` [..., 16, 16]: the
    per-column-block factor of the bound ``err_k >= f * E_k`` (module docstring; 0 where it cannot
    be used). ``f`` comes from an fp64 ``eigvalsh`` of the correlation matrices on ``h``'s device."""
    hf = h.float()
    d = torch.diagonal(hf, dim1=-2, dim2=-1).contiguous()
    h64, d64 = hf.double(), d.double()
    inv = torch.where(d64 > 0, d64.rsqrt(), torch.zeros_like(d64))
    c = inv.unsqueeze(-1) * h64 * inv.unsqueeze(-2) + torch.diag_embed((d64 <= 0).double())
    finite = torch.isfinite(c).flatten(-2).all(-1)  # a non-finite H_b: no bound (eigvalsh would fail on it)
    c = torch.where(finite[..., None, None], c, torch.eye(16, dtype=c.dtype, device=c.device))
    mu = torch.where(finite, torch.linalg.eigvalsh(c)[..., 0] - 1e-12, torch.zeros_like(finite, dtype=c.dtype))
    u = 2.0**-24
    f = mu * (1 - 16 * u) / ((1 + 2.0**-12) * (1 + 4096 * u / mu.clamp_min(1e-6)))
    return d, torch.where(mu < 1e-6, torch.zeros_like(f), f).float()


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


DOWN, UP = 12, 8  # first window K_top - 11 .. K_top + 8 (UP stays 8: the rule up reads its top 8 E), then 8 more a side


def _window_errors(x, ks, s_k, h, hdiag):
    """(err, E) of blocks ``x`` [n, 16] under their own ``h`` [n, 16, 16] and ``hdiag`` [n, 16] at each
    block's candidates ``ks`` [n, m] (clamped into the table) -> two [n, m]."""
    sc = s_k[ks.clamp(0, 125)].unsqueeze(-1)
    q = e2m1_round(x.abs().unsqueeze(1) * rdiv(1.0, sc)).mul_(sc)
    d = torch.where(x.unsqueeze(1) < 0, -q, q).neg_().add_(x.unsqueeze(1))  # x - q(x)
    return tree_sum(d * torch.bmm(d, h)), tree_sum((d * d) * hdiag.unsqueeze(1))


def _pruned_blocks(x, col, s_k, h, hdiag, f):
    """Best candidate index per block ``x`` [n, 16] of column block ``col`` [n]: the candidates around
    ``K_top`` first, then 8 more below or above wherever the bound (module docstring) leaves a side open."""
    inf = torch.tensor(float("inf"), device=x.device)
    a = x.abs().amax(-1)
    k_top = k_tops(a, s_k)
    lo, hi = k_top - DOWN + 1, k_top + UP
    ks = lo.unsqueeze(-1) + torch.arange(DOWN + UP, device=x.device)
    hb, db, fb = h[col], hdiag[col], f[col]
    err, e = _window_errors(x, ks, s_k, hb, db)
    err = torch.where((ks < 0) | (ks > 125), inf, err)
    best, pos = err.min(-1)  # first minimum: the smallest k
    best_k = ks.gather(-1, pos.unsqueeze(-1)).squeeze(-1)
    tail = torch.where(ks[:, -UP:] > 125, inf, e[:, -UP:])  # E at hi - 7 .. hi (all above K_top)
    while True:
        clip = (x.abs() - (FP4_MAX * s_k[lo.clamp(min=1) - 1]).unsqueeze(-1)).clamp_min(0.0)
        down = (lo > 0) & ~(fb * tree_sum((clip * clip) * db) > best)
        closed_up = ((hi - 7 >= FIRST_WITH_HALF) & (fb * tail.amin(-1) > best)) | ((fb > 0) & (best <= 0))
        up = (hi < 125) & ~closed_up
        if not bool(down.any() | up.any()):
            return best_k
        for going_down, open_ in ((True, down), (False, up)):
            i = open_.nonzero().squeeze(-1)
            if not i.numel():
                continue
            ks = (lo[i] - 8 if going_down else hi[i] + 1).unsqueeze(-1) + torch.arange(8, device=x.device)
            err, e = _window_errors(x[i], ks, s_k, hb[i], db[i])
            err = torch.where((ks < 0) | (ks > 125), inf, err)
            b, p = err.min(-1)
            take = (b <= best[i]) if going_down else (b < best[i])  # ties: the smaller k
            best[i] = torch.where(take, b, best[i])
            best_k[i] = torch.where(take, ks.gather(-1, p.unsqueeze(-1)).squeeze(-1), best_k[i])
            if going_down:
                lo[i] -= 8
            else:
                hi[i] += 8
                tail[i] = torch.where(ks > 125, inf, e)


def _setup(w: torch.Tensor, g: torch.Tensor, h: torch.Tensor):
    """(best [out, nb] with the plain sweep's choices where ``H_b`` is zero, the live column blocks, the
    candidates (amax_k, s_k), ``h`` in fp32 on ``w``'s device), or None where ``g`` is 0 (all zeros)."""
    out_f, in_f = w.shape
    nb = in_f // BLOCK
    if float(g) == 0.0:
        return None
    h = h.to(device=w.device, dtype=torch.float32)
    live = (h.flatten(1) != 0).any(-1)
    if bool(live.all()):
        best = torch.empty(out_f, nb, dtype=torch.float32, device=w.device)
    else:  # the plain sweep's choice where H_b is zero
        best = mse_amax_reference(w, g).reshape(out_f, nb)
    return best, live.nonzero().squeeze(-1), candidate_scales(g, w.device), h


def hessian_amax_reference(
    w: torch.Tensor, g: torch.Tensor, h: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Best block amax per block of ``w`` [out, in] under ``h`` [in/16, 16, 16] -> fp32 [out * in/16].

    Blocks are ordered as ``w.reshape(-1, 16)`` (row-major), like :func:`mse.mse_amax_reference`. Only
    the candidates the bound of the module docstring leaves open are evaluated (about 20 of 126); the
    choices equal :func:`hessian_amax_exhaustive`'s (the same fp32 operations on every candidate it
    evaluates).
    """
    setup = _setup(w, g, h)
    if setup is None:
        return torch.zeros(w.numel() // BLOCK, dtype=torch.float32, device=w.device)
    best, idx, (amax_k, s_k), h = setup
    if idx.numel():
        hdiag, f = pruning_factors(h)
        x = w.detach().float().reshape(w.shape[0], -1, BLOCK)[:, idx].reshape(-1, BLOCK)  # row-major live blocks
        col = idx.repeat(w.shape[0])
        step = chunk * 8  # ~20 candidates a block here, 126 in the exhaustive sweep
        k = torch.cat(
            [_pruned_blocks(x[i : i + step], col[i : i + step], s_k, h, hdiag, f) for i in range(0, len(x), step)]
        )
        best[:, idx] = amax_k[k].reshape(w.shape[0], -1)
    return best.reshape(-1)


def hessian_amax_exhaustive(
    w: torch.Tensor, g: torch.Tensor, h: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """:func:`hessian_amax_reference` with all 126 candidates evaluated (the definition, for tests)."""
    setup = _setup(w, g, h)
    if setup is None:
        return torch.zeros(w.numel() // BLOCK, dtype=torch.float32, device=w.device)
    best, live, (amax_k, s_k), h = setup
    if live.numel():
        xb = w.detach().float().reshape(w.shape[0], -1, BLOCK)[:, live].transpose(0, 1)  # [nlive, out, 16]
        hl, rows = h[live], max(1, chunk // live.numel())
        for r in range(0, w.shape[0], rows):
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
