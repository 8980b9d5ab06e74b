"""NVFP4 fake quantization with learnable rounding offsets and block-scale factors (layer-output tuning).

For a weight ``w`` [..., in] with block amaxes ``a_b``, per-tensor ``s2`` (:mod:`.nvfp4`), rounding offsets
``v`` (the shape of ``w``) and block-scale factors ``alpha`` (the shape of ``a_b``)::

    code_b = E4M3_rne(clamp(alpha_b * (a_b / 6) / s2, 2^-9, 448))     # the exported FP8 scale byte
    step_b = float(code_b) * s2
    q      = sign(w / step_b + v) * e2m1_round(|w / step_b + v|)        # the exported E2M1 value
    w_q    = q * step_b

With ``v = 0`` and ``alpha = 1`` every value equals :func:`.nvfp4.fake_quantize` bit for bit. Gradients
pass straight through both roundings (``d code / d ratio = 1``, ``d q / d y = 1``); the forward is exactly
what the checkpoint holds: :func:`frozen` turns ``(v, alpha)`` into on-grid weights and block amaxes that
the export packs into the same nibbles and scale bytes.
"""

from __future__ import annotations

import torch

from . import nvfp4


class _Through(torch.autograd.Function):
    """``rounded`` in the forward, the identity's gradient to ``x`` in the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return rounded

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad, None


def straight_through(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """``rounded`` (exactly) with the gradient of ``x`` (the straight-through estimator)."""
    return _Through.apply(x, rounded.detach()) if x.requires_grad else rounded


def tuned_steps(blk_amax: torch.Tensor, s2: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``step_b = float(E4M3(clamp(alpha * a_b / 6 / s2, 2^-9, 448))) * s2`` (fp32, differentiable in alpha)."""
    ratio = (nvfp4.div(blk_amax.float(), nvfp4.FP4_MAX) / s2.float()) * alpha
    ratio = ratio.clamp(nvfp4.FP8_MIN_SUBNORMAL, nvfp4.FP8_MAX)
    code = straight_through(ratio, ratio.detach().to(nvfp4.FP8).float())
    return code * s2.float()


def tuned_fake_quantize(
    w: torch.Tensor, blk_amax: torch.Tensor, s2: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """``w_q`` of the module docstring, in ``w``'s dtype; differentiable in ``v`` and ``alpha``."""
    step = tuned_steps(blk_amax, s2, alpha).unsqueeze(-1)
    y = w.detach().float().unflatten(-1, (-1, nvfp4.BLOCK)) / step + v.unflatten(-1, (-1, nvfp4.BLOCK))
    mag = y.abs()
    q = straight_through(mag, nvfp4.e2m1_round(mag.detach()))
    q = torch.where(y < 0, -q, q)
    return (q * step).flatten(-2).to(w.dtype)


def fixed_ratio(w: torch.Tensor, blk_amax: torch.Tensor, s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w / step_b, step_b)`` at ``alpha = 1`` (fp32, no gradient), blocks unflattened: what
    :func:`tuned_fake_quantize` computes first in every call while the block scales are not tuned
    (``scale = 0``); computed once, the same values bit for bit (the same ops on the same inputs)."""
    with torch.no_grad():
        step = tuned_steps(blk_amax, s2, torch.ones((), dtype=torch.float32, device=blk_amax.device)).unsqueeze(-1)
        return w.detach().float().unflatten(-1, (-1, nvfp4.BLOCK)) / step, step


class _OffsetRound(torch.autograd.Function):
    """``w_q = sign(y) e2m1_round(|y|) step_b`` with ``y = r + v``, in one autograd node. Its gradient is the
    composite's (straight through the rounding, ``d|y|/dy = sign(y)``, undone by the sign) written out:
    ``dL/dv = dL/dw_q * step_b`` where ``y != 0``, else 0; only that mask (one byte a weight) is kept for the
    backward instead of ``y`` (four)."""

    @staticmethod
    def forward(ctx, ratio, step, v, dtype):  # noqa: D102
        y = ratio + v.unflatten(-1, (-1, nvfp4.BLOCK))
        q = nvfp4.e2m1_round(y.abs())
        q = torch.where(y < 0, -q, q)
        ctx.save_for_backward(step, y != 0)
        return (q * step).flatten(-2).to(dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        step, live = ctx.saved_tensors
        g = (grad.float().unflatten(-1, (-1, nvfp4.BLOCK)) * step).mul_(live)
        return None, None, g.flatten(-2), None


def offset_fake_quantize(ratio: torch.Tensor, step: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`tuned_fake_quantize` at ``alpha = 1`` from :func:`fixed_ratio`'s ``(w / step_b, step_b)``:
    ``q = sign(r + v) e2m1_round(|r + v|)``, ``w_q = q step_b``; differentiable in ``v`` (the same values and
    gradient as the composite, one autograd node)."""
    return _OffsetRound.apply(ratio, step, v, dtype)


@torch.no_grad()
def frozen(
    w: torch.Tensor, blk_amax: torch.Tensor, s2: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, block amaxes) that plain NVFP4 quantization maps to the tuned values: the weight on the
    tuned grid (``q * step_b``, in ``w``'s dtype) and ``a'_b = float(code_b) * s2 * 6``, whose scale byte is
    ``code_b`` again, so ``fake_quantize(weight, a', s2)`` equals :func:`tuned_fake_quantize`."""
    codes = (nvfp4.div(blk_amax.float(), nvfp4.FP4_MAX) / s2.float() * alpha).clamp(
        nvfp4.FP8_MIN_SUBNORMAL, nvfp4.FP8_MAX
    )
    codes = codes.to(nvfp4.FP8).float()
    amax = codes * s2.float() * nvfp4.FP4_MAX
    # the byte of a'_b must be code_b: the product's rounding can only land next to an FP8 value
    assert torch.equal(nvfp4.block_scales(amax, s2).float(), codes), "a tuned block amax does not give its code"
    return tuned_fake_quantize(w, blk_amax, s2, v, alpha), amax
