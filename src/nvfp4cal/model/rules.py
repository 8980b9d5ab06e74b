"""Which modules a recipe quantizes, in which format, and the KV cache: ordered rules.

A rule ``{pattern, enable, format}`` matches quantizable names with ``fnmatch``; for each name the
last matching rule decides (later rules override earlier ones). Quantizable names are the
``nn.Linear`` module names (``model.layers.0.mlp.gate_proj``) and, for fused experts, the
projection parameters (``model.layers.0.mlp.experts.gate_up_proj``, ``...experts.down_proj``).
A recipe (:mod:`nvfp4cal.recipe`) is a :class:`Selection` plus its calibration algorithm.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, fields

from ..numerics.errors import UserError

# a rule's format: NVFP4 W4A4, NVFP4 weights with unquantized inputs (W4A16), FP8 E4M3 per-tensor W8A8
FORMATS = ("nvfp4", "nvfp4_w4a16", "fp8")
KV_FORMATS = ("fp8_cast",)


class RecipeError(UserError):
    pass


def check_keys(what: str, given: dict, cls) -> None:
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


def parse_rules(name: str, rules) -> tuple[Rule, ...]:
    """Rules from plain data: mappings ``{pattern, enable, format}`` or bare patterns."""
    parsed = []
    for i, r in enumerate(rules or ()):
        if isinstance(r, str):
            r = {"pattern": r}
        if not isinstance(r, dict):
            raise RecipeError(f"recipe {name!r} rule {i} must be a mapping {{pattern, enable, format}}, got {r!r}")
        check_keys(f"recipe {name!r} rule {i}", r, Rule)
        parsed.append(Rule(**r))
    return tuple(parsed)


@dataclass(frozen=True)
class Selection:
    """The quantized modules and their formats (``rules``), and the KV cache format (None: unquantized)."""

    name: str
    rules: tuple[Rule, ...]
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
