"""The LightningModule: owns the model with quantizers; its schedule runs max calibration over the Trainer's pass."""

from __future__ import annotations

import inspect
import os

import lightning as L
import torch

from ..evaluation.metrics import stage
from ..numerics.comm import RunContext, default_comm
from ..results import Results
from .callback import PostCalibration
from .fsdp import ShardedStrategy


def holding(strategy) -> str:
    """How a strategy holds the weights: ``"rows"`` (:class:`~nvfp4cal.lightning.fsdp.ShardedStrategy`:
    each rank holds rows of every parameter) or ``"whole"`` (one device, DDP replicas). The one place
    that looks at the strategy's type."""
    return "rows" if isinstance(strategy, ShardedStrategy) else "whole"


def run_context(trainer: L.Trainer) -> RunContext:
    """The run's context, decided once from the trainer (after its process group is up): device, ranks,
    how weights are held and how the export reads them; progress bars follow
    ``trainer.enable_progress_bar`` on global rank 0."""
    strategy = trainer.strategy
    rows = holding(strategy) == "rows"
    return RunContext(
        device=strategy.root_device,
        progress=trainer.is_global_zero and trainer.progress_bar_callback is not None,
        holding=holding(strategy),
        comm=default_comm(),
        tensors=strategy.tensor_source if rows else None,
    )


class CalibrationModule(L.LightningModule):
    """``Trainer.validate(module, datamodule)`` = one max-calibration pass over the data, delegated to the
    schedule (:mod:`nvfp4cal.schedule`): the whole model is calibrated in ``validation_step``, or each
    decoder layer's inputs are captured there and the layers calibrated one by one at the epoch's end.
    Every calibrated unit goes through ``post.run_unit`` (the :class:`~nvfp4cal.lightning.callback.PostCalibration`
    callback's per-unit steps).

    Run the Trainer with ``inference_mode=False``: the quantizers update their amax buffers.
    ``results.stages["calibration"]`` gets the pass's time and memory peaks.
    """

    def __init__(self, model: torch.nn.Module, schedule, post: PostCalibration, results: Results, fill=None):
        super().__init__()
        self.schedule, self.post = schedule, post
        if schedule.holds_model:
            self.model = model
        else:  # on the meta device: kept out of Lightning's reach (it would move it to the device)
            object.__setattr__(self, "model", model)
        self.results = results
        self.fill = fill  # rows of a meta-device model's parameters (trainer=fsdp), see models.LoadedModel
        self.ctx: RunContext | None = None
        self.shards: dict | None = None  # trainer=fsdp: what each rank holds (fsdp.shard_model)
        self._timer = None
        # calibration needs no logits: compute the LM head for the last position only (a 150k-word
        # vocabulary over a batch of 8 x 512 tokens would be a 1.2 GiB bf16 tensor)
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def setup(self, stage: str) -> None:
        self.ctx = self.schedule.context(self.model, run_context(self.trainer))

    def configure_model(self) -> None:
        """Let the strategy lay the model out (``trainer=fsdp``: shard it over every rank), once."""
        if self.ctx.holding == "rows" and self.shards is None:
            self.shards = self.trainer.strategy.shard_model(self.model, self.device_mesh["data_parallel"], self.ctx,
                                                            self.fill)  # fmt: skip

    def on_validation_start(self) -> None:
        fail = os.environ.get("NVFP4CAL_FAIL_ON_RANK")  # fault injection for the distributed tests
        if fail is not None and int(fail) == self.global_rank:
            raise RuntimeError(f"NVFP4CAL_FAIL_ON_RANK={fail}: rank {self.global_rank} fails on purpose")
        self._timer = stage(self.results.stages, "calibration", self.ctx.device)
        self._timer.__enter__()
        self.schedule.start(self.model, self.ctx)

    def validation_step(self, batch, batch_idx):
        self.schedule.observe(self.model, batch, self.extra, self.ctx, int(self.trainer.num_val_batches[0]))

    def on_validation_epoch_end(self) -> None:
        whole = self.schedule.holds_model
        if whole:  # the stage is the calibration pass; the steps are timed under their own names
            self._stop_timer()
        self.schedule.finish(self.model, self.ctx, self.results, self.post.run_unit,
                             lambda: self.trainer.val_dataloaders, self.extra)  # fmt: skip
        self._stop_timer()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.__exit__(None, None, None)
            self._timer = None

    def on_validation_end(self) -> None:
        """Runs after the PostCalibration callback: let go of the model, so that the strategy's teardown
        does not copy it to the CPU (Lightning's ``Strategy.teardown`` calls ``module.cpu()``: about 50 s
        for a 58 GB model, after all the work is done). The caller still holds it, where it is.
        Before that, what the ranks hold and their GPU memory peaks go into the results."""
        self.results.sharding = self.shards
        if self.ctx.world > 1 and self.ctx.device.type == "cuda":
            mine = max(v.get("gpu_peak_gib", 0.0) for v in self.results.stages.values())
            self.results.gpu_peak_gib_per_rank = self.ctx.comm.gather_objects(round(mine, 3))
        self._modules.pop("model", None)
