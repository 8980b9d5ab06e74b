"""FP8-scale MSE sweep: the exact torch reference (and a brute force that guards it).

For a weight viewed as blocks ``x`` [n, 16] with global amax ``g`` and the 126 candidates
``c_k`` (:func:`nvfp4.fp8_candidates`), candidate ``k`` has::

    amax_k = c_k * g            (fp32)
    s_k    = amax_k / 6         (fp32)
    r_k    = 1 / s_k            (fp32, once per candidate)
    err_k  = tree_sum((|x| - e2m1(|x| * r_k) * s_k) ** 2)      (fp32, no fused multiply-add)

``|x| * r_k`` stands for ``|x| / s_k``: one multiply instead of a correctly rounded divide per
element and candidate (the Triton kernel's budget is ~20 instructions per element-candidate), and
exact in every place the facts below need (``r`` of half the scale is exactly ``2 r``).

``tree_sum`` is the fixed pairwise sum ((e0+e1)+(e2+e3))+... so every implementation adds in
the same order. The block's choice is the smallest ``err_k``, ties to the smallest ``k``; the
result is the block amax ``amax_k`` to hand to :func:`nvfp4.block_scales`.

Two exact pruning facts make the reference fast without changing any choice:

1. Dominance from above: if ``fl(a * r_k) <= 3`` for the block amax ``a`` and ``k >= 15`` (so that
   ``k - 8`` is the candidate with exactly half the scale), the half-scale grid contains every grid
   point of scale ``s_k`` up to ``3 s_k``; every element error at ``k - 8`` is no larger, so ``k``
   never wins. Only ``k <= K_top = max{k : fl(a * r_k) > 3}`` need evaluating (blocks whose window
   reaches below ``k = 15`` are evaluated over all 126 candidates).
2. Bound from below: ``err_k >= LB_k = tree_sum(max(0, |x| - 6 s_k) ** 2)`` (the clipped elements
   alone, computed with the same fp32 ops), and ``LB`` grows as ``k`` falls. After a window of
   candidates below ``K_top``, every lower ``k`` is excluded once ``LB > best``; blocks where it is
   not keep evaluating lower candidates one at a time.
"""

from __future__ import annotations

import torch

from .nvfp4 import BLOCK, FP4_MAX, div, e2m1_round, fp8_candidates, rdiv

WINDOW = 10
FIRST_WITH_HALF = 15  # k >= 15: candidate k - 8 has exactly half the value
DEFAULT_CHUNK = 1 << 14  # ~10 MB of temporaries per candidate window: stays in cache


def tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Pairwise sum over the last dim (a power of two): ((e0+e1)+(e2+e3))+..."""
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


def candidate_scales(g: torch.Tensor, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(amax_k, s_k) for the 126 candidates of a tensor with global amax ``g`` (fp32)."""
    amax = fp8_candidates(device) * torch.as_tensor(g, dtype=torch.float32, device=device)
    return amax, div(amax, FP4_MAX)


def k_tops(a: torch.Tensor, s_k: torch.Tensor) -> torch.Tensor:
    """``K_top = max{k : fl(a * r_k) > 3}`` (-1 where none) for block amaxes ``a`` [n] (fp32): a binary search
    over the exact thresholds ``T_k`` = the smallest fp32 ``t`` with ``fl(t * r_k) > 3`` (fp32 multiplication
    is monotone in ``t``, and ``T_k`` does not fall as ``k`` rises), instead of 126 products per block."""
    r = rdiv(1.0, s_k)
    t = (3.0 / r.double()).float()
    zero, inf = torch.zeros_like(t), torch.full_like(t, float("inf"))
    for _ in range(4):  # settle each threshold on the exact fp32 step (the fp64 quotient is within an ulp or two)
        t = torch.where(t * r > 3.0, t, torch.nextafter(t, inf))
    for _ in range(4):
        down = torch.nextafter(t, zero)
        t = torch.where(down * r > 3.0, down, t)
    exact = (t * r > 3.0) & ~(torch.nextafter(t, zero) * r > 3.0)
    if not bool(exact.all()) or bool((t[1:] < t[:-1]).any()):  # never seen; the direct count is the definition
        return (a.unsqueeze(-1) * r > 3.0).sum(-1) - 1
    return torch.searchsorted(t, a.contiguous(), right=True) - 1


def block_errors(ax: torch.Tensor, s: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
    """err for blocks ``ax = |x|`` [n, 16] (fp32) at scales ``s`` [n, m] -> [n, m]; ``h`` [n, 16]: each
    element's weight (``err = tree_sum(h * d * d)``), None: all ones (no multiply)."""
    sc = s.unsqueeze(-1)
    q = e2m1_round(ax.unsqueeze(1) * rdiv(1.0, sc)).mul_(sc)
    d = torch.sub(ax.unsqueeze(1), q, out=q)
    d = d.mul_(d)
    return tree_sum(d if h is None else d.mul_(h.unsqueeze(1)))


def clip_bound(ax: torch.Tensor, s: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
    """Lower bound of err at scale ``s`` [n]: the clipped elements' error alone."""
    d = (ax - (FP4_MAX * s).unsqueeze(-1)).clamp_min(0.0)
    return tree_sum(d * d if h is None else d * d * h)


def brute_force_amax(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """All 126 candidates for every block (fp32, same objective): the unpruned definition."""
    ax = x.detach().float().abs().reshape(-1, BLOCK)
    amax_k, s_k = candidate_scales(g, ax.device)
    if float(g) == 0.0:
        return torch.zeros(ax.shape[0], device=ax.device)
    err = block_errors(ax, s_k.expand(ax.shape[0], -1))
    return amax_k[err.argmin(-1)]


def _sweep_chunk(
    ax: torch.Tensor, amax_k: torch.Tensor, s_k: torch.Tensor, h: torch.Tensor | None = None
) -> torch.Tensor:
    n = ax.shape[0]
    a = ax.amax(-1)
    k_top = k_tops(a, s_k)
    best_k = torch.empty(n, dtype=torch.long, device=ax.device)

    low = k_top - WINDOW + 1 < FIRST_WITH_HALF
    if low.any():  # near the subnormal floor: no half-scale shortcut, evaluate everything
        err = block_errors(ax[low], s_k.expand(int(low.sum()), -1), None if h is None else h[low])
        best_k[low] = err.argmin(-1)
    hi = (~low).nonzero().squeeze(-1)
    if hi.numel():
        axh = ax[hi]
        hh = None if h is None else h[hi]
        ks = k_top[hi].unsqueeze(-1) + torch.arange(-WINDOW + 1, 1, device=ax.device)
        err = block_errors(axh, s_k[ks], hh)
        best_err, pos = err.min(-1)  # first minimum = smallest k on ties
        bk = ks.gather(-1, pos.unsqueeze(-1)).squeeze(-1)
        nxt = ks[:, 0] - 1
        open_ = (nxt >= 0) & (clip_bound(axh, s_k[nxt.clamp_min(0)], hh) <= best_err)
        while open_.any():
            idx = open_.nonzero().squeeze(-1)
            k = nxt[idx]
            e = block_errors(axh[idx], s_k[k].unsqueeze(-1), None if hh is None else hh[idx]).squeeze(-1)
            take = e <= best_err[idx]  # a lower k wins ties
            best_err[idx] = torch.where(take, e, best_err[idx])
            bk[idx] = torch.where(take, k, bk[idx])
            nxt[idx] = k - 1
            still = nxt[idx] >= 0
            still &= clip_bound(axh[idx], s_k[nxt[idx].clamp_min(0)], None if hh is None else hh[idx]) <= best_err[idx]
            open_[idx] = still
        best_k[hi] = bk
    return amax_k[best_k]


def mse_amax_reference(
    x: torch.Tensor, g: torch.Tensor, chunk: int = DEFAULT_CHUNK, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Best block amax per block of ``x`` (any float dtype, numel a multiple of 16) -> fp32 [n_blocks].

    ``weights``: a non-negative fp32 weight per input channel (``[x.shape[-1]]``): the objective becomes
    ``tree_sum(h * d * d)`` (the imatrix sweep: ``h`` the diagonal of the input Hessian). Both pruning
    facts hold unchanged: with ``h >= 0`` an element-wise smaller error is a smaller weighted error
    (fact 1), and the clipped elements' weighted error still bounds ``err`` from below and grows as
    ``k`` falls (fact 2); fp32 rounding is monotone in each step. Works through ``chunk`` blocks at a
    time, so the extra memory stays bounded.
    """
    ax = x.detach().reshape(-1, BLOCK)
    h = None
    if weights is not None:
        h = weights.to(device=ax.device, dtype=torch.float32).reshape(1, -1, BLOCK)
        h = h.expand(x.numel() // x.shape[-1], -1, -1).reshape(-1, BLOCK)
    out = torch.empty(ax.shape[0], dtype=torch.float32, device=ax.device)
    if float(g) == 0.0:
        return out.zero_()
    amax_k, s_k = candidate_scales(g, ax.device)
    for i in range(0, ax.shape[0], chunk):
        hc = None if h is None else h[i : i + chunk]
        out[i : i + chunk] = _sweep_chunk(ax[i : i + chunk].float().abs(), amax_k, s_k, hc)
    return out
