"""PostCalibration: the one callback that orders the post-calibration steps.

dead-expert bootstrap -> MSE sweep -> export (global rank 0). Each step is a plain function
(:func:`experts.bootstrap_dead_experts`, :func:`sweep.mse_sweep`, :class:`export.plan.CheckpointWriter`);
on a GPU the unquantized tensors are written while calibration runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from .errors import UserError
from .evaluate import perplexity, stage, weight_errors
from .experts import bootstrap_dead_experts, check_inputs_calibrated
from .export import compressed_tensors, modelopt
from .export.plan import CheckpointWriter, follow_export, plan_export
from .quantizers import clear_caches
from .recipe import Algorithm
from .sharded import ShardedStrategy, UnitGate
from .sweep import mse_sweep

log = logging.getLogger("nvfp4cal")


# layout -> (naming and storage, config writer)
EXPORTERS = {
    "modelopt": (modelopt.MODELOPT, modelopt.configure),
    "compressed_tensors": (compressed_tensors.COMPRESSED_TENSORS, compressed_tensors.configure),
}


@dataclass
class ExportConfig:
    """``format``: modelopt | compressed_tensors | both (then ``dir/modelopt`` and ``dir/compressed_tensors``)."""

    dir: str
    overwrite: bool = False
    format: str = "modelopt"
    max_shard_size_gb: float = 5.0

    def __post_init__(self):
        if self.format not in (*EXPORTERS, "both"):
            raise UserError(f"export.format={self.format!r} unknown; use one of {[*EXPORTERS, 'both']}")
        if not self.max_shard_size_gb > 0:
            raise UserError("export.max_shard_size_gb must be > 0")

    def check_model(self, model: torch.nn.Module) -> None:
        """Plan every export now (cheap: names and slices only) so that an impossible layout fails early."""
        for fmt, _ in self.targets():
            plan_export(model, EXPORTERS[fmt][0])

    def targets(self) -> list[tuple[str, Path]]:
        """(layout, directory) of every checkpoint this export writes."""
        if self.format == "both":
            return [(f, Path(self.dir) / f) for f in EXPORTERS]
        return [(self.format, Path(self.dir))]


class PostCalibration(L.Callback):
    """Runs after ``Trainer.validate``'s calibration pass; fills ``stages`` and ``results``.

    Order: bootstrap dead experts -> (measure max calibration) -> MSE sweep -> export (rank 0)
    -> held-out perplexity of the original and the quantized model.
    """

    def __init__(self, export: ExportConfig, algorithm: Algorithm, tokenizer=None, eval_batches=None):
        super().__init__()
        self.export, self.algorithm, self.tokenizer = export, algorithm, tokenizer
        self.eval_batches = eval_batches  # callable -> iterable of held-out batches, or None to skip perplexity
        self.dtypes: dict | None = None  # original dtypes when the model was upcast for CPU
        self.stages: dict[str, dict] = {}
        self.results: dict = {}
        self._calib = None
        self._writers: list[CheckpointWriter] = []

    def _writer(self, model, fmt: str, out: Path, progress: bool, early: bool, lookup=None) -> CheckpointWriter:
        layout, configure = EXPORTERS[fmt]
        e = self.export
        return CheckpointWriter(
            model,
            out,
            layout,
            configure,
            self.tokenizer,
            e.overwrite,
            e.max_shard_size_gb,
            progress,
            self.dtypes,
            early,
            lookup,
        )

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sharded = isinstance(trainer.strategy, ShardedStrategy)
        if pl_module.device.type == "cuda" and trainer.is_global_zero and not sharded:
            # the unquantized tensors do not depend on calibration: write them while the GPU calibrates
            for fmt, out in self.export.targets():
                self._writers.append(self._writer(pl_module.model, fmt, out, True, early=True))
                self._writers[-1].start_early()
        self._calib = stage(self.stages, "calibration", pl_module.device)
        self._calib.__enter__()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        for w in self._writers:  # leave no temporary export directory behind
            w.abort()
        self._writers = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._calib is not None:
            self._calib.__exit__(None, None, None)
            self._calib = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model, dev = pl_module.model, pl_module.device
        progress = trainer.is_global_zero
        ppl = self.results.setdefault("perplexity", {})
        with stage(self.stages, "bootstrap", dev):
            check_inputs_calibrated(model)
            self.results["experts"] = [vars(d) for d in bootstrap_dead_experts(model)]
        sharded = isinstance(trainer.strategy, ShardedStrategy)
        evaluate = self.eval_batches is not None and trainer.is_global_zero and not sharded
        if self.eval_batches is not None and sharded and trainer.is_global_zero:
            log.info("trainer=fsdp: held-out perplexity is not measured (the weight SQNR is)")
        with stage(self.stages, "measure", dev):
            # keep the fake-quant weights for the quant-mode perplexity that follows (the sweep drops them)
            weights = {n: {"max": e} for n, e in weight_errors(model, keep=evaluate).items()}
            if self.algorithm.sweep and evaluate:
                ppl["max_calibrated"] = perplexity(model, self.eval_batches(), "quant")
        if self.algorithm.sweep:
            with stage(self.stages, "sweep", dev):
                self.results["sweep"] = mse_sweep(
                    model, self.algorithm.kernel, progress=progress, hessian=self.algorithm.hessian
                )
            with stage(self.stages, "measure_mse", dev):
                for n, e in weight_errors(model, keep=evaluate).items():
                    weights[n]["mse"] = e
        self.results["weights"] = weights
        with stage(self.stages, "export", dev):
            if sharded:
                self._export_sharded(model, trainer.is_global_zero, progress)
            elif trainer.is_global_zero:
                if not self._writers:
                    self._writers = [
                        self._writer(model, fmt, out, progress, early=False) for fmt, out in self.export.targets()
                    ]
                done = [w.finish() for w in self._writers]  # on an error, on_exception aborts the rest
                self._writers = []
                self.results["export"], self.results["exports"] = done[0], done
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                trainer.strategy.barrier("nvfp4cal-export")
        if evaluate:
            with stage(self.stages, "evaluate", dev):
                ppl["original"] = perplexity(model, self.eval_batches(), "off")
                ppl["quantized"] = perplexity(model, self.eval_batches(), "quant")
        if getattr(pl_module, "shards", None):  # a CalibrationModule under trainer=fsdp
            self.results["sharding"] = pl_module.shards
        if torch.distributed.is_available() and torch.distributed.is_initialized() and dev.type == "cuda":
            peaks = [None] * torch.distributed.get_world_size()  # each rank's highest stage peak from calibration on
            mine = max(v.get("gpu_peak_gib", 0.0) for v in self.stages.values())
            torch.distributed.all_gather_object(peaks, round(mine, 3))
            self.results["gpu_peak_gib_per_rank"] = peaks
        clear_caches(model)

    def _export_sharded(self, model, rank0: bool, progress: bool) -> None:
        """One layer gathered at a time on every rank; global rank 0 writes (see :class:`UnitGate`)."""
        gate = UnitGate(model)
        done = []
        try:
            for fmt, out in self.export.targets():
                if rank0:
                    self._writers = [self._writer(model, fmt, out, progress, early=False, lookup=gate.tensor)]
                    done.append(self._writers[0].finish())
                    self._writers = []
                else:
                    follow_export(model, EXPORTERS[fmt][0], self.dtypes, gate.enter_for)
                gate.leave()
        finally:
            gate.leave()
        if done:
            self.results["export"], self.results["exports"] = done[0], done
