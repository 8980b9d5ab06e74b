"""The calibration algorithms, one module each; ``recipe.algorithm.method`` picks one by name.

A new algorithm: a module here with an :class:`~nvfp4cal.algorithms.base.Algorithm` subclass (its
``Params``, hooks and needs), its name in :data:`METHODS`, a recipe YAML and a test.
"""

from __future__ import annotations

from .base import Algorithm, AlgorithmError, Needs, Unit, UnitInputs, UnitRun
from .fp8_sweep import Fp8Sweep
from .gptq import Gptq
from .hessian_sweep import HessianSweep
from .imatrix_sweep import ImatrixSweep
from .max import Max
from .tune import Tune

METHODS: dict[str, type[Algorithm]] = {a.method: a for a in (Max, Fp8Sweep, ImatrixSweep, HessianSweep, Gptq, Tune)}

__all__ = ["METHODS", "Algorithm", "Max", "AlgorithmError", "Needs", "Unit", "UnitInputs", "UnitRun", "build_algorithm"]


def build_algorithm(recipe: str, spec: dict | None) -> Algorithm:
    """The algorithm a recipe's ``algorithm`` mapping names (``method`` and that method's own keys)."""
    values = dict(spec or {})
    if "fp8_scale_sweep" in values:
        raise AlgorithmError(
            f"recipe {recipe!r}: algorithm.fp8_scale_sweep is gone - algorithm.method says it "
            "(max: no sweep; mse or hessian_mse: the FP8-scale sweep); remove the key"
        )
    method = values.pop("method", "max")
    if method not in METHODS:
        raise AlgorithmError(f"recipe.algorithm.method={method!r} unknown; valid: {list(METHODS)}")
    return METHODS[method].from_config(recipe, values)
