"""The compressed-tensors ``nvfp4-pack-quantized`` layout (llm-compressor's; vLLM and transformers read it).

Per quantized Linear ``X`` (fused experts: per expert, under ``save_pretrained``'s names)::

    X.weight_packed        uint8 [out, in/2]            two E2M1 nibbles, low nibble = even column
    X.weight_scale         float8_e4m3fn [out, in/16]   block scales (the same bytes as the modelopt layout)
    X.weight_global_scale  float32 [1]                  1 / weight_scale_2  (= 448 * 6 / g)
    X.input_global_scale   float32 [1]                  1 / input_scale     (= 448 * 6 / input_amax)

The global scales are divisors here: a loader dequantizes ``e2m1 * (byte / global_scale)``, which
equals our ``e2m1 * (byte * scale_2)`` up to the last bit (a quotient by ``fl(1/s2)`` is not always
the product by ``s2``); the packed nibbles and block-scale bytes are identical in both layouts.
``1 / s2`` is what compressed-tensors' own ModelOpt converter computes, so both paths agree.

An NVFP4 weight-only module (``nvfp4_w4a16``, the NVFP4A16 scheme) has no ``input_global_scale``; an
FP8 Linear (``fp8``, ``float-quantized``) is ``X.weight`` float8_e4m3fn, ``X.weight_scale`` float32 [1]
(``amax / 448``) and ``X.input_scale`` float32 [1]. Each format is one ``config_groups`` entry: targets
``Linear`` when the checkpoint has one format, else the modules of that format (one ``re:`` pattern per
name with its numbers generalised, where no module of another format matches it; else the names).
The top-level ``format`` is the group's, or ``mixed-precision``.

FP8 KV cache adds ``self_attn.k_scale`` / ``self_attn.v_scale`` (float32 [1]) on the attention
module and config.json's ``kv_cache_scheme``. Experts that ``save_pretrained`` keeps fused
(GPT-OSS) cannot be written: compressed-tensors schemes target Linear modules.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..numerics import nvfp4
from .layout import Layout, format_groups, fp4_dequantize, producer, update_config

FORMAT_NAMES = {"nvfp4": "nvfp4-pack-quantized", "nvfp4_w4a16": "nvfp4-pack-quantized", "fp8": "float-quantized"}


def _reciprocal(s: torch.Tensor) -> torch.Tensor:
    return (1 / s.float()).reshape(1)


def _fp4_args(dynamic) -> dict:
    return {
        "num_bits": 4,
        "type": "float",
        "strategy": "tensor_group",
        "group_size": nvfp4.BLOCK,
        "symmetric": True,
        "dynamic": dynamic,
        "observer": None,
        "scale_dtype": "float8_e4m3fn",
        "zp_dtype": None,
    }


def _fp8_args() -> dict:
    return {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False,
            "group_size": None, "observer": None, "zp_dtype": None}  # fmt: skip


def _group(fmt: str, targets: list[str]) -> dict:
    weights = _fp8_args() if fmt == "fp8" else _fp4_args(False)
    inputs = {"nvfp4": _fp4_args("local"), "nvfp4_w4a16": None, "fp8": _fp8_args()}[fmt]
    return {"targets": targets, "weights": weights, "input_activations": inputs, "output_activations": None,
            "format": FORMAT_NAMES[fmt]}  # fmt: skip


def _pattern(name: str) -> str:
    """``re:`` pattern of a module name with every number generalised (layer and expert indices)."""
    return "re:^" + re.sub(r"\d+", r"\\d+", re.escape(name)) + "$"


def targets_of(formats: dict[str, str]) -> dict[str, list[str]]:
    """format -> its targets: ``Linear`` for a checkpoint of one format, else patterns (or names)."""
    groups = format_groups(formats) or {"nvfp4": []}
    if len(groups) == 1:
        return {f: ["Linear"] for f in groups}
    by_pattern: dict[str, set[str]] = {}
    for m, f in formats.items():
        by_pattern.setdefault(_pattern(m), set()).add(f)
    out: dict[str, list[str]] = {}
    for f, mods in groups.items():
        t = {_pattern(m) if by_pattern[_pattern(m)] == {f} else m for m in mods}
        out[f] = sorted(t)
    return out


def quantization_config(
    kv_cache: bool, excluded: list[str], source: dict | None = None, formats: dict | None = None
) -> dict:
    """config.json's ``quantization_config`` for a checkpoint in this layout (one group per format)."""
    kv = None
    if kv_cache:
        kv = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}
    targets = targets_of(formats or {})
    fmts = {FORMAT_NAMES[f] for f in targets}
    return {
        "quant_method": "compressed-tensors",
        "format": fmts.pop() if len(fmts) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "version": None,
        "config_groups": {f"group_{i}": _group(f, t) for i, (f, t) in enumerate(sorted(targets.items()))},
        "ignore": excluded,
        "kv_cache_scheme": kv,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "producer": producer(source),
    }


class CompressedTensors(Layout):
    """The compressed-tensors ``nvfp4-pack-quantized`` layout (see the module docstring)."""

    name = "compressed_tensors"
    quant_method = "compressed-tensors"
    suffixes = (".weight_packed", ".weight_scale", ".weight_global_scale", ".input_global_scale")
    fused_suffixes = None  # compressed-tensors schemes target Linear modules

    def store(self, packed, scales, s2, input_s2):
        return packed, scales, _reciprocal(s2), _reciprocal(input_s2)

    def weight_values(self, packed, scales, global_scale):
        return fp4_dequantize(packed, scales.float() / global_scale.float())  # global scales are divisors

    def input_s2(self, stored):
        return 1 / stored.reshape(())

    def kv_name(self, proj, which):
        return f"{proj.rsplit('.', 1)[0]}.{which}_scale"  # on the attention module

    def kv_proj(self, name):
        mod, _, leaf = name.rpartition(".")
        return f"{mod}.{leaf[0]}_proj"

    def kv_value(self):
        return torch.ones(1, dtype=torch.float32)

    def fp8_scale(self, s):
        return s.float().reshape(1)

    def configure(self, tmp, kv_cache, excluded, source=None, formats=None):
        update_config(tmp, quantization_config(kv_cache, excluded, source, formats))

    @staticmethod
    def _group_format(group: dict) -> str | None:
        w, a = group.get("weights") or {}, group.get("input_activations")
        if (w.get("num_bits"), w.get("type"), w.get("group_size")) == (4, "float", 16):
            return "nvfp4" if a else "nvfp4_w4a16"
        if (w.get("num_bits"), w.get("type"), w.get("strategy")) == (8, "float", "tensor"):
            return "fp8"
        return None

    def config_format(self, ckpt: Path, qc: dict):
        rules = []
        for group in (qc.get("config_groups") or {}).values():
            fmt = self._group_format(group)
            for t in group.get("targets") or []:
                rules.append((t, fmt))

        def of(module: str) -> str | None:
            for t, fmt in rules:
                if t == "Linear" or t == module or (t.startswith("re:") and re.match(t[3:], module)):
                    return fmt
            return None

        return of

    def read_config(self, ckpt: Path, qc: dict, problems: list[str]) -> tuple[list[str], bool]:
        """(excluded-module patterns, FP8 KV cache) from config.json's ``quantization_config``."""
        if qc.get("format") not in (*FORMAT_NAMES.values(), "mixed-precision"):
            problems.append(f"compressed-tensors format is {qc.get('format')!r}, expected 'nvfp4-pack-quantized', "
                            "'float-quantized' or 'mixed-precision'")  # fmt: skip
        groups = {FORMAT_NAMES.get(self._group_format(g)) for g in (qc.get("config_groups") or {}).values()}
        want = groups.pop() if len(groups) == 1 else "mixed-precision"
        if qc.get("format") in (*FORMAT_NAMES.values(), "mixed-precision") and qc.get("format") != want:
            problems.append(f"compressed-tensors format is {qc.get('format')!r} but its config groups are {want!r}")
        for gname, group in (qc.get("config_groups") or {}).items():
            if self._group_format(group) is None:
                problems.append(f"config group {gname}: weights are neither FP4 with group_size 16 nor FP8 per tensor")
        if not qc.get("config_groups"):
            problems.append("compressed-tensors config has no config_groups")
        return list(qc.get("ignore") or []), qc.get("kv_cache_scheme") is not None


COMPRESSED_TENSORS = CompressedTensors()
