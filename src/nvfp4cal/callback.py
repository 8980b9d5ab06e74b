"""PostCalibration: the one callback that orders the post-calibration steps.

dead-expert bootstrap -> MSE sweep -> export (global rank 0). Each step is a plain function
(:func:`experts.bootstrap_dead_experts`, :func:`sweep.mse_sweep`, :func:`export.modelopt.export_modelopt`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import lightning as L
import torch

from .errors import UserError
from .experts import bootstrap_dead_experts, check_inputs_calibrated
from .export.modelopt import export_modelopt
from .recipe import Algorithm
from .sweep import mse_sweep

log = logging.getLogger("nvfp4cal")


@dataclass
class ExportConfig:
    dir: str
    overwrite: bool = False
    format: str = "modelopt"
    max_shard_size_gb: float = 5.0

    def __post_init__(self):
        if self.format != "modelopt":
            raise UserError(f"export.format={self.format!r} is not supported yet; use modelopt")
        if not self.max_shard_size_gb > 0:
            raise UserError("export.max_shard_size_gb must be > 0")


class PostCalibration(L.Callback):
    """Runs after ``Trainer.validate``'s calibration pass; fills ``times`` and ``results``."""

    def __init__(self, export: ExportConfig, algorithm: Algorithm, tokenizer=None):
        super().__init__()
        self.export, self.algorithm, self.tokenizer = export, algorithm, tokenizer
        self.dtypes: dict | None = None  # original dtypes when the model was upcast for CPU
        self.times: dict[str, float] = {}
        self.results: dict = {}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        progress = trainer.is_global_zero
        t0 = time.perf_counter()
        check_inputs_calibrated(model)
        dead = bootstrap_dead_experts(model)
        self.results["experts"] = [vars(d) for d in dead]
        self.times["bootstrap"] = time.perf_counter() - t0
        if self.algorithm.sweep:
            t0 = time.perf_counter()
            self.results["sweep"] = mse_sweep(model, self.algorithm.kernel, progress=progress)
            self.times["sweep"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if trainer.is_global_zero:
            self.results["export"] = export_modelopt(
                model,
                self.export.dir,
                self.tokenizer,
                self.export.overwrite,
                self.export.max_shard_size_gb,
                progress,
                dtypes=self.dtypes,
            )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            trainer.strategy.barrier("nvfp4cal-export")
        self.times["export"] = time.perf_counter() - t0
