"""Quantizer modules and the quantized Linear.

Every quantizer runs in one of three modes, set model-wide with :func:`set_mode`:

* ``off``   - identity (the original model);
* ``calib`` - identity, recording statistics (input amax by max calibration);
* ``quant`` - fake quantization with exactly the scales the export writes.

Weight quantizers are static: their amaxes come from the weight itself
(:meth:`WeightQuantizer.calibrate`), then optionally from the MSE sweep.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..numerics import nvfp4
from ..numerics.hessian import block_hessian
from ..numerics.tune import straight_through

MODES = ("off", "calib", "quant")


# Sibling projections that engines fuse and that must share one weight_scale_2.
FUSED_SCALE_GROUPS = (
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
    ("q_proj", "k_proj", "v_proj"),
    ("q_a_proj", "kv_a_proj_with_mqa"),  # DeepSeek MLA: engines fuse these two
)
INPUT_KINDS = ("nvfp4", "fp8", "none")  # how a quantized weight's input is quantized in quant mode
INPUT_KIND = {"nvfp4": "nvfp4", "nvfp4_w4a16": "none", "fp8": "fp8"}  # a rule's format -> its input's kind


class InputQuantizer(nn.Module):
    """Per-tensor static activation quantizer: NVFP4 (block scales taken at run time), FP8 (``kind="fp8"``)
    or none (``kind="none"``: a weight-only format; the input is still observed, for the Hessians).

    ``amax`` has shape ``[n]`` (one per expert for fused experts, ``n = 1`` otherwise).
    ``input_scale = amax / (6 * 448)`` (NVFP4) or ``amax / 448`` (FP8).
    """

    # how each calibration statistic combines across data-parallel ranks (see view.sync_statistics)
    STATISTICS = {"amax": "max", "seen": "sum", "hessian": "sum"}

    def __init__(self, n: int = 1, kind: str = "nvfp4"):
        super().__init__()
        if kind not in INPUT_KINDS:
            raise ValueError(f"input quantizer kind {kind!r}; valid: {INPUT_KINDS}")
        self.mode = "off"
        self.kind = kind
        self.register_buffer("amax", torch.zeros(n, dtype=torch.float32))
        self.register_buffer("seen", torch.zeros(n, dtype=torch.int64))  # rows observed
        self.fixed_scale: torch.Tensor | None = None  # set when rebuilt from an export
        # input Hessians: per block of 16 channels [n, in/16, 16, 16] (fp64 sums, the Hessian-weighted
        # sweep) or whole [n, in, in] (fp32 sums, GPTQ), one per expert for fused experts
        self.hessian: torch.Tensor | None = None
        self.full_hessian = False
        self.diag_hessian = False  # [n, in]: sum_t x_i^2 per input channel
        self.grad_through = False  # layer-output tuning: gradients pass the rounding (straight through)
        # siblings fed the same input (q/k/v, gate/up) keep one full Hessian: the others name its holder here
        # (a tuple, so that the holder is not registered as a submodule)
        self.hessian_of: tuple[InputQuantizer, ...] = ()

    def enable_hessian(self, in_features: int, full: bool = False, diag: bool = False) -> None:
        """Accumulate ``sum_t x_b x_b^T`` per block of 16 input channels (``full``: ``sum_t x x^T`` over all
        input channels, for GPTQ; ``diag``: only its diagonal ``sum_t x_i^2`` per channel, for the imatrix
        sweep) during calibration (see hessian.py, gptq.py, mse.py)."""
        if self.hessian is None:
            n, dev = self.amax.numel(), self.amax.device
            self.full_hessian, self.diag_hessian = full, diag and not full
            if self.diag_hessian:
                self.hessian = torch.zeros((n, in_features), dtype=torch.float64, device=dev)
                return
            shape = (n, in_features, in_features) if full else (n, in_features // nvfp4.BLOCK, nvfp4.BLOCK, nvfp4.BLOCK)
            self.hessian = torch.zeros(shape, dtype=torch.float32 if full else torch.float64, device=dev)

    def hessian_holder(self) -> InputQuantizer:
        """The quantizer whose ``hessian`` holds this input's Hessian (itself, or the sibling it shares with)."""
        return self.hessian_of[0] if self.hessian_of else self

    def block_hessians(self, idx: list[int]) -> torch.Tensor:
        """The per-block Hessians ``H_b`` [len(idx), in/16, 16, 16] (fp32) of entries ``idx``; from a full
        Hessian they are its 16 x 16 diagonal blocks (GPTQ on Hessian-swept scales)."""
        h = self.hessian[idx].float()
        if not self.full_hessian:
            return h
        n, f = h.shape[0], h.shape[-1] // nvfp4.BLOCK
        blocks = h.reshape(n, f, nvfp4.BLOCK, f, nvfp4.BLOCK).diagonal(dim1=1, dim2=3)  # [n, 16, 16, f]
        return blocks.permute(0, 3, 1, 2).contiguous()

    def add_hessian(self, i: int, x: torch.Tensor) -> None:
        """Add rows ``x`` [..., in] to Hessian ``i`` (the sums follow the rows to their device: a model
        moved to the GPU after the Hessians were enabled accumulates there)."""
        if self.hessian.device != x.device:
            self.hessian = self.hessian.to(x.device)
        if not (self.diag_hessian or self.full_hessian):
            self.hessian[i] += block_hessian(x).to(torch.float64)
            return
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        if self.diag_hessian:
            self.hessian[i] += rows.square().sum(0).to(torch.float64)
        else:
            self.hessian[i] += rows.t() @ rows

    def observe(self, x: torch.Tensor, i: int = 0) -> None:
        if x.numel():
            self.amax[i] = torch.maximum(self.amax[i], x.detach().abs().amax().float())
            self.seen[i] += x.numel() // max(x.shape[-1], 1)
            if self.hessian is not None:
                self.add_hessian(i, x)

    def input_scale(self) -> torch.Tensor:
        """``amax / (6 * 448)`` with the max over all rows of ``amax`` (one scale per tensor/layer)."""
        if self.fixed_scale is not None:
            return self.fixed_scale
        if self.kind == "fp8":
            return nvfp4.fp8_scale(self.shared_amax())
        return nvfp4.scale_2(self.shared_amax())

    def shared_amax(self) -> torch.Tensor:
        """The max over all rows: for fused experts, the layer's one input amax per projection."""
        return self.amax.amax()

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Quant mode's values of ``x`` (its own kind); with ``grad_through`` its gradient passes unchanged."""
        s = self.input_scale().to(x.device)
        with torch.no_grad() if self.grad_through else contextlib.nullcontext():  # no graph for the rounding
            q = nvfp4.fake_quantize_dynamic(x, s) if self.kind == "nvfp4" else nvfp4.fp8_fake_quantize(x, s)
        return straight_through(x, q) if self.grad_through else q

    def forward(self, x: torch.Tensor, i: int = 0) -> torch.Tensor:
        if self.mode == "calib":
            self.observe(x, i)
        elif self.mode == "quant" and self.kind in ("nvfp4", "fp8"):
            return self.fake_quant(x)
        return x


class WeightQuantizer(nn.Module):
    """Static NVFP4 weight quantizer for a weight ``[*lead, out, in]``.

    ``global_amax`` has shape ``lead`` (``[E]`` for fused experts, ``[]`` for a Linear);
    ``block_amax`` has shape ``[*lead, out, in/16]``. ``weight_scale_2 = global_amax / (6 * 448)``.
    In a sharded run (:mod:`nvfp4cal.sharded`) ``rows = (start, stop)``: ``block_amax`` holds only
    those rows of dim 0 (this rank's rows, or experts, of the weight); ``global_amax`` stays whole.
    """

    def __init__(self, shape: torch.Size):
        super().__init__()
        self.mode = "off"
        *lead, out, inp = shape
        self.register_buffer("global_amax", torch.zeros(lead, dtype=torch.float32))
        self.register_buffer("block_amax", torch.zeros(*lead, out, inp // nvfp4.BLOCK, dtype=torch.float32))
        self._cache: torch.Tensor | None = None
        self.rows: tuple[int, int] | None = None
        # layer-output tuning: quant mode computes with tuned(w) (differentiable) instead of the cache
        self.tuned: Callable[[torch.Tensor], torch.Tensor] | None = None

    @torch.no_grad()
    def calibrate(self, w: torch.Tensor) -> None:
        """Max calibration from the weight itself (in chunks: no fp32 copy of a whole fused weight)."""
        self.global_amax.copy_(self.calibrate_blocks(w))

    @torch.no_grad()
    def calibrate_blocks(self, w: torch.Tensor) -> torch.Tensor:
        """``block_amax`` from ``w`` (the rows it holds), a chunk at a time; returns the max per leading index."""
        for c in nvfp4.row_chunks(w):
            self.block_amax[c].copy_(nvfp4.block_amax(w[c]))
        self._cache = None
        return self.block_amax.flatten(-2).amax(-1)

    def scale_2(self) -> torch.Tensor:
        return nvfp4.scale_2(self.global_amax)

    def local_global_amax(self) -> torch.Tensor:
        """``global_amax`` of the rows ``block_amax`` holds: this rank's experts when sharded."""
        g = self.global_amax
        return g[self.rows[0] : self.rows[1]] if self.rows is not None and g.dim() else g

    def scale_2_bcast(self, device: torch.device) -> torch.Tensor:
        """``scale_2`` shaped to broadcast over ``[*lead, out, in/16]`` (this rank's experts when sharded)."""
        return nvfp4.scale_2(self.local_global_amax()).to(device)[(...,) + (None,) * 2]

    def chunks(self, w: torch.Tensor) -> list[tuple[slice, torch.Tensor, torch.Tensor]]:
        """(rows, their block amaxes, their scale_2) for the chunks of ``w`` that
        :func:`nvfp4.row_chunks` bounds: a fused weight's experts (or a big weight's rows) a few at a time."""
        s2 = self.scale_2_bcast(w.device)
        return [(c, self.block_amax[c].to(w.device), s2[c] if s2.dim() == 3 else s2) for c in nvfp4.row_chunks(w)]

    @torch.no_grad()
    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        chunks = self.chunks(w)
        if len(chunks) == 1:
            return nvfp4.fake_quantize(w, *chunks[0][1:])
        out = torch.empty_like(w)
        for c, blk, s2 in chunks:
            out[c] = nvfp4.fake_quantize(w[c], blk, s2)
        return out

    def quantized(self, w: torch.Tensor) -> torch.Tensor:
        """``fake_quant(w)``, kept until the amaxes change (calibrate, shared scales, the sweep)."""
        if self._cache is None or self._cache.device != w.device:
            self._cache = self.fake_quant(w)
        return self._cache

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.mode != "quant":
            return w
        return self.quantized(w) if self.tuned is None else self.tuned(w)

    def clear_cache(self) -> None:
        self._cache = None


class FP8WeightQuantizer(nn.Module):
    """Static FP8 E4M3 weight quantizer with one per-tensor scale ``weight_scale = amax / 448``
    (the ``fp8`` format); not an NVFP4 weight: the sweep, GPTQ and the SQNR report leave it alone."""

    def __init__(self):
        super().__init__()
        self.mode = "off"
        self.register_buffer("amax", torch.zeros((), dtype=torch.float32))
        self._cache: torch.Tensor | None = None

    @torch.no_grad()
    def calibrate(self, w: torch.Tensor) -> None:
        self.amax.copy_(w.detach().abs().amax().float())
        self._cache = None

    def scale(self) -> torch.Tensor:
        return nvfp4.fp8_scale(self.amax)

    @torch.no_grad()
    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        return nvfp4.fp8_fake_quantize(w.detach(), self.scale().to(w.device))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.mode != "quant":
            return w
        if self._cache is None or self._cache.device != w.device:
            self._cache = self.fake_quant(w)
        return self._cache

    def clear_cache(self) -> None:
        self._cache = None


class KVCastQuantizer(nn.Module):
    """FP8 E4M3 KV-cache quantizer, "cast" flavor: constant amax 448, so the scale is 1.0.

    Applied to the k_proj / v_proj outputs (before RoPE for K: an approximation of the cache).
    """

    def __init__(self):
        super().__init__()
        self.mode = "off"
        self.register_buffer("amax", torch.tensor(nvfp4.FP8_MAX))
        self.grad_through = False  # layer-output tuning: gradients pass the FP8 cast

    def kv_scale(self) -> torch.Tensor:
        return self.amax / nvfp4.FP8_MAX

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.mode != "quant":
            return y
        s = self.kv_scale().to(y.device)
        q = (y.detach().float() / s).clamp(-nvfp4.FP8_MAX, nvfp4.FP8_MAX).to(nvfp4.FP8)
        out = (q.float() * s).to(y.dtype)
        return straight_through(y, out) if self.grad_through else out


class QuantLinear(nn.Linear):
    """An ``nn.Linear`` whose class was swapped in place, so names and state-dict keys stay.

    Holds any of ``input_quantizer``, ``weight_quantizer`` (NVFP4 or FP8) and ``output_quantizer`` (KV cast).
    """

    input_quantizer: InputQuantizer | None
    weight_quantizer: WeightQuantizer | FP8WeightQuantizer | None
    output_quantizer: KVCastQuantizer | None

    @classmethod
    def convert(
        cls, linear: nn.Linear, nvfp4_on: bool, kv: bool, weights: bool = True, fmt: str = "nvfp4"
    ) -> QuantLinear:
        """Swap the class in place; ``nvfp4_on``: quantize the weight in format ``fmt`` (``nvfp4``,
        ``nvfp4_w4a16`` or ``fp8``); ``weights=False`` adds only the input quantizer (rebuilt exports)."""
        if not isinstance(linear, QuantLinear):
            linear.__class__ = cls
            linear.input_quantizer = linear.weight_quantizer = linear.output_quantizer = None
        dev = linear.weight.device
        if nvfp4_on:
            linear.input_quantizer = InputQuantizer(kind=INPUT_KIND[fmt]).to(dev)
        if nvfp4_on and weights:
            wq = FP8WeightQuantizer() if fmt == "fp8" else WeightQuantizer(linear.weight.shape)
            linear.weight_quantizer = wq.to(dev)
            if not linear.weight.is_meta:
                linear.weight_quantizer.calibrate(linear.weight)
        if kv:
            linear.output_quantizer = KVCastQuantizer().to(linear.weight.device)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
        y = F.linear(x, w, self.bias)
        if self.output_quantizer is not None:
            y = self.output_quantizer(y)
        return y


QUANTIZER_TYPES = (InputQuantizer, WeightQuantizer, FP8WeightQuantizer, KVCastQuantizer)  # what has a mode


def set_mode(model: nn.Module, mode: str) -> None:
    """Put every quantizer of ``model`` into ``mode`` (off | calib | quant)."""
    if mode not in MODES:
        raise ValueError(f"unknown quantizer mode {mode!r}; use one of {MODES}")
    for m in model.modules():
        if isinstance(m, QUANTIZER_TYPES):
            m.mode = mode


def clear_caches(model: nn.Module) -> None:
    """Drop every weight quantizer's cached fake-quant weight (frees a model-sized copy)."""
    for m in model.modules():
        if isinstance(m, (WeightQuantizer, FP8WeightQuantizer)):
            m.clear_cache()
