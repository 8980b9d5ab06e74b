"""The calibration of one unit (the whole model, or one decoder layer), the same in every schedule.

:func:`begin_unit` -> forward over the unit's inputs with the quantizers calibrating -> :func:`end_unit`
(statistics reduced across ranks) -> the per-unit steps (bootstrap, measure, the algorithm's ``after``:
run by the :class:`~nvfp4cal.lightning.callback.PostCalibration` callback) -> the schedule persists the
unit. :func:`calibrate_unit` runs the whole sequence for a unit whose inputs are at hand (a decoder
layer); the whole-model schedule runs the same pieces around the Trainer's pass over the DataModule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .algorithms import Algorithm, Unit, UnitInputs
from .model.experts import QuantExpertsMixin
from .model.insert import enable_hessians, share_global_amax
from .model.quantizers import InputQuantizer, KVCastQuantizer, set_mode
from .model.view import check_finite, fp8_weights, sync_statistics, weight_quantizers
from .numerics import nvfp4
from .numerics.comm import RunContext
from .results import Results

# runs the per-unit steps on a calibrated unit (the callback's ``run_unit``)
RunUnit = Callable[[Unit, UnitInputs, Results, RunContext], None]


def reset_statistics(module: nn.Module) -> None:
    """Every calibration statistic back to its start (a unit whose buffers came from elsewhere)."""
    for m in module.modules():
        if isinstance(m, InputQuantizer):
            m.amax.zero_()
            m.seen.zero_()
            m.hessian = None
        elif isinstance(m, QuantExpertsMixin):
            m.tokens.zero_()
        elif isinstance(m, KVCastQuantizer):
            m.amax.fill_(nvfp4.FP8_MAX)


def begin_unit(unit: Unit, algorithm: Algorithm, ctx: RunContext) -> None:
    """Before the unit's calibration pass: a fresh unit (weights just read) is checked, its statistics
    zeroed and its weight quantizers calibrated from its weights; then the algorithm's ``before`` hook,
    the statistics it observes, and the quantizers in calib mode."""
    if unit.fresh:
        check_finite(unit.module)
        reset_statistics(unit.module)
        for _, wq, w in [*weight_quantizers(unit.module), *fp8_weights(unit.module)]:
            wq.calibrate(w)
        share_global_amax(unit.module)
    algorithm.before(unit, ctx)
    if algorithm.hessian is not None:
        enable_hessians(unit.module, kind=algorithm.hessian)
    set_mode(unit.module, "calib")


def end_unit(unit: Unit, ctx: RunContext) -> None:
    """After the calibration pass: quantizers off, statistics combined across ranks."""
    set_mode(unit.module, "off")
    sync_statistics(unit.module, ctx.comm)


@torch.no_grad()
def forward(unit: Unit, inputs: UnitInputs, mode: str, keep: Callable[[int, torch.Tensor], None] | None = None) -> None:
    """Every input batch through ``unit.forward`` with the quantizers in ``mode`` (``keep(b, out)``
    receives each output)."""
    set_mode(unit.module, mode)
    try:
        for b, (args, kwargs) in enumerate(inputs):
            out = unit.forward(*args, **kwargs)
            if keep is not None:
                keep(b, out)
    finally:
        set_mode(unit.module, "off")


def calibrate_unit(
    unit: Unit,
    inputs: UnitInputs,
    algorithm: Algorithm,
    ctx: RunContext,
    run_unit: RunUnit,
    keep: Callable[[int, torch.Tensor], None] | None = None,
) -> Results:
    """Calibrate one unit whose inputs are at hand and run its steps; returns the unit's results.
    ``keep(b, out)`` receives the calibration pass's outputs (the next unit's unquantized inputs)."""
    begin_unit(unit, algorithm, ctx)
    forward(unit, inputs, "calib", keep)
    end_unit(unit, ctx)
    results = Results()
    run_unit(unit, inputs, results, ctx)
    return results
