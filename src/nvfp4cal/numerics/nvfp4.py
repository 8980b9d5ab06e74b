"""NVFP4 numerics in pure torch: the source of truth for every other path.

Format (per tensor ``w`` of shape [..., in], ``in`` a multiple of 16):

* E2M1 magnitudes ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}``; a nibble is ``sign << 3 | index`` (zero is +0).
  Rounding is to nearest, ties to even, saturating at 6::

      |y| <= 0.25 -> 0,  < 0.75 -> 0.5,  <= 1.25 -> 1,  < 1.75 -> 1.5,
      <= 2.5 -> 2,  < 3.5 -> 3,  <= 5 -> 4,  else 6

* Global amax ``g = max|w|``; ``scale_2 = g / (6 * 448)`` in fp32 (``weight_scale_2`` /
  ``input_scale`` in the export). A tensor with ``g == 0`` uses ``g = 1`` so that the
  scale stays finite and positive; all its blocks are zero anyway.
* Blocks of 16 consecutive elements along the last dim, block amax ``a_b``:
  ``scale_b = E4M3_rne(clamp(a_b / 6 / scale_2, 2**-9, 448))`` (an FP8 byte, never NaN).
* Dequantized value ``= e2m1 * (float(scale_b) * scale_2)``.

Fake quantization (:func:`fake_quantize`) is quantize then dequantize with exactly these
scales, so a model that runs it sees what the exported checkpoint holds.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 16
FP4_MAX = 6.0
FP8_MAX = 448.0
FP8_MIN_SUBNORMAL = 2.0**-9
FP8 = torch.float8_e4m3fn
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# ``idx = sum(y > b)`` over these bounds gives the E2M1 index with the tie rules above:
# ties at 0.25, 1.25, 2.5, 5 round down (to the even code), ties at 0.75, 1.75, 3.5 round up,
# so those three bounds are moved one fp32 ulp down (``y >= b`` == ``y > prev(b)``).
_TIE_DOWN = (0.25, 1.25, 2.5, 5.0)
_TIE_UP = (0.75, 1.75, 3.5)


def div(a: torch.Tensor, b: float) -> torch.Tensor:
    """``a / b`` correctly rounded on every device.

    On CUDA, torch turns division by a Python scalar into multiplication by its reciprocal (not
    always the same fp32 result); dividing by a tensor on ``a``'s device keeps IEEE division, so CPU
    and GPU runs write the same bytes.
    """
    return a / torch.tensor(b, dtype=a.dtype, device=a.device)


def rdiv(b: float, a: torch.Tensor) -> torch.Tensor:
    """``b / a`` correctly rounded on every device (see :func:`div`)."""
    return torch.full_like(a, b) / a


def _e2m1_bounds(device: torch.device | str = "cpu") -> torch.Tensor:
    bounds = torch.tensor(sorted(_TIE_DOWN + _TIE_UP), dtype=torch.float32, device=device)
    up = torch.isin(bounds, torch.tensor(_TIE_UP, device=device))
    lower = torch.nextafter(bounds, torch.tensor(float("-inf"), device=device))
    return torch.where(up, lower, bounds)


def e2m1_values(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)


def e2m1_index_by_thresholds(y: torch.Tensor) -> torch.Tensor:
    """Index (0..7) of the E2M1 magnitude nearest to ``y >= 0`` (fp32), ties to even, by bucketing against
    the midpoints between grid values: the reference that :func:`e2m1_round` and :func:`e2m1_index` are
    tested against (a NaN lands past the last midpoint: 7)."""
    return torch.bucketize(y, _e2m1_bounds(y.device), right=False).to(torch.uint8)


# code of the E2M1 value ``v`` at ``2 v`` (0, 1, 2, 3, 4, 6, 8, 12 -> 0..7); other slots are never read
_CODE_OF_TWICE = (0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7)


def e2m1_index(y: torch.Tensor) -> torch.Tensor:
    """Index (0..7) of the E2M1 magnitude nearest to ``y >= 0`` (fp32), ties to even: the code of
    ``e2m1_round(y)`` (a NaN gives 7, as :func:`e2m1_index_by_thresholds`), ~2.5x faster than bucketing on CPU."""
    return _e2m1_index_(y.float().clone())


def _e2m1_index_(y: torch.Tensor) -> torch.Tensor:
    """:func:`e2m1_index` of an fp32 temporary of the caller's, rounded in place."""
    twice = _e2m1_round_(y).nan_to_num_(nan=FP4_MAX).mul_(2.0).to(torch.int64)
    return torch.tensor(_CODE_OF_TWICE, dtype=torch.uint8, device=y.device)[twice]


def _binade_magic(y: torch.Tensor) -> torch.Tensor:
    """``M = 1.5 * 2^23 * h`` per element of ``y >= 0`` (fp32), ``h`` the E2M1 grid spacing of y's binade (0.5
    below 2, 1 below 4, else 2): ``h = clamp(2^floor(log2 y), 1, 4) / 2``, the power of two read from y's
    exponent bits (0 and subnormals give 0, clamped to 1; inf gives inf, clamped to 4)."""
    pow2 = y.view(torch.int32).bitwise_and(0x7F800000).view(torch.float32)
    return pow2.clamp_(1.0, 4.0).mul_(6291456.0)


def e2m1_round(y: torch.Tensor) -> torch.Tensor:
    """E2M1 magnitude nearest to ``y >= 0`` (fp32), ties to even: the same values as ``e2m1_index``.

    Magic-number rounding: ``(y + M) - M`` rounds to a multiple of the grid spacing ``h`` of y's
    binade (0.5 below 2, 1 below 4, else 2) with fp32's round-half-even, ``M = 1.5 * 2^23 * h``;
    even multiples are even codes, so ties land where the E2M1 rule wants them; then ``min(., 6)``.
    """
    m = _binade_magic(y)
    return y.add(m).sub_(m).clamp_max_(FP4_MAX)


def _e2m1_round_(y: torch.Tensor) -> torch.Tensor:
    """:func:`e2m1_round` in place (``y`` is a temporary of the caller's)."""
    m = _binade_magic(y)
    return y.add_(m).sub_(m).clamp_max_(FP4_MAX)


def scale_2(amax: torch.Tensor) -> torch.Tensor:
    """Per-tensor second-level scale ``amax / (6 * 448)`` (fp32, finite, > 0)."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    return div(amax, FP4_MAX * FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)


def block_amax(w: torch.Tensor) -> torch.Tensor:
    """Per-block max |w| over blocks of 16 along the last dim: [..., in] -> [..., in/16] fp32."""
    if w.shape[-1] % BLOCK:
        raise ValueError(f"last dim {w.shape[-1]} is not a multiple of {BLOCK}")
    return w.detach().float().abs().unflatten(-1, (-1, BLOCK)).amax(-1)


def block_scales(blk_amax: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 block scale bytes: ``E4M3(clamp(a_b / 6 / s2, 2^-9, 448))``."""
    ratio = div(blk_amax.float(), FP4_MAX) / s2.float()
    return ratio.clamp(FP8_MIN_SUBNORMAL, FP8_MAX).to(FP8)


def block_steps(blk_amax: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """fp32 quantization step of each block, ``float(block_scale) * s2``: what one E2M1 unit is worth."""
    return block_scales(blk_amax, s2).float() * s2.float()


def nan_scale_bytes(scales: torch.Tensor) -> int:
    """Number of NaN bytes (``0x7F``/``0xFF``) among FP8 E4M3 block scales.

    On the CPU through numpy: for the many small scale tensors of a checkpoint, several times
    cheaper per call than torch's threaded elementwise ops.
    """
    b = scales.view(torch.uint8)
    if b.is_cuda:
        return int(((b & 0x7F) == 0x7F).sum())
    return int(np.count_nonzero((b.numpy() & 0x7F) == 0x7F))


def quantize(w: torch.Tensor, blk_amax: torch.Tensor, s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` [..., in] to signed E2M1 nibbles (uint8, one per element) and FP8 block scales."""
    scales = block_scales(blk_amax, s2)
    step = (scales.float() * s2.float()).unsqueeze(-1)
    wb = w.detach().float().unflatten(-1, (-1, BLOCK))
    idx = _e2m1_index_(wb.abs().div_(step))
    sign = ((wb < 0) & (idx > 0)).to(torch.uint8) << 3  # zero is always +0 (nibble 0)
    return (sign | idx).flatten(-2), scales


def dequantize(nibbles: torch.Tensor, scales: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """fp32 values ``e2m1 * (float(scale_b) * s2)`` of unpacked nibbles [..., in]."""
    return dequantize_with_step(nibbles, scales.float() * s2.float())


def dequantize_with_step(nibbles: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """fp32 values ``e2m1 * step_b`` of unpacked nibbles [..., in], one step per block [..., in/16]."""
    mag = e2m1_values(nibbles.device)[(nibbles & 7).long()]
    val = torch.where((nibbles >> 3).bool(), -mag, mag).unflatten(-1, (-1, BLOCK))
    return (val * step.unsqueeze(-1)).flatten(-2)


def fake_quantize(w: torch.Tensor, blk_amax: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize ``w`` with the given block amaxes and scale_2, in ``w``'s dtype.

    The values of ``dequantize(*quantize(w, ...))`` (a test holds them equal), computed without
    building nibbles: ``copysign(e2m1_round(|w| / step) * step, w)`` (a zero keeps w's sign).
    """
    step = block_steps(blk_amax, s2).unsqueeze(-1)
    wb = w.detach().float().unflatten(-1, (-1, BLOCK))
    return round_to_step(wb, step).flatten(-2).to(w.dtype)


def round_to_step(w: torch.Tensor, step: torch.Tensor, mag: torch.Tensor | None = None) -> torch.Tensor:
    """``copysign(e2m1_round(|w| / step) * step, w)`` element-wise in fp32 (``step`` broadcasts to ``w``; a
    zero keeps w's sign). ``mag``: ``|w|`` in fp32 already taken, a temporary the result is written into."""
    mag = w.abs().float() if mag is None else mag
    return _e2m1_round_(mag.div_(step)).mul_(step).copysign_(w)


def fake_quantize_dynamic(x: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """Activation fake quant: static per-tensor ``s2``, block amaxes taken from ``x`` itself (one ``|x|``
    for both)."""
    xb = x.detach().float().unflatten(-1, (-1, BLOCK))
    mag = xb.abs()
    step = block_steps(mag.amax(-1), s2).unsqueeze(-1)
    return round_to_step(xb, step, mag).flatten(-2).to(x.dtype)


def pack(nibbles: torch.Tensor) -> torch.Tensor:
    """Two nibbles per byte along the last dim; the low nibble holds the even column."""
    n = nibbles.to(torch.uint8)
    return n[..., 0::2] | (n[..., 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def row_chunks(w: torch.Tensor, budget_bytes: int = 64 * 2**20) -> list[slice]:
    """Slices of ``w``'s first dim (experts, or rows of a 2-D weight) whose fp32 copy fits ``budget_bytes``.

    Quantization is independent per block of 16 along the last dim, so any such slicing gives the
    same bytes; it bounds the fp32 temporaries of a large fused weight to about ``budget_bytes``.
    """
    if w.dim() < 2 or w.numel() * 4 <= budget_bytes:
        return [slice(None)]
    step = max(1, budget_bytes // max(1, w[0].numel() * 4))
    return [slice(i, i + step) for i in range(0, w.shape[0], step)]


def fp8_candidates(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 126 finite positive E4M3 values divided by 448, ascending (fp32).

    Candidate ``k`` proposes the block amax ``c_k * g``; its block scale byte is then exactly
    that E4M3 value. Index 0..6 are the subnormals ``m * 2^-9``; index ``7 + 8*(e-1) + m``
    is the normal ``2^(e-7) * (1 + m/8)``.
    """
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
    vals = codes[torch.isfinite(codes) & (codes > 0)].unique()
    return (vals / FP8_MAX).to(device)


# -- FP8 E4M3 with one static per-tensor scale (the ``fp8`` format: W8A8) ---------------------------
# ``scale = amax / 448``; bytes ``E4M3(clamp(x / scale, +-448))``; values ``float(byte) * scale``.


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """fp32 per-tensor FP8 scale ``amax / 448`` (kept above the smallest normal: a zero tensor stays zero)."""
    return (amax.float() / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 bytes of ``x`` under ``scale`` (round to nearest even, saturated at +-448)."""
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def fp8_fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``float(fp8_quantize(x, scale)) * scale`` in ``x``'s dtype: what an FP8 engine computes with."""
    return (fp8_quantize(x, scale).float() * scale.float()).to(x.dtype)
