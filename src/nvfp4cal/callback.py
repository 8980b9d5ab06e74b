"""PostCalibration: the one callback, which runs the post-calibration steps in order and times them.

The steps (:mod:`nvfp4cal.steps`: bootstrap -> measure -> sweep -> export -> evaluate) are made for
the run's context when calibration starts (``make_steps(ctx)``), get a ``start`` call then (the
export's early writers), and run after calibration, each timed as a stage of its own name.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L

from .comm import RunContext
from .evaluate import stage
from .quantizers import clear_caches
from .steps import Results, Step


class PostCalibration(L.Callback):
    """Runs after ``Trainer.validate``'s calibration pass; fills ``results``."""

    def __init__(self, make_steps: Callable[[RunContext], list[Step]], results: Results):
        super().__init__()
        self.make_steps, self.results = make_steps, results
        self.steps: list[Step] = []

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.steps = self.make_steps(pl_module.ctx)
        for step in self.steps:
            step.start(pl_module.model, pl_module.ctx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model, ctx = pl_module.model, pl_module.ctx
        for step in self.steps:
            with stage(self.results.stages, step.name, ctx.device):
                step.run(model, ctx, self.results)
        clear_caches(model)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        for step in self.steps:
            step.abort()
