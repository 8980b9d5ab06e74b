"""The dead-expert bootstrap step: experts that saw no calibration token get their layer's input amax."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..numerics.errors import UserError
from .experts import QuantExpertsMixin
from .quantizers import QuantLinear


@dataclass
class DeadExperts:
    """Experts of one layer that received no calibration tokens."""

    module: str
    experts: list[int]
    tokens: list[int]
    input_amax: dict[str, list[float]]  # per expert, as calibrated (before the shared value is applied)


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
        amaxes = {m.first_proj: m.gate_up_input.amax.tolist(), "down_proj": m.down_input.amax.tolist()}
        for q in (m.gate_up_input, m.down_input):
            shared = q.shared_amax()
            for e in dead:
                q.amax[e] = shared
        report.append(DeadExperts(name, dead, m.tokens.tolist(), amaxes))
    return report


def check_inputs_calibrated(model: nn.Module) -> None:
    """Every enabled input quantizer outside fused experts must have seen data."""
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
