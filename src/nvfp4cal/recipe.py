"""Typed recipes: a :class:`~nvfp4cal.model.rules.Selection` (ordered rules, KV cache) plus its calibration
algorithm (:mod:`nvfp4cal.algorithms`).

``exclude``: patterns that are never quantized, appended as disabled rules after ``rules`` (so they win).
The shipped recipes take the common ones (``lm_head``, MoE routers and gates) from
``conf/recipe/common/exclude.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .algorithms import Algorithm, Max, build_algorithm
from .model.rules import KV_FORMATS, RecipeError, Rule, Selection, parse_rules

__all__ = ["Recipe", "RecipeError", "Rule", "build_recipe"]


@dataclass(frozen=True)
class Recipe(Selection):
    algorithm: Algorithm = field(default_factory=lambda: Max(Max.Params()))


def build_recipe(name: str = "custom", rules=(), algorithm=None, kv_cache=None, exclude=(), **unknown) -> Recipe:
    """Build and validate a recipe from plain data (what a Hydra config holds)."""
    if unknown:
        raise RecipeError(
            f"unknown key(s) {sorted(unknown)} in recipe {name!r}; valid keys: "
            "['name', 'rules', 'exclude', 'algorithm', 'kv_cache']"
        )
    parsed = parse_rules(name, rules)
    if not parsed:
        raise RecipeError(f"recipe {name!r} has no rules; add at least one {{pattern, enable}}")
    if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude or ()):
        raise RecipeError(f"recipe {name!r}: exclude must be a list of patterns, got {exclude!r}")
    parsed += tuple(Rule(p, enable=False) for p in exclude or ())
    if kv_cache is not None and kv_cache not in KV_FORMATS:
        raise RecipeError(f"recipe {name!r}: kv_cache {kv_cache!r} unknown; valid: {list(KV_FORMATS)} or null")
    algo = algorithm if isinstance(algorithm, Algorithm) else build_algorithm(name, algorithm)
    return Recipe(name=name, rules=parsed, kv_cache=kv_cache, algorithm=algo)
