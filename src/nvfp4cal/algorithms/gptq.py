"""``method: gptq`` - fixed block scales (from max calibration, the FP8 sweep or the Hessian-weighted
sweep: ``scales``), then GPTQ rounding of every NVFP4 weight under its full input Hessian
``H = sum_t x x^T`` (:mod:`nvfp4cal.numerics.gptq`, driven by :mod:`nvfp4cal.algorithms.rounding`). It needs each layer's
inputs from its already-quantized predecessors: layer by layer with quantized propagation. It changes the
weights (to GPTQ's grid points), which the layer state keeps."""

from __future__ import annotations

from dataclasses import dataclass

from ..model.rounding import gptq_weights
from ..model.sweep import KERNELS
from ..results import GptqSummary
from .base import Algorithm, AlgorithmError, Needs, Unit, UnitInputs, UnitRun, check_headroom
from .fp8_sweep import sweep_scales

SCALES = ("max", "mse", "hessian_mse")  # how the fixed block scales are chosen


@dataclass(frozen=True)
class GptqParams:
    scales: str = "mse"
    dampening: float = 0.01
    block_columns: int = 128
    act_order: bool = False
    min_tokens: int = 16  # experts (or Linears) whose input saw fewer rows keep plain rounding
    kernel: str = "auto"  # the scales' sweep and the GPTQ column loop: auto (Triton on CUDA) | reference | triton
    headroom: float = 1.0  # per-tensor scale headroom (base.apply_headroom)

    def __post_init__(self):
        check_headroom(self.headroom)
        if self.scales not in SCALES:
            raise AlgorithmError(f"recipe.algorithm.scales={self.scales!r} unknown; valid: {list(SCALES)}")
        if self.kernel not in KERNELS:
            raise AlgorithmError(f"recipe.algorithm.kernel={self.kernel!r} unknown; valid: {list(KERNELS)}")
        if not (0 < self.dampening < 1) or self.block_columns < 1 or self.min_tokens < 1:
            raise AlgorithmError("recipe.algorithm: dampening must be in (0, 1), block_columns and min_tokens >= 1")


def gptq_stage(unit: Unit, run: UnitRun, params) -> None:
    """GPTQ rounding of the unit's NVFP4 weights under their fixed block scales (stage ``gptq``): the summary
    and each weight's errors into ``run.results``. Layer-output tuning starts from it too."""
    with run.stage("gptq"):
        summary, per_weight = gptq_weights(unit.module, run.ctx, params)
        run.results.add("gptq", GptqSummary(**summary))
        for n, e in per_weight.items():
            run.results.weights.setdefault(n, {})["gptq"] = e


class Gptq(Algorithm):
    method = "gptq"
    Params = GptqParams
    refines = True
    changes_weights = True
    needs = Needs(layerwise=True, propagate="quantized", whole_weights=True)

    @property
    def kernel(self) -> str | None:
        return self.params.kernel if self.params.scales != "max" else None

    @property
    def hessian(self) -> str:
        return "full"  # the Hessian-weighted scales read its 16 x 16 diagonal blocks

    def after(self, unit: Unit, inputs: UnitInputs, run: UnitRun) -> None:
        p = self.params
        if p.scales != "max":
            sweep_scales(unit, run, p.kernel, hessian=p.scales == "hessian_mse")
        gptq_stage(unit, run, p)
