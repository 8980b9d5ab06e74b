"""``method: mse`` - after max calibration, each NVFP4 block's FP8 scale is the one of the 126 FP8
candidates ``c_k * g`` that minimises the block's squared weight error
``sum_i (w_i - fq(w_i; c_k g))^2`` (the exact sweep: :mod:`nvfp4cal.numerics.mse`, Triton in
:mod:`nvfp4cal.numerics.kernels.fp8_sweep`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..model.sweep import KERNELS, mse_sweep
from ..results import SweepSummary
from .base import Algorithm, AlgorithmError, Unit, UnitInputs, UnitRun, check_headroom


@dataclass(frozen=True)
class SweepParams:
    kernel: str = "auto"  # auto | triton | reference: the same choices, bit for bit
    headroom: float = 1.0  # per-tensor scale headroom (base.apply_headroom)

    def __post_init__(self):
        check_headroom(self.headroom)
        if self.kernel not in KERNELS:
            raise AlgorithmError(f"recipe.algorithm.kernel={self.kernel!r} unknown; valid: {list(KERNELS)}")


def sweep_scales(unit: Unit, run: UnitRun, kernel: str, hessian: bool = False, diag: bool = False) -> None:
    """The FP8-scale sweep over the unit's NVFP4 weights (stage ``sweep``; plain, ``hessian``-weighted or
    ``diag``-weighted), then their errors under the new scales (``measure_mse``). GPTQ fixes its scales so too."""
    with run.stage("sweep"):
        run.results.add("sweep", SweepSummary(**mse_sweep(unit.module, run.ctx, kernel, hessian=hessian, diag=diag)))
    run.measure("measure_mse", "mse", unit)


class Fp8Sweep(Algorithm):
    method = "mse"
    Params = SweepParams
    refines = True
    weighted = False  # the Hessian-weighted sweep sets it
    diag = False  # the imatrix sweep sets it

    @property
    def kernel(self) -> str:
        return self.params.kernel

    def after(self, unit: Unit, inputs: UnitInputs, run: UnitRun) -> None:
        sweep_scales(unit, run, self.kernel, hessian=self.weighted, diag=self.diag)
