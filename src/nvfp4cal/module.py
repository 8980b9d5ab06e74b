"""The LightningModule: owns the model with quantizers and runs max calibration in ``validation_step``."""

from __future__ import annotations

import inspect
import os

import lightning as L
import torch
import torch.distributed as dist

from .experts import QuantExpertsMixin
from .quantizers import InputQuantizer, set_mode


class CalibrationModule(L.LightningModule):
    """``Trainer.validate(module, datamodule)`` = one max-calibration pass over the data.

    Run the Trainer with ``inference_mode=False``: the quantizers update their amax buffers.
    """

    def __init__(self, model: torch.nn.Module, fill=None):
        super().__init__()
        self.model = model
        self.fill = fill  # rows of a meta-device model's parameters (trainer=fsdp), see models.LoadedModel
        self.shards: dict | None = None  # trainer=fsdp: what each rank holds (sharded.shard_model)
        # calibration needs no logits: compute the LM head for the last position only (a 150k-word
        # vocabulary over a batch of 8 x 512 tokens would be a 1.2 GiB bf16 tensor)
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def configure_model(self) -> None:
        """``trainer=fsdp``: shard the model over every rank (Lightning calls this once per process)."""
        from .sharded import ShardedStrategy, shard_model

        if isinstance(self.trainer.strategy, ShardedStrategy) and self.shards is None:
            mesh = self.device_mesh["data_parallel"]
            self.shards = shard_model(self.model, mesh, self.trainer.strategy.root_device, self.fill)

    def on_validation_start(self) -> None:
        fail = os.environ.get("NVFP4CAL_FAIL_ON_RANK")  # fault injection for the distributed tests
        if fail is not None and int(fail) == self.global_rank:
            raise RuntimeError(f"NVFP4CAL_FAIL_ON_RANK={fail}: rank {self.global_rank} fails on purpose")
        set_mode(self.model, "calib")

    def validation_step(self, batch, batch_idx):
        with torch.no_grad():
            self.model(input_ids=batch["input_ids"], use_cache=False, **self.extra)

    def on_validation_epoch_end(self) -> None:
        set_mode(self.model, "off")
        sync_statistics(self.model)

    def on_validation_end(self) -> None:
        """Runs after the PostCalibration callback: let go of the model, so that the strategy's teardown
        does not copy it to the CPU (Lightning's ``Strategy.teardown`` calls ``module.cpu()``: about 50 s
        for a 58 GB model, after all the work is done). The caller still holds it, where it is."""
        self._modules.pop("model", None)


def sync_statistics(model: torch.nn.Module) -> None:
    """All-reduce input amaxes with MAX, and expert token counts and input Hessians with SUM, across ranks."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for m in model.modules():
        if isinstance(m, InputQuantizer):
            dist.all_reduce(m.amax, op=dist.ReduceOp.MAX)
            dist.all_reduce(m.seen, op=dist.ReduceOp.SUM)
            if m.hessian is not None:
                dist.all_reduce(m.hessian, op=dist.ReduceOp.SUM)
        if isinstance(m, QuantExpertsMixin):
            dist.all_reduce(m.tokens, op=dist.ReduceOp.SUM)
