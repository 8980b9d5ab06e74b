"""What an algorithm is: one object that owns its parameters, what it observes during calibration, what
it does to a unit (the whole model, or one decoder layer) and what it needs of the schedule.

The calibration loop (:mod:`nvfp4cal.calibration`) asks the object; nothing else decodes a method name.
For one unit the loop runs:

    before(unit)                         transforms before calibration (default: none)
    observe(unit)                        extra statistics to collect (e.g. input Hessians)
    forward over the unit's inputs       quantizers in calib mode (max calibration)
    reduce statistics across ranks       as each quantizer declares (STATISTICS: MAX or SUM)
    bootstrap, measure                   the steps every algorithm shares
    after(unit, inputs)                  what the algorithm does with the calibrated unit
    persist(unit)                        the schedule keeps every change (layer by layer: the layer state)

A new algorithm is one module under ``algorithms/`` with a :class:`Algorithm` subclass, one line in
``algorithms.METHODS``, one recipe YAML and one test.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from typing import ClassVar, Protocol

from torch import nn

from ..evaluation.metrics import weight_errors
from ..model.rules import RecipeError
from ..model.view import weight_quantizers
from ..numerics.comm import RunContext
from ..results import Results


class AlgorithmError(RecipeError):
    """A recipe's algorithm mapping that cannot be built (a RecipeError: the CLI prints one line)."""

    pass


@dataclass(frozen=True)
class Needs:
    """What an algorithm requires of the schedule."""

    layerwise: bool = False  # one decoder layer at a time
    propagate: str | None = None  # "quantized": each layer calibrated on its quantized predecessors' outputs
    whole_weights: bool = False  # every rank holds whole weights (not FSDP rows)
    # the unquantized layer's outputs on unquantized inputs, per batch (``UnitInputs.target``): the schedule
    # keeps a second, unquantized stream of hidden states beside the quantized one
    reference: bool = False

    def describe(self) -> str:
        parts = []
        if self.layerwise:
            parts.append("calibration=layerwise")
        if self.propagate:
            parts.append(f"calibration.propagate={self.propagate}")
        return " ".join(parts)


@dataclass
class Unit:
    """What the calibration loop works on: the whole model, or one decoder layer.

    ``module`` names its weights as the whole model does (a layer is wrapped in a scope named by its
    prefix); ``forward`` is what the unit's inputs are fed to; ``fresh``: its weights were just read
    (layer by layer), so its weight quantizers are calibrated and its statistics zeroed first.
    """

    name: str
    module: nn.Module
    forward: nn.Module
    index: int = 0
    fresh: bool = False


class UnitInputs(Protocol):
    """The calibration inputs of one unit: ``(args, kwargs)`` to call ``unit.forward`` with, per batch.
    ``batch(b)``: batch ``b`` alone; ``target(b)``: the unquantized unit's output on unquantized inputs for
    batch ``b`` (only where the algorithm's ``needs.reference`` asked the schedule to keep them)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[tuple, dict]]: ...

    def batch(self, b: int) -> tuple[tuple, dict]: ...

    def target(self, b: int): ...


@dataclass
class UnitRun:
    """What an algorithm's hooks get beside the unit: the run context, the unit's results, a timer and the
    weight-error measurement every algorithm reports (``keep``: leave fake-quant weights cached for a
    quant-mode perplexity that follows)."""

    ctx: RunContext
    results: Results
    stage: Callable[[str], AbstractContextManager]  # stage("sweep"): timed as a stage of that name
    keep: bool = False

    def measure(self, name: str, key: str, unit: Unit) -> None:
        """Weight SQNR and relative MSE under the current block scales, as ``results.weights[w][key]``."""
        with self.stage(name):
            for n, e in weight_errors(unit.module, self.ctx, keep=self.keep).items():
                self.results.weights.setdefault(n, {})[key] = e


MAX_HEADROOM = 4.0


def check_headroom(headroom: float) -> None:
    if not (1.0 <= headroom <= MAX_HEADROOM):
        raise AlgorithmError(f"recipe.algorithm.headroom must be in [1, {MAX_HEADROOM:g}], got {headroom}")


def apply_headroom(unit: Unit, headroom: float) -> None:
    """Scale headroom: every NVFP4 weight's global amax ``g`` becomes ``headroom * g`` (its
    ``weight_scale_2 = headroom * g / (6 * 448)``), so that the block holding the tensor's maximum can take an
    FP8 scale up to ``headroom`` times its max-calibrated one (``headroom = 448 / 256``: NVIDIA's "four over
    six" normalisation of block scales by 256). The sweeps and tuning then search the wider range; 1: as
    before, byte for byte."""
    if headroom != 1.0:
        for _, wq, _ in weight_quantizers(unit.module):
            wq.global_amax.mul_(headroom)
            wq.clear_cache()


def _fits(value, want) -> bool:
    """``value`` (from YAML or an override) is of the declared type (an int where a float is wanted is fine)."""
    if isinstance(want, types.UnionType):
        return any(_fits(value, t) for t in typing.get_args(want))
    if want is type(None):
        return value is None
    if want is bool:
        return isinstance(value, bool)
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if want is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, want)


def _type_name(want) -> str:
    if isinstance(want, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(want))
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        want, want.__name__
    )


class Algorithm:
    """Base class: max calibration and nothing more (see :mod:`nvfp4cal.algorithms.max`)."""

    method: ClassVar[str]
    Params: ClassVar[type]  # a frozen dataclass of this method's recipe.algorithm.* keys
    changes_weights: ClassVar[bool] = False  # True: the schedule persists the unit's changed weights
    refines: ClassVar[bool] = False  # True: changes what max calibration chose (the report measures both)
    needs: ClassVar[Needs] = Needs()

    def __init__(self, params):
        self.params = params

    @classmethod
    def from_config(cls, recipe: str, values: dict) -> Algorithm:
        """The algorithm from a recipe's ``algorithm`` mapping (``method`` already removed): an unknown
        key is one line naming the valid ones."""
        valid = [f.name for f in fields(cls.Params)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise AlgorithmError(
                f"unknown key(s) {unknown} in recipe {recipe!r} algorithm (method {cls.method}); valid keys: "
                f"{['method', *valid]}"
            )
        hints = typing.get_type_hints(cls.Params)
        for key, value in values.items():
            if not _fits(value, hints[key]):
                raise AlgorithmError(f"recipe.algorithm.{key}={value!r} must be {_type_name(hints[key])}")
        return cls(cls.Params(**values))

    @property
    def kernel(self) -> str | None:
        """The sweep kernel this algorithm runs (None: none; the entry point warms it up early)."""
        return None

    @property
    def hessian(self) -> str | None:
        """Input Hessians to collect while calibrating: None, ``"block"`` (16 x 16 per block of input
        channels) or ``"full"`` (in x in). Reduced across ranks by SUM (``InputQuantizer.STATISTICS``)."""
        return None

    def with_kernel(self, kernel: str) -> Algorithm:
        """The same algorithm with another sweep kernel (``NVFP4CAL_KERNEL``); unchanged if its parameters
        have no ``kernel``."""
        if "kernel" not in {f.name for f in fields(self.params)}:
            return self
        return type(self)(dataclasses.replace(self.params, kernel=kernel))

    def before(self, unit: Unit, ctx: RunContext) -> None:
        """A transform of the unit before it is calibrated (smoothing, rotation, ...). Default: the scale
        headroom of a method that has one (:func:`apply_headroom`; 1: nothing)."""
        apply_headroom(unit, getattr(self.params, "headroom", 1.0))

    def after(self, unit: Unit, inputs: UnitInputs, run: UnitRun) -> None:
        """Work on the calibrated unit (its statistics reduced, dead experts bootstrapped); record what it
        did in ``run.results`` and time each part with ``run.stage(name)``. Default: nothing."""

    def describe(self) -> dict:
        return {"method": self.method, **{f.name: getattr(self.params, f.name) for f in fields(self.params)}}
