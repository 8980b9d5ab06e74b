"""Check an NVFP4 checkpoint, ours or not: ``python -m nvfp4cal.verify DIR``.

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
unlisted); FP8 KV scales present, finite and > 0. Prints a short table and exits 1 on any problem.
"""

from __future__ import annotations

import fnmatch
import json
import re
import struct
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .export.common import ST_DTYPES
from .nvfp4 import nan_scale_bytes

FP8 = torch.float8_e4m3fn
SHARED = (("gate_proj", "up_proj"), ("w1", "w3"), ("q_proj", "k_proj", "v_proj"), ("q_a_proj", "kv_a_proj_with_mqa"))
EXPERT = re.compile(r"^(?P<layer>.*\.experts)\.(?P<e>\d+)\.(?P<proj>[^.]+)$")


@dataclass(frozen=True)
class Names:
    """Tensor-name suffixes of one layout."""

    packed: str
    scale: str
    global_scale: str
    input_scale: str


MODELOPT = Names(".weight", ".weight_scale", ".weight_scale_2", ".input_scale")
COMPRESSED_TENSORS = Names(".weight_packed", ".weight_scale", ".weight_global_scale", ".input_global_scale")


@dataclass
class Verdict:
    quantized: list[str] = field(default_factory=list)
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
            ("quantized modules", len(self.quantized) + len(self.fused)),
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


def _modelopt_config(ckpt: Path, qc: dict, v: Verdict) -> tuple[list[str], bool]:
    """(excluded-module patterns, FP8 KV cache) of a modelopt checkpoint, read where engines read them.

    vLLM and SGLang take config.json's ``quantization_config`` when there is one (ModelOpt's flat
    form: ``ignore``, ``kv_cache_scheme``; or the nested ``quantization`` form of hf_quant_config.json)
    and fall back to ``hf_quant_config.json`` only without it; TensorRT-LLM reads hf_quant_config.json.
    Both files, when present, must say the same.
    """
    hq_file = ckpt / "hf_quant_config.json"
    hq = json.loads(hq_file.read_text()).get("quantization") if hq_file.is_file() else None
    if qc and qc.get("quant_method") != "modelopt":
        v.problems.append(f"config.json quant_method is {qc.get('quant_method')!r}, expected 'modelopt'")
    if qc and "quantization" not in qc:  # ModelOpt's config.json form
        if "ignore" not in qc:
            v.problems.append(
                "config.json quantization_config has no 'ignore': vLLM and SGLang read the unquantized "
                "modules there (exclude_modules is not read in config.json)"
            )
        exclude = qc.get("ignore") or []
        scheme = qc.get("kv_cache_scheme")
        kv = isinstance(scheme, dict) and (scheme.get("type"), scheme.get("num_bits")) == ("float", 8)
        if qc.get("kv_cache_quant_algo") and not kv:
            v.problems.append(
                "config.json sets kv_cache_quant_algo but no FP8 kv_cache_scheme: vLLM reads only "
                "kv_cache_scheme in config.json and would run the KV cache unquantized"
            )
        algo = qc.get("quant_algo")
    else:
        src = (qc.get("quantization") if qc else hq) or {}
        if not qc and hq is None:
            v.problems.append(
                "no quantization config: neither config.json quantization_config nor hf_quant_config.json"
            )
        exclude, kv, algo = (
            src.get("exclude_modules") or [],
            src.get("kv_cache_quant_algo") == "FP8",
            src.get("quant_algo"),
        )
    if not isinstance(exclude, list):
        v.problems.append(f"excluded modules must be a list, got {type(exclude).__name__}")
        exclude = []
    if hq is not None:
        if sorted(hq.get("exclude_modules") or []) != sorted(exclude):
            v.problems.append("hf_quant_config.json exclude_modules and config.json ignore list different modules")
        if (hq.get("kv_cache_quant_algo") == "FP8") != kv:
            v.problems.append("hf_quant_config.json and config.json disagree on the FP8 KV cache")
    if str(algo).upper() != "NVFP4":
        v.problems.append(f"quantization config says quant_algo={algo!r}, expected 'NVFP4'")
    return list(exclude), kv


def _read_config(ckpt: Path, v: Verdict) -> tuple[Names, list[str], bool]:
    """(layout names, excluded-module patterns, FP8 KV cache) from the checkpoint's config files."""
    cfg = json.loads((ckpt / "config.json").read_text())
    _check_architectures(cfg, v)
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") == "compressed-tensors":
        if qc.get("format") != "nvfp4-pack-quantized":
            v.problems.append(f"compressed-tensors format is {qc.get('format')!r}, expected 'nvfp4-pack-quantized'")
        for gname, group in (qc.get("config_groups") or {}).items():
            w = group.get("weights") or {}
            if (w.get("num_bits"), w.get("type"), w.get("group_size")) != (4, "float", 16):
                v.problems.append(f"config group {gname}: weights are not FP4 with group_size 16")
        if not qc.get("config_groups"):
            v.problems.append("compressed-tensors config has no config_groups")
        return COMPRESSED_TENSORS, list(qc.get("ignore") or []), qc.get("kv_cache_scheme") is not None
    return (MODELOPT, *_modelopt_config(ckpt, qc, v))


def _check_quantized(ts: _Tensors, w: str, ws: str, ws2: str, inp: str, fused: bool, v: Verdict) -> None:
    name = w if fused else re.sub(r"\.weight(_packed)?$", "", w)
    for k in (ws, ws2, inp):
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
    names, exclude, kv_cache = _read_config(ckpt, v)
    v.excluded = exclude
    ts = _Tensors(ckpt)
    if not ts.where:
        v.problems.append(f"{ckpt}: no safetensors file")
        return v
    # packed weights: X.<packed> + X.weight_scale, or (modelopt) fused P + P_weight_scale
    n = names
    for k in sorted(ts.where):
        if k.endswith(n.scale) and f"{k.removesuffix(n.scale)}{n.packed}" not in ts:
            v.problems.append(f"{k}: scale without its packed weight")
        m = k.removesuffix(n.packed)
        if k.endswith(n.packed) and f"{m}{n.scale}" in ts:
            v.quantized.append(m)
            _check_quantized(ts, k, f"{m}{n.scale}", f"{m}{n.global_scale}", f"{m}{n.input_scale}", False, v)
        elif n is MODELOPT and f"{k}_weight_scale" in ts:
            v.fused.append(k)
            _check_quantized(ts, k, f"{k}_weight_scale", f"{k}_weight_scale_2", f"{k}_input_scale", True, v)
        elif k.endswith(n.packed) and ts.meta(k)[1] == "U8":
            v.problems.append(f"{m}: packed uint8 weight without weight_scale")
    quantized = set(v.quantized)
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
        for group in SHARED:
            if short != group[0]:
                continue
            members = [f"{parent}.{g}" for g in group if f"{parent}.{g}" in quantized]
            if len(members) > 1:
                vals = [ts.get(f"{x}{n.global_scale}") for x in members if f"{x}{n.global_scale}" in ts]
                if any(not torch.equal(vals[0], x) for x in vals[1:]):
                    v.problems.append(f"{parent}: {'/'.join(group)} do not share {n.global_scale[1:]}")
    # experts: all present, all quantized alike
    layers: dict[str, dict[int, dict[str, bool]]] = defaultdict(dict)
    for k in ts.where:
        for suffix in {".weight", n.packed}:
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
        v.problems.append("no NVFP4 weight found")
    return v


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m nvfp4cal.verify CHECKPOINT_DIR", file=sys.stderr)
        return 2
    if not Path(argv[0]).is_dir():
        print(f"nvfp4cal.verify: error: {argv[0]} is not a directory", file=sys.stderr)
        return 2
    verdict = verify(argv[0])
    print(f"{argv[0]}: {'OK' if verdict.ok else 'PROBLEMS'}")
    print(verdict.table())
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
