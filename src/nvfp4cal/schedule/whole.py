"""``calibration=whole`` (the default): the whole model is one unit, held by the trainer's strategy (one
device, ddp replicas or fsdp shards); the Trainer's pass over the DataModule is its calibration pass."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..algorithms import Algorithm, Unit
from ..calibration import RunUnit, begin_unit, end_unit
from ..numerics.comm import RunContext
from ..results import Results


@dataclass
class WholeModel:
    """``calibration=whole``: the config group's object."""

    layerwise = False
    propagate = "unquantized"

    def schedule(self, algorithm: Algorithm, **_) -> WholeModelSchedule:
        return WholeModelSchedule(algorithm)


class WholeInputs:
    """The whole model's calibration inputs: the batches of the Trainer's calibration loader."""

    def __init__(self, batches: Callable[[], Iterable[dict]], device: torch.device, extra: dict):
        self.batches, self.device, self.extra = batches, device, extra

    def __len__(self) -> int:
        return len(self.batches())

    def __iter__(self) -> Iterator[tuple[tuple, dict]]:
        for batch in self.batches():
            yield (), {"input_ids": batch["input_ids"].to(self.device), "use_cache": False, **self.extra}


class WholeModelSchedule:
    """One unit, the model; nothing to persist (the model holds every change)."""

    holds_model = True  # the Trainer's strategy places the model
    evaluate = None  # the steps score the evaluation sets on the whole model

    def __init__(self, algorithm: Algorithm):
        self.algorithm = algorithm
        self.unit: Unit | None = None

    def context(self, model: nn.Module, ctx: RunContext) -> RunContext:
        return ctx

    def start(self, model: nn.Module, ctx: RunContext) -> None:
        self.unit = Unit("", model, model)
        begin_unit(self.unit, self.algorithm, ctx)

    @torch.no_grad()
    def observe(self, model: nn.Module, batch: dict, extra: dict, ctx: RunContext, n_batches: int) -> None:
        model(input_ids=batch["input_ids"], use_cache=False, **extra)

    def finish(self, model: nn.Module, ctx: RunContext, results: Results, run_unit: RunUnit,
               batches: Callable[[], Iterable[dict]], extra: dict) -> None:  # fmt: skip
        end_unit(self.unit, ctx)
        run_unit(self.unit, WholeInputs(batches, ctx.device, extra), results, ctx)

    def report(self) -> dict:
        return {}

    def abort(self) -> None:
        pass

    def done(self) -> None:
        pass
