"""Source checkpoints that are quantized already, read as floating-point weights.

Supported: block-scaled FP8 as DeepSeek-V3/R1 and Kimi-K2 ship it (``quantization_config``:
``quant_method: fp8``, ``fmt: e4m3``, ``weight_block_size: [128, 128]``): a Linear weight ``W``
[out, in] is stored as ``float8_e4m3fn`` with ``W.weight_scale_inv`` float32
[ceil(out/128), ceil(in/128)], and ``W[i, j] = float(q[i, j]) * scale_inv[i // 128, j // 128]``
(computed in fp32, then cast to the model's dtype: what transformers' FP8 dequantization computes).
Any other ``quant_method`` in a source's config is refused with its name.
"""

from __future__ import annotations

import torch

from ..numerics.errors import UserError

SCALE_SUFFIX = "_scale_inv"  # the block scales of ``X.weight`` are ``X.weight_scale_inv``


class SourceFormatError(UserError):
    pass


def source_format(quantization_config: dict | None, where: str) -> dict | None:
    """What quantization the source checkpoint at ``where`` carries (None: plain floating point)."""
    if not quantization_config:
        return None
    qc = dict(quantization_config)
    method = qc.get("quant_method")
    if method != "fp8":
        raise SourceFormatError(
            f"{where}: its quantization_config.quant_method={method!r} is not a source format nvfp4cal reads; "
            "supported: fp8 (block-scaled E4M3, as DeepSeek-V3 and Kimi-K2 ship)"
        )
    block = qc.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise SourceFormatError(f"{where}: fp8 quantization_config needs weight_block_size [rows, cols], got {block!r}")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise SourceFormatError(f"{where}: fp8 fmt {qc.get('fmt')!r} is not read; supported: e4m3")
    return {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}


def dequantize_rows(q: torch.Tensor, scale_inv: torch.Tensor, start: int, block: list[int], dtype) -> torch.Tensor:
    """Rows ``[start, start + len(q))`` of an FP8 weight: ``q`` those rows (E4M3), ``scale_inv`` the
    block-scale rows that cover them (from ``start // block[0]``) -> ``dtype``."""
    br, bc = block
    rows = torch.arange(start, start + q.shape[0]) // br - start // br
    s = scale_inv.float()[rows].repeat_interleave(bc, dim=1)[:, : q.shape[1]]
    return (q.float() * s).to(dtype)
