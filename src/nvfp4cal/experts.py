"""Fused-experts modules: calibration forward, token counts, dead-expert bootstrap.

transformers 5.x stores a layer's experts fused as 3-D parameters,
``gate_up_proj`` [E, 2I, H] (gate rows first, then up rows) and ``down_proj`` [E, H, I].
:class:`QuantExpertsMixin` is swapped into such a module's class. Its forward is the eager
per-expert loop (the same math as transformers' ``eager`` implementation, whatever
``_experts_implementation`` the model was loaded with), so calibration sees each expert's input
to gate_up and to down, counts its tokens, and in ``quant`` mode runs it W4A4.

Input amaxes are recorded per expert; engines consume one input scale per layer and projection,
the max over the layer's experts (:func:`shared_input_amax`), and so does ``quant`` mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import nvfp4
from .errors import UserError
from .quantizers import InputQuantizer, WeightQuantizer


class UnsupportedExpertsError(UserError):
    pass


def is_fused_experts(module: nn.Module) -> bool:
    """A module holding 3-D expert parameters (the transformers 5.x fused layout or another)."""
    return any(p.dim() == 3 for p in module.parameters(recurse=False))


def check_layout(name: str, module: nn.Module) -> None:
    """Accept the concatenated, untransposed gate_up/down layout; name anything else."""
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    ok = (
        isinstance(gu, nn.Parameter)
        and isinstance(dn, nn.Parameter)
        and gu.dim() == 3
        and dn.dim() == 3
        and getattr(module, "has_gate", True)
        and not getattr(module, "is_transposed", False)
        and getattr(module, "is_concatenated", True)
        and not getattr(module, "has_post_expert_norm", False)
        and gu.shape[0] == dn.shape[0]
        and gu.shape[1] == 2 * dn.shape[2]
        and gu.shape[2] == dn.shape[1]
    )
    if not ok:
        raise UnsupportedExpertsError(
            f"{name}: fused-experts class {type(module).__name__} has a layout nvfp4cal does not know "
            "(expected gate_up_proj [E, 2I, H] and down_proj [E, H, I], concatenated, untransposed); "
            "exclude it with a recipe rule {pattern: '" + name + "*', enable: false} or report the model"
        )


class QuantExpertsMixin:
    """Mixed into a fused-experts class: per-expert calibration and W4A4 forward."""

    gate_up_input: InputQuantizer
    down_input: InputQuantizer
    gate_up_weight: WeightQuantizer | None
    down_weight: WeightQuantizer | None

    def init_quant(self, gate_up_on: bool, down_on: bool, weights: bool = True) -> None:
        n = self.gate_up_proj.shape[0]
        dev = self.gate_up_proj.device
        self.gate_up_input = InputQuantizer(n).to(dev)
        self.down_input = InputQuantizer(n).to(dev)
        self.register_buffer("tokens", torch.zeros(n, dtype=torch.int64, device=dev))
        self.gate_up_weight = self.down_weight = None
        self.inputs_on = (gate_up_on, down_on)
        if gate_up_on and weights:
            self.gate_up_weight = WeightQuantizer(self.gate_up_proj.shape).to(dev)
            self.gate_up_weight.calibrate(self.gate_up_proj)
        if down_on and weights:
            self.down_weight = WeightQuantizer(self.down_proj.shape).to(dev)
            self.down_weight.calibrate(self.down_proj)

    @property
    def quant_on(self) -> bool:
        return any(self.inputs_on)

    def _input(self, q: InputQuantizer, x: torch.Tensor, e: int, on: bool) -> torch.Tensor:
        if q.mode == "calib":
            q.observe(x, e)
            return x
        if q.mode == "quant" and on:
            return nvfp4.fake_quantize_dynamic(x, q.input_scale().to(x.device))
        return x

    def forward(self, hidden_states, top_k_index, top_k_weights):  # noqa: D102 (transformers' signature)
        n = self.gate_up_proj.shape[0]
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            valid = (top_k_index >= 0) & (top_k_index < n)
            counts = torch.bincount(top_k_index[valid].flatten(), minlength=n)
        if self.gate_up_input.mode == "calib":
            self.tokens += counts.to(self.tokens.device)
        gu_w = self.gate_up_proj if self.gate_up_weight is None else self.gate_up_weight(self.gate_up_proj)
        dn_w = self.down_proj if self.down_weight is None else self.down_weight(self.down_proj)
        gu_b = getattr(self, "gate_up_proj_bias", None)
        dn_b = getattr(self, "down_proj_bias", None)
        for e in counts.nonzero().flatten().tolist():
            pos, tok = torch.where(top_k_index.T == e)  # the order of transformers' eager loop
            x = self._input(self.gate_up_input, hidden_states[tok], e, self.inputs_on[0])
            h = F.linear(x, gu_w[e], None if gu_b is None else gu_b[e])
            h = self._apply_gate(h)
            h = self._input(self.down_input, h, e, self.inputs_on[1])
            y = F.linear(h, dn_w[e], None if dn_b is None else dn_b[e])
            y = y * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def convert(name: str, module: nn.Module, gate_up_on: bool, down_on: bool, weights: bool = True) -> nn.Module:
    """Swap :class:`QuantExpertsMixin` into ``module``'s class (in place; names unchanged)."""
    check_layout(name, module)
    if not isinstance(module, QuantExpertsMixin):
        cls = type(module)
        module.__class__ = type(f"Quant{cls.__name__}", (QuantExpertsMixin, cls), {})
        if not hasattr(module, "_apply_gate"):
            module._apply_gate = lambda h, m=module: m.act_fn(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1]
    module.init_quant(gate_up_on, down_on, weights)
    return module


def shared_input_amax(q: InputQuantizer) -> torch.Tensor:
    """The layer's input amax for one projection: the max over its experts."""
    return q.amax.amax()


@dataclass
class DeadExperts:
    """Experts of one layer that received no calibration tokens."""

    module: str
    experts: list[int]
    tokens: list[int]


def bootstrap_dead_experts(model: nn.Module) -> list[DeadExperts]:
    """Give every expert that saw no tokens the layer's shared input amax.

    Weight amaxes are already taken from each expert's own weights at insertion time, so
    after this step nothing is zero, missing or infinite. A layer where no expert saw a token
    has no activation statistics at all: that is an error naming the layer.
    """
    report = []
    for name, m in model.named_modules():
        if not isinstance(m, QuantExpertsMixin):
            continue
        dead = (m.tokens == 0).nonzero().flatten().tolist()
        if len(dead) == m.tokens.numel() and m.quant_on:
            raise UserError(f"{name}: no expert received a calibration token; raise data.num_samples or data.seq_len")
        for q in (m.gate_up_input, m.down_input):
            shared = shared_input_amax(q)
            for e in dead:
                q.amax[e] = shared
        report.append(DeadExperts(name, dead, m.tokens.tolist()))
    return report


def check_inputs_calibrated(model: nn.Module) -> None:
    """Every enabled input quantizer outside fused experts must have seen data."""
    from .quantizers import QuantLinear

    missing = [
        n
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear) and m.input_quantizer is not None and int(m.input_quantizer.seen.sum()) == 0
    ]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(
            f"{', '.join(missing[:3])}{more} received no calibration data; check data.num_samples or exclude them in the recipe"
        )
