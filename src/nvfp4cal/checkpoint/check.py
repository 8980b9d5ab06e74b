"""The checkpoint check: what ``nvfp4cal-verify DIR`` and every export (before its rename) run.

Both layouts: modelopt (``X.weight`` uint8, ``weight_scale``, ``weight_scale_2``, ``input_scale``;
``ignore`` / ``exclude_modules``) and compressed-tensors ``nvfp4-pack-quantized`` (``X.weight_packed``,
``weight_scale``, ``weight_global_scale``, ``input_global_scale``; ``ignore``), told apart by
config.json's ``quant_method``.

Checks what an engine reads from config.json: ``architectures`` names a causal-LM class; the
excluded modules and the FP8 KV cache are where vLLM and SGLang look for them (modelopt: ``ignore``
and ``kv_cache_scheme`` in config.json, agreeing with hf_quant_config.json). Then the tensors: every
packed weight has its scales with the right dtypes and shapes; no NaN E4M3 scale byte;
global and input scales finite and > 0; gate/up (w1/w3), q/k/v and q_a/kv_a share their global
scale; every expert of every MoE layer is present and quantized alike; the config's excluded
modules agree with the tensors (no quantized module excluded, no plain Linear weight left
unlisted); FP8 KV scales present, finite and > 0. Formats: NVFP4 W4A4 (with an input scale), NVFP4
weight-only (without), FP8 (E4M3 ``weight``, fp32 ``weight_scale`` and ``input_scale``); each module's
tensors must be the format the config files give it (ModelOpt's ``quant_algo`` or per-layer
``quantized_layers``, compressed-tensors' config groups and their targets).
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..numerics.nvfp4 import nan_scale_bytes
from .formats import layout_of
from .io import ST_DTYPES
from .layout import FUSED_SCALE_GROUPS, Layout

FP8 = torch.float8_e4m3fn
EXPERT = re.compile(r"^(?P<layer>.*\.experts)\.(?P<e>\d+)\.(?P<proj>[^.]+)$")


@dataclass
class Verdict:
    quantized: list[str] = field(default_factory=list)  # NVFP4 modules (W4A4 and weight-only)
    fp8: list[str] = field(default_factory=list)  # FP8 modules
    fused: list[str] = field(default_factory=list)
    experts: dict[str, int] = field(default_factory=dict)  # experts module -> number of experts
    excluded: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        n_exp = sum(self.experts.values())
        rows = [
            ("quantized modules", len(self.quantized) + len(self.fused) + len(self.fp8)),
            ("of them FP8", len(self.fp8)),
            ("MoE layers / experts", f"{len(self.experts)} / {n_exp}"),
            ("excluded modules", len(self.excluded)),
            ("problems", len(self.problems)),
        ]
        out = [f"{k:<22} {v}" for k, v in rows]
        out += [f"  - {p}" for p in self.problems[:50]]
        if len(self.problems) > 50:
            out.append(f"  ... and {len(self.problems) - 50} more")
        return "\n".join(out)


_DTYPES = {name: dtype for dtype, name in ST_DTYPES.items()}  # safetensors dtype string -> torch


class _Tensors:
    """Every tensor of a sharded safetensors checkpoint, read through a memory map.

    Each file is first opened with ``safetensors.safe_open`` (what loaders do: it validates the
    header and the offsets); tensors are then sliced out of a copy-on-write memory map, which costs
    microseconds per tensor instead of a call per tensor through the library.
    """

    def __init__(self, ckpt: Path):
        self.where: dict[str, tuple[np.ndarray, dict]] = {}  # name -> (file's data map, header entry)
        for f in sorted(ckpt.glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                fh.keys()
            with open(f, "rb") as raw:
                n = struct.unpack("<Q", raw.read(8))[0]
                header = json.loads(raw.read(n))
            data = np.memmap(f, dtype=np.uint8, mode="c", offset=8 + n) if f.stat().st_size > 8 + n else None
            for k, entry in header.items():
                if k != "__metadata__":
                    self.where[k] = (data, entry)

    def __contains__(self, k: str) -> bool:
        return k in self.where

    def get(self, k: str) -> torch.Tensor:
        data, entry = self.where[k]
        (b, e), dtype = entry["data_offsets"], _DTYPES[entry["dtype"]]
        raw = torch.from_numpy(data[b:e]) if e > b else torch.empty(0, dtype=torch.uint8)
        return raw.view(dtype).reshape(entry["shape"])

    def meta(self, k: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype string such as 'U8', 'BF16') without reading the data."""
        entry = self.where[k][1]
        return tuple(entry["shape"]), entry["dtype"]


def _positive(t: torch.Tensor) -> bool:
    if t.dtype != torch.float32:
        return False
    a = t.numpy()
    return bool(np.isfinite(a).all() and (a > 0).all())


class _Matcher:
    """Excluded-module patterns: exact names, modelopt's fnmatch wildcards, compressed-tensors' ``re:``."""

    def __init__(self, patterns: list[str]):
        self.exact = set(patterns)
        regexes = [p[3:] for p in patterns if p.startswith("re:")]
        regexes += [fnmatch.translate(p) for p in patterns if not p.startswith("re:")]
        self.regex = re.compile("|".join(f"(?:{r})" for r in regexes)) if regexes else None

    def __call__(self, module: str) -> bool:
        return module in self.exact or (self.regex is not None and self.regex.match(module) is not None)


CAUSAL_LM = ("ForCausalLM", "ForConditionalGeneration")


def _check_architectures(cfg: dict, v: Verdict) -> None:
    """Engines pick the model class from ``architectures`` (vLLM maps a bare ``model_type`` such as
    ``mixtral`` to a pooling model), so it must name a causal-LM class."""
    arch = cfg.get("architectures")
    if not isinstance(arch, list) or not arch or not all(isinstance(a, str) for a in arch):
        v.problems.append(
            "config.json has no architectures list: engines pick the model class from it "
            "(vLLM would load a bare model_type as a pooling model)"
        )
    elif not any(a.endswith(CAUSAL_LM) for a in arch):
        v.problems.append(f"config.json architectures {arch} name no causal-LM class (...ForCausalLM)")


def _read_config(ckpt: Path, v: Verdict):
    """(layout, excluded-module patterns, FP8 KV cache, module -> format said) from the config files."""
    cfg = json.loads((ckpt / "config.json").read_text())
    _check_architectures(cfg, v)
    qc = cfg.get("quantization_config") or {}
    layout = layout_of(qc)
    return (layout, *layout.read_config(ckpt, qc, v.problems), layout.config_format(ckpt, qc))


def _check_quantized(ts: _Tensors, w: str, ws: str, ws2: str, inp: str, fused: bool, v: Verdict, said) -> None:
    name = w if fused else re.sub(r"\.weight(_packed)?$", "", w)
    fmt = said(name)
    if fmt == "nvfp4_w4a16" and inp in ts:
        v.problems.append(f"{name}: has {inp} but the config says NVFP4 weight-only")
    elif fmt not in ("nvfp4", "nvfp4_w4a16"):
        v.problems.append(f"{name}: NVFP4 tensors but the config says format {fmt}")
    for k in (ws, ws2) + ((inp,) if fmt != "nvfp4_w4a16" else ()):
        if k not in ts:
            v.problems.append(f"{name}: missing {k}")
    shape, dtype = ts.meta(w)
    if dtype != "U8":
        v.problems.append(f"{name}: packed weight has dtype {dtype}, expected uint8")
    if ws in ts:
        scale = ts.get(ws)
        if scale.dtype != FP8:
            v.problems.append(f"{name}: weight_scale has dtype {scale.dtype}, expected float8_e4m3fn")
        elif shape[:-1] != tuple(scale.shape[:-1]) or shape[-1] != 8 * scale.shape[-1]:
            v.problems.append(f"{name}: weight_scale shape {tuple(scale.shape)} does not fit weight {shape}")
        else:
            nan = nan_scale_bytes(scale)
            if nan:
                v.problems.append(f"{name}: {nan} NaN E4M3 byte(s) in weight_scale")
    for k in (ws2, inp):
        if k in ts and not _positive(ts.get(k)):
            v.problems.append(f"{k} is not finite float32 > 0: {ts.get(k).flatten()[:4].tolist()}")


def verify(ckpt: str | Path) -> Verdict:
    ckpt = Path(ckpt)
    v = Verdict()
    if not (ckpt / "config.json").is_file():
        v.problems.append(f"{ckpt}: no config.json")
        return v
    layout, exclude, kv_cache, said = _read_config(ckpt, v)
    v.excluded = exclude
    ts = _Tensors(ckpt)
    if not ts.where:
        v.problems.append(f"{ckpt}: no safetensors file")
        return v
    # FP8 modules: an E4M3 weight beside its per-tensor scale
    fp8 = {k[: -len(".weight")] for k in ts.where if k.endswith(".weight") and ts.meta(k)[1] == "F8_E4M3"}
    for m in sorted(fp8):
        _check_fp8(ts, m, layout, v, said)
    # packed weights: the layout's module names, or fused experts' parameter names
    packed, scale, glob, _ = layout.suffixes
    for k in sorted(ts.where):
        if k.rsplit(".", 1)[0] in fp8:
            continue
        if k.endswith(scale) and f"{k.removesuffix(scale)}{packed}" not in ts:
            v.problems.append(f"{k}: scale without its packed weight")
        m = k.removesuffix(packed)
        fused = layout.fused_names(k)
        if k.endswith(packed) and f"{m}{scale}" in ts:
            v.quantized.append(m)
            _check_quantized(ts, *layout.quant_names(m), False, v, said)
        elif fused is not None and fused[1] in ts:
            v.fused.append(k)
            _check_quantized(ts, *fused, True, v, said)
        elif k.endswith(packed) and ts.meta(k)[1] == "U8":
            v.problems.append(f"{m}: packed uint8 weight without weight_scale")
    quantized = set(v.quantized) | fp8
    excluded = _Matcher(exclude)
    for m in sorted(quantized):
        if excluded(m):
            v.problems.append(f"{m}: quantized but listed as excluded in the config")
    # plain Linear weights must be excluded in the config
    for k in sorted(ts.where):
        m = k.removesuffix(".weight")
        if not k.endswith(".weight") or m in quantized or "embed" in m or "norm" in m:
            continue
        shape, dtype = ts.meta(k)
        if len(shape) == 2 and dtype != "U8" and not excluded(m):
            v.problems.append(f"{m}: unquantized weight not listed as excluded in the config")
    # shared global scales
    for m in sorted(quantized):
        parent, _, short = m.rpartition(".")
        for group in FUSED_SCALE_GROUPS:
            if short != group[0]:
                continue
            members = [f"{parent}.{g}" for g in group if f"{parent}.{g}" in quantized]
            kinds = {x in fp8 for x in members}
            if len(kinds) > 1:
                v.problems.append(f"{parent}: {'/'.join(group)} are fused by engines but stored in two formats")
            elif len(members) > 1:
                key = ".weight_scale" if m in fp8 else glob
                vals = [ts.get(f"{x}{key}") for x in members if f"{x}{key}" in ts]
                if any(not torch.equal(vals[0], x) for x in vals[1:]):
                    v.problems.append(f"{parent}: {'/'.join(group)} do not share {key[1:]}")
    # experts: all present, all quantized alike
    layers: dict[str, dict[int, dict[str, bool]]] = defaultdict(dict)
    for k in ts.where:
        for suffix in {".weight", packed}:
            hit = EXPERT.match(k.removesuffix(suffix)) if k.endswith(suffix) else None
            if hit:
                d = layers[hit["layer"]].setdefault(int(hit["e"]), {})
                d[hit["proj"]] = k.removesuffix(suffix) in quantized
    for layer, experts in sorted(layers.items()):
        v.experts[layer] = len(experts)
        missing = sorted(set(range(max(experts) + 1)) - set(experts))
        if missing:
            v.problems.append(f"{layer}: expert(s) {missing} missing")
        shapes = {tuple(sorted(d.items())) for d in experts.values()}
        if len(shapes) > 1:
            v.problems.append(f"{layer}: experts are not quantized alike ({len(shapes)} different sets of projections)")
    if kv_cache:
        kv = [k for k in ts.where if k.endswith((".k_scale", ".v_scale"))]
        if not kv:
            v.problems.append("the config asks for an FP8 KV cache but no k_scale/v_scale tensor is present")
        for k in kv:
            if not _positive(ts.get(k)):
                v.problems.append(f"{k} is not finite float32 > 0")
    if not quantized and not v.fused:
        v.problems.append("no quantized weight found")
    v.fp8 = sorted(fp8)
    return v


def _check_fp8(ts: _Tensors, m: str, layout: Layout, v: Verdict, said) -> None:
    """An FP8 module: E4M3 weight, fp32 per-tensor weight and input scales, finite and > 0."""
    fmt = said(m)
    if fmt != "fp8":
        v.problems.append(f"{m}: FP8 tensors but the config says format {fmt}")
    w, ws, inp = layout.fp8_names(m)
    for k in (ws, inp):
        if k not in ts:
            v.problems.append(f"{m}: missing {k}")
        elif ts.meta(k)[1] != "F32" or math.prod(ts.meta(k)[0]) != 1:
            v.problems.append(f"{k}: expected one float32 value, got {ts.meta(k)}")
        elif not _positive(ts.get(k)):
            v.problems.append(f"{k} is not finite float32 > 0: {ts.get(k).flatten().tolist()}")
