"""Typed recipes: ordered rules that choose what is quantized, plus the calibration algorithm.

A rule ``{pattern, enable, format}`` matches quantizable names with ``fnmatch``; for each name the
last matching rule decides (later rules override earlier ones). Quantizable names are the
``nn.Linear`` module names (``model.layers.0.mlp.gate_proj``) and, for fused experts, the
projection parameters (``model.layers.0.mlp.experts.gate_up_proj``, ``...experts.down_proj``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, fields

from .errors import UserError

# a rule's format: NVFP4 W4A4, NVFP4 weights with unquantized inputs (W4A16), FP8 E4M3 per-tensor W8A8
FORMATS = ("nvfp4", "nvfp4_w4a16", "fp8")
METHODS = ("max", "mse", "hessian_mse", "gptq")
SWEEPS = ("mse", "hessian_mse")  # methods that are an FP8-scale sweep
KERNELS = ("auto", "reference", "triton")
GPTQ_KEYS = ("scales", "dampening", "block_columns", "act_order", "min_tokens")  # method: gptq only
GPTQ_SCALES = ("max", "mse", "hessian_mse")  # how GPTQ's fixed block scales are chosen
KV_FORMATS = ("fp8_cast",)


class RecipeError(UserError):
    pass


def _check_keys(what: str, given: dict, cls) -> None:
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise RecipeError(f"unknown key(s) {unknown} in {what}; valid keys: {valid}")


@dataclass(frozen=True)
class Rule:
    pattern: str
    enable: bool = True
    format: str = "nvfp4"

    def __post_init__(self):
        if not isinstance(self.pattern, str) or not self.pattern:
            raise RecipeError(f"rule pattern must be a non-empty string, got {self.pattern!r}")
        if self.format not in FORMATS:
            raise RecipeError(f"rule {self.pattern!r}: unknown format {self.format!r}; valid: {list(FORMATS)}")


@dataclass(frozen=True)
class Algorithm:
    """How the block scales are chosen: ``max`` (max calibration), ``mse`` (then the FP8-scale MSE
    sweep) or ``hessian_mse`` (then the sweep weighted by each block's input Hessian); ``kernel`` is
    the sweep's implementation (auto | triton | reference: the same choices, bit for bit)."""

    method: str = "max"
    kernel: str = "auto"
    # method gptq (see gptq.py): block scales from max calibration, the FP8 sweep or the Hessian-weighted
    # sweep (scales: max | mse | hessian_mse), then GPTQ rounding
    scales: str = "mse"
    dampening: float = 0.01
    block_columns: int = 128
    act_order: bool = False
    min_tokens: int = 16  # experts (or Linears) whose input saw fewer rows keep plain rounding

    def __post_init__(self):
        if self.method not in METHODS:
            raise RecipeError(f"recipe.algorithm.method={self.method!r} unknown; valid: {list(METHODS)}")
        if self.kernel not in KERNELS:
            raise RecipeError(f"recipe.algorithm.kernel={self.kernel!r} unknown; valid: {list(KERNELS)}")
        if self.scales not in GPTQ_SCALES:
            raise RecipeError(f"recipe.algorithm.scales={self.scales!r} unknown; valid: {list(GPTQ_SCALES)}")
        if not (0 < self.dampening < 1) or self.block_columns < 1 or self.min_tokens < 1:
            raise RecipeError("recipe.algorithm: dampening must be in (0, 1), block_columns and min_tokens >= 1")

    @property
    def sweep(self) -> bool:
        """Run the FP8-scale sweep after max calibration."""
        return self.method in SWEEPS or (self.method == "gptq" and self.scales in SWEEPS)

    @property
    def gptq(self) -> bool:
        """Round the weights with GPTQ (full input Hessians, layer by layer on quantized inputs)."""
        return self.method == "gptq"

    @property
    def hessian(self) -> bool:
        """Weight the sweep by each block's input Hessian (collected during max calibration; under GPTQ
        the diagonal 16 x 16 blocks of its full Hessian)."""
        return self.method == "hessian_mse" or (self.method == "gptq" and self.scales == "hessian_mse")


@dataclass(frozen=True)
class Recipe:
    name: str
    rules: tuple[Rule, ...]
    algorithm: Algorithm = field(default_factory=Algorithm)
    kv_cache: str | None = None

    def decide(self, name: str) -> Rule | None:
        """The last rule matching ``name`` (None when no rule matches: not quantized)."""
        hit = None
        for rule in self.rules:
            if fnmatch.fnmatchcase(name, rule.pattern):
                hit = rule
        return hit

    def format_of(self, name: str) -> str | None:
        """The format ``name`` is quantized in (None: not quantized)."""
        rule = self.decide(name)
        return rule.format if rule is not None and rule.enable else None

    def quantizes(self, name: str) -> bool:
        rule = self.decide(name)
        return rule is not None and rule.enable

    def unused_rules(self, names: list[str]) -> list[Rule]:
        return [r for r in self.rules if not any(fnmatch.fnmatchcase(n, r.pattern) for n in names)]


def build_recipe(name: str = "custom", rules=(), algorithm=None, kv_cache=None, **unknown) -> Recipe:
    """Build and validate a recipe from plain data (what a Hydra config holds)."""
    if unknown:
        raise RecipeError(
            f"unknown key(s) {sorted(unknown)} in recipe {name!r}; valid keys: ['name', 'rules', 'algorithm', 'kv_cache']"
        )
    parsed = []
    for i, r in enumerate(rules or ()):
        if isinstance(r, str):
            r = {"pattern": r}
        if not isinstance(r, dict):
            raise RecipeError(f"recipe {name!r} rule {i} must be a mapping {{pattern, enable, format}}, got {r!r}")
        _check_keys(f"recipe {name!r} rule {i}", r, Rule)
        parsed.append(Rule(**r))
    if not parsed:
        raise RecipeError(f"recipe {name!r} has no rules; add at least one {{pattern, enable}}")
    algorithm = dict(algorithm or {})
    if "fp8_scale_sweep" in algorithm:
        raise RecipeError(
            f"recipe {name!r}: algorithm.fp8_scale_sweep is gone - algorithm.method says it "
            f"(max: no sweep; {' or '.join(SWEEPS)}: the FP8-scale sweep); remove the key"
        )
    _check_keys(f"recipe {name!r} algorithm", algorithm, Algorithm)
    if algorithm.get("method", "max") != "gptq" and set(algorithm) & set(GPTQ_KEYS):
        raise RecipeError(
            f"recipe {name!r}: algorithm keys {sorted(set(algorithm) & set(GPTQ_KEYS))} belong to method gptq"
        )
    if kv_cache is not None and kv_cache not in KV_FORMATS:
        raise RecipeError(f"recipe {name!r}: kv_cache {kv_cache!r} unknown; valid: {list(KV_FORMATS)} or null")
    return Recipe(name=name, rules=tuple(parsed), algorithm=Algorithm(**algorithm), kv_cache=kv_cache)
