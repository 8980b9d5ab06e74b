"""Put quantizers on a model's Linear layers and fused experts, as a recipe's rules say."""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ..numerics.errors import UserError
from ..numerics.nvfp4 import BLOCK
from . import experts as experts_mod
from .quantizers import (
    FUSED_SCALE_GROUPS,
    INPUT_KIND,
    FP8WeightQuantizer,
    InputQuantizer,
    QuantLinear,
    WeightQuantizer,
)
from .rules import Selection
from .view import check_finite

log = logging.getLogger("nvfp4cal")

KV_PROJ = {"k_proj", "v_proj"}


@dataclass
class QuantPlan:
    """What :func:`insert_quantizers` did."""

    quantized: list[str] = field(default_factory=list)  # quantizable names now quantized (any format)
    formats: dict[str, str] = field(default_factory=dict)  # quantized name -> its format
    excluded: list[str] = field(default_factory=list)  # Linear layers left in their dtype
    skipped_shape: list[str] = field(default_factory=list)  # in % 16 != 0
    kv_cache: list[str] = field(default_factory=list)  # k/v projections with an FP8 cache quantizer
    unused_patterns: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Names grouped with their layer index replaced by ``*``, with counts."""
        groups = Counter(re.sub(r"\.\d+\.", ".*.", n) for n in self.quantized)
        return "\n".join(f"  {count:4d} x {pat}" for pat, count in sorted(groups.items()))


def quantizable_names(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Map quantizable name -> (kind, module); kind is 'linear', 'gate_up' or 'down'."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = ("linear", m)
        elif experts_mod.is_fused_experts(m):
            out[f"{name}.{experts_mod.first_proj_name(m)}"] = ("gate_up", m)
            out[f"{name}.down_proj"] = ("down", m)
    return out


def insert_quantizers(model: nn.Module, recipe: Selection, shipped: bool = False) -> QuantPlan:
    """Convert matching modules in place (``recipe``: a Recipe, or any :class:`~nvfp4cal.model.rules.Selection`);
    weights are max-calibrated right away. ``shipped``: a recipe as the package ships it (its patterns
    that match nothing in this model are logged at debug level, not as a warning). What an algorithm observes beyond the amaxes (input Hessians)
    is switched on when its unit is calibrated (:func:`nvfp4cal.calibration.begin_unit`)."""
    check_finite(model)
    plan = QuantPlan()
    names = quantizable_names(model)
    plan.unused_patterns = [r.pattern for r in recipe.unused_rules(list(names))]
    if plan.unused_patterns:  # a shipped recipe covers every family: its patterns missing a model is normal
        log.log(logging.DEBUG if shipped else logging.WARNING, "recipe %s: rule pattern(s) %s match no module of "
                "this model", recipe.name, plan.unused_patterns)  # fmt: skip

    fused: dict[str, dict[str, bool]] = {}
    for name, (kind, m) in names.items():
        fmt = recipe.format_of(name)
        on = fmt is not None
        if on and kind != "linear" and fmt == "fp8":
            raise UserError(
                f"{name}: format fp8 is for Linear modules; fused experts take nvfp4 or nvfp4_w4a16 "
                f"(change the rule that matches it in recipe {recipe.name!r})"
            )
        if on:
            plan.formats[name] = fmt
        if kind == "linear":
            short = name.rsplit(".", 1)[-1]
            kv = recipe.kv_cache is not None and short in KV_PROJ and "attn" in name
            if on and fmt != "fp8" and m.in_features % BLOCK:
                log.warning("%s: in_features %d is not a multiple of %d; left unquantized", name, m.in_features, BLOCK)
                plan.skipped_shape.append(name)
                on = False
            if on or kv:
                QuantLinear.convert(m, nvfp4_on=on, kv=kv, fmt=fmt or "nvfp4")
            (plan.quantized if on else plan.excluded).append(name)
            if kv:
                plan.kv_cache.append(name)
        else:
            mod_name = name.rsplit(".", 1)[0]
            fused.setdefault(mod_name, {"module": m})[kind] = on
            if on:
                plan.quantized.append(name)
    for mod_name, d in fused.items():
        if d.get("gate_up") or d.get("down"):
            m = d["module"]
            experts_mod.convert(mod_name, m, bool(d.get("gate_up")), bool(d.get("down")))
            for q, pname in ((m.gate_up_input, m.first_proj), (m.down_input, "down_proj")):
                if f"{mod_name}.{pname}" in plan.formats:  # weight-only: observed (Hessians), never quantized
                    q.kind = INPUT_KIND[plan.formats[f"{mod_name}.{pname}"]]
    if recipe.kv_cache and not plan.kv_cache:
        log.warning(
            "recipe %s asks for an FP8 KV cache but the model has no attention k_proj/v_proj "
            "(e.g. MLA); the KV cache stays unquantized",
            recipe.name,
        )
    share_global_amax(model)
    check_quantized(model, plan.quantized)
    return plan


HESSIANS = ("block", "full", "diag")


def enable_hessians(model: nn.Module, full: bool = False, kind: str | None = None) -> None:
    """Every NVFP4 weight's input quantizer accumulates input Hessians during calibration (``kind``):
    ``block`` per block of 16 channels, ``full`` over all input channels (GPTQ; also ``full=True``) or
    ``diag`` its diagonal (the imatrix sweep); per expert for fused experts, from its routed tokens only.

    A full Hessian is ``in x in`` per weight: siblings that engines fuse because they read the same input
    (q/k/v, gate/up: ``FUSED_SCALE_GROUPS``) keep one, in the first sibling's quantizer; the others point to
    it (``InputQuantizer.hessian_of``) and add nothing, so it is summed once and reduced across ranks once."""
    kind = kind or ("full" if full else "block")
    if kind not in HESSIANS:
        raise ValueError(f"Hessian kind {kind!r}; valid: {HESSIANS}")
    opts = {"full": kind == "full", "diag": kind == "diag"}
    holders = _shared_inputs(model) if kind == "full" else {}
    for m in model.modules():
        if isinstance(m, QuantLinear) and isinstance(m.weight_quantizer, WeightQuantizer):
            holder = holders.get(id(m.input_quantizer))
            m.input_quantizer.hessian_of = (holder,) if holder is not None else ()
            if holder is None:
                m.input_quantizer.enable_hessian(m.in_features, **opts)
            else:
                m.input_quantizer.hessian = None
        elif isinstance(m, experts_mod.QuantExpertsMixin):
            if m.gate_up_weight is not None:
                m.gate_up_input.enable_hessian(m.logical_weight(m.first_proj).shape[-1], **opts)
            if m.down_weight is not None:
                m.down_input.enable_hessian(m.logical_weight("down_proj").shape[-1], **opts)


def _shared_inputs(model: nn.Module) -> dict[int, InputQuantizer]:
    """id(input quantizer) -> the sibling quantizer that holds the group's Hessian, for every NVFP4 sibling
    of a fused group but the first (all of the group's weights NVFP4, of one input width)."""
    out = {}
    for parent in model.modules():
        for group in FUSED_SCALE_GROUPS:
            mods = [getattr(parent, n, None) for n in group]
            if not all(isinstance(m, QuantLinear) and isinstance(m.weight_quantizer, WeightQuantizer) for m in mods):
                continue
            if len({m.in_features for m in mods}) != 1:
                continue
            for m in mods[1:]:
                out[id(m.input_quantizer)] = mods[0].input_quantizer
    return out


def check_quantized(model: nn.Module, names: list[str]) -> None:
    """Nothing a rule enabled may silently stay unquantized: every such name must hold a weight quantizer."""
    modules = dict(model.named_modules())
    for name in names:
        m = modules.get(name)
        if isinstance(m, nn.Linear):
            ok = getattr(m, "weight_quantizer", None) is not None
        else:
            owner = modules[name.rsplit(".", 1)[0]]
            attr = "down_weight" if name.endswith(".down_proj") else "gate_up_weight"
            ok = getattr(owner, attr, None) is not None
        if not ok:
            raise UserError(f"{name} was selected by the recipe but holds no quantizer; report this model's layout")


def share_global_amax(model: nn.Module) -> None:
    """Siblings that engines fuse (gate/up, w1/w3, q/k/v) share one scale within a format: NVFP4
    weights the max of their global amaxes, FP8 weights the max of their amaxes. Siblings quantized in
    two formats cannot be fused by an engine: an error naming them.

    Fused experts' gate and up already share one: the global amax of ``gate_up_proj[e]``.
    """
    for pname, parent in model.named_modules():
        for group in FUSED_SCALE_GROUPS:
            mods = [getattr(parent, n, None) for n in group]
            named = [(n, m.weight_quantizer) for n, m in zip(group, mods, strict=True)
                     if isinstance(m, QuantLinear) and m.weight_quantizer is not None]  # fmt: skip
            if len(named) < 2:
                continue
            kinds = {(type(q), getattr(parent, n).input_quantizer.kind) for n, q in named}  # the format of each
            if len(kinds) > 1:
                raise UserError(
                    f"{pname}: {'/'.join(n for n, _ in named)} are fused by engines but the recipe quantizes them "
                    "in different formats; give them one format"
                )
            if len(named) != len(group):
                log.warning("%s: only part of %s is quantized; their weight_scale_2 is not shared", pname, group)
                continue
            wqs = [q for _, q in named]
            if isinstance(wqs[0], FP8WeightQuantizer):
                g = torch.stack([q.amax for q in wqs]).amax()
                for q in wqs:
                    q.amax.fill_(g)
                    q.clear_cache()
                continue
            g = torch.stack([q.global_amax for q in wqs]).amax()
            for q in wqs:
                q.global_amax.fill_(g)
                q.clear_cache()
