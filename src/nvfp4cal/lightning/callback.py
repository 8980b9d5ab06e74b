"""PostCalibration: the one callback, which runs the post-calibration steps in order and times them.

The steps (:mod:`nvfp4cal.steps`) are made for the run's context when calibration starts
(``make_steps(ctx)``) and get a ``start`` call then (the export's early writers). The schedule calls
:meth:`PostCalibration.run_unit` for every calibrated unit (the whole model once, or each decoder
layer: bootstrap, measure, the algorithm's hook); after the pass the run's own steps follow (export,
evaluate). Each is timed as a stage of its name.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import lightning as L

from ..algorithms import Unit, UnitInputs, UnitRun
from ..evaluation.metrics import stage
from ..model.quantizers import clear_caches
from ..numerics.comm import RunContext
from ..results import Results
from ..steps import Step, StepPlan


class PostCalibration(L.Callback):
    """Runs the steps of ``make_steps(ctx)``; fills ``results``."""

    def __init__(self, make_steps: Callable[[RunContext], StepPlan], results: Results):
        super().__init__()
        self.make_steps, self.results = make_steps, results
        self.plan: StepPlan | None = None
        self.ctx: RunContext | None = None

    @property
    def steps(self) -> list[Step]:
        return self.plan.all() if self.plan is not None else []

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ctx = pl_module.ctx
        self.plan = self.make_steps(self.ctx)
        for step in self.steps:
            step.start(pl_module.model, self.ctx)

    def _run(self, steps: list[Step], unit: Unit, inputs: UnitInputs | None, results: Results, ctx) -> None:
        def timed(name: str) -> AbstractContextManager:
            return stage(results.stages, name, ctx.device)

        run = UnitRun(ctx, results, timed, keep=self.plan.keep)
        for step in steps:
            if step.timed:
                with timed(step.name):
                    step.run(unit, inputs, run)
            else:
                step.run(unit, inputs, run)

    def run_unit(self, unit: Unit, inputs: UnitInputs, results: Results, ctx: RunContext) -> None:
        """The per-unit steps on one calibrated unit (called by the schedule)."""
        self._run(self.plan.per_unit, unit, inputs, results, ctx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        self._run(self.plan.once, Unit("", model, model), None, self.results, self.ctx)
        clear_caches(model)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        for step in self.steps:
            step.abort()
