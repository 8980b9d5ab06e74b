"""The LightningModule: owns the model with quantizers and runs max calibration in ``validation_step``."""

from __future__ import annotations

import inspect
import os

import lightning as L
import torch

from .comm import RunContext, default_comm
from .evaluate import stage
from .quantizers import set_mode
from .steps import Results
from .view import sync_statistics


def run_context(trainer: L.Trainer) -> RunContext:
    """The run's context, decided once from the trainer (after its process group is up).

    ``holding`` comes from the strategy (``holding = "rows"`` on :class:`nvfp4cal.fsdp.ShardedStrategy`,
    whole weights otherwise); progress bars follow ``trainer.enable_progress_bar`` on global rank 0.
    """
    strategy = trainer.strategy
    holding = getattr(strategy, "holding", "whole")
    return RunContext(
        device=strategy.root_device,
        progress=trainer.is_global_zero and trainer.progress_bar_callback is not None,
        holding=holding,
        comm=default_comm(),
        tensors=getattr(strategy, "tensor_source", None),
    )


class CalibrationModule(L.LightningModule):
    """``Trainer.validate(module, datamodule)`` = one max-calibration pass over the data.

    Run the Trainer with ``inference_mode=False``: the quantizers update their amax buffers.
    ``results.stages["calibration"]`` gets the pass's time and memory peaks.
    """

    def __init__(self, model: torch.nn.Module, results: Results, fill=None, schedule=None):
        super().__init__()
        self.schedule = schedule  # a layerwise.LayerwiseSchedule, or None: the whole model at once
        if schedule is None:
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
        self.ctx = run_context(self.trainer)
        if self.schedule is not None:
            self.ctx = self.schedule.context(self.model, self.ctx)

    def configure_model(self) -> None:
        """Let the strategy lay the model out (``trainer=fsdp``: shard it over every rank), once."""
        shard = getattr(self.trainer.strategy, "shard_model", None)
        if shard is not None and self.shards is None:
            self.shards = shard(self.model, self.device_mesh["data_parallel"], self.ctx, self.fill)

    def on_validation_start(self) -> None:
        fail = os.environ.get("NVFP4CAL_FAIL_ON_RANK")  # fault injection for the distributed tests
        if fail is not None and int(fail) == self.global_rank:
            raise RuntimeError(f"NVFP4CAL_FAIL_ON_RANK={fail}: rank {self.global_rank} fails on purpose")
        self._timer = stage(self.results.stages, "calibration", self.ctx.device)
        self._timer.__enter__()
        if self.schedule is not None:
            self.schedule.start_capture(self.model, self.ctx)
        else:
            set_mode(self.model, "calib")

    def validation_step(self, batch, batch_idx):
        if self.schedule is not None:  # the layers' inputs, kept for the layer-by-layer pass
            n = self.trainer.num_val_batches[0]
            self.schedule.capture(self.model, batch, self.extra, self.ctx, int(n))
            return
        with torch.no_grad():
            self.model(input_ids=batch["input_ids"], use_cache=False, **self.extra)

    def on_validation_epoch_end(self) -> None:
        if self.schedule is not None:  # calibrate, sweep and save the decoder layers one at a time
            self.schedule.run_layers(self.model, self.ctx, self.results)
        else:
            set_mode(self.model, "off")
            sync_statistics(self.model, self.ctx.comm)
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
