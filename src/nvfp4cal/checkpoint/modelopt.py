"""The "modelopt" NVFP4 layout that vLLM, TensorRT-LLM and SGLang read.

Per quantized Linear ``X`` (fused experts: per expert, under ``save_pretrained``'s names)::

    X.weight          uint8 [out, in/2]            two E2M1 nibbles, low nibble = even column
    X.weight_scale    float8_e4m3fn [out, in/16]   block scales
    X.weight_scale_2  float32 []                   global_amax / (6 * 448)
    X.input_scale     float32 []                   input_amax / (6 * 448)

Experts that ``save_pretrained`` keeps fused (GPT-OSS's ``mlp.experts.gate_up_proj``) are written
fused, with ModelOpt's underscore names: ``P`` uint8 [E, out, in/2] (the logical, untransposed
layout; GPT-OSS's gate/up rows stay interleaved), ``P_weight_scale`` [E, out, in/16],
``P_weight_scale_2`` float32 [E] (one per expert) and ``P_input_scale`` float32 [].

An FP8 Linear (format ``fp8``) is ``X.weight`` float8_e4m3fn [out, in], ``X.weight_scale`` float32 []
(``amax / 448``) and ``X.input_scale`` float32 [] (``input_amax / 448``). A checkpoint of one format says
``quant_algo: NVFP4``, ``W4A16_NVFP4`` (NVFP4 weight-only: no ``input_scale``) or ``FP8``; one that mixes
them says ``MIXED_PRECISION`` with ModelOpt's per-module ``quantized_layers`` map (``{"quant_algo":
"NVFP4", "group_size": 16}``, ``{"quant_algo": "W4A16_NVFP4", "group_size": 16}`` or ``{"quant_algo":
"FP8"}``), in hf_quant_config.json and at the top level of config.json's flat form (where vLLM's
``modelopt_mixed`` reads it).

FP8 KV cache adds ``k_proj.k_scale`` / ``v_proj.v_scale`` (float32 []). Every other tensor keeps
its dtype. config.json's ``quantization_config`` (what vLLM and SGLang read) and
``hf_quant_config.json`` (ModelOpt's own file, TensorRT-LLM) describe it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..numerics import nvfp4
from .layout import Layout, format_groups, fp4_dequantize, producer, update_config

ALGOS = {"nvfp4": "NVFP4", "nvfp4_w4a16": "W4A16_NVFP4", "fp8": "FP8"}  # our format -> ModelOpt's quant_algo
FORMAT_OF_ALGO = {v: k for k, v in ALGOS.items()}


def _layer_entry(fmt: str) -> dict:
    return {"quant_algo": ALGOS[fmt], **({} if fmt == "fp8" else {"group_size": nvfp4.BLOCK})}


def _quantized_layers(formats: dict[str, str]) -> dict[str, dict]:
    """ModelOpt's per-module map of a mixed checkpoint."""
    return {m: _layer_entry(f) for m, f in sorted(formats.items())}


def quant_config(kv_cache: bool, excluded: list[str], source: dict | None = None, formats: dict | None = None) -> dict:
    """``hf_quant_config.json``: ModelOpt's own file (TensorRT-LLM reads it; vLLM only when config.json
    carries no ``quantization_config``)."""
    groups = format_groups(formats or {}) or {"nvfp4": []}
    mixed = len(groups) > 1
    q = {"quant_algo": "MIXED_PRECISION"} if mixed else _layer_entry(next(iter(groups)))
    q |= {"kv_cache_quant_algo": "FP8" if kv_cache else None, "exclude_modules": excluded}
    if mixed:
        q["quantized_layers"] = _quantized_layers(formats)
    return {"producer": producer(source), "quantization": q}


def _fp4_args() -> dict:
    return {"dynamic": False, "num_bits": 4, "type": "float", "group_size": nvfp4.BLOCK}


def _fp8_args() -> dict:
    return {"dynamic": False, "num_bits": 8, "type": "float"}


def config_json_quantization(
    kv_cache: bool, excluded: list[str], source: dict | None = None, formats: dict | None = None
) -> dict:
    """config.json's ``quantization_config``, field for field what ModelOpt's export writes there.

    vLLM and SGLang read this dict, not ``hf_quant_config.json``, when it is present: the unquantized
    modules under ``ignore`` (``exclude_modules`` is not looked at here), the FP8 KV cache as the
    ``kv_cache_scheme`` dict, W4A4 vs weight-only from ``config_groups`` (``input_activations``).
    """
    groups = format_groups(formats or {}) or {"nvfp4": []}
    if len(groups) > 1:  # mixed: ModelOpt's flat form with the per-layer map at the top (vLLM's modelopt_mixed)
        qc = {"ignore": excluded, "quant_algo": "MIXED_PRECISION", "quantized_layers": _quantized_layers(formats)}
    else:
        (fmt,) = groups
        args = _fp8_args() if fmt == "fp8" else _fp4_args()
        inputs = None if fmt == "nvfp4_w4a16" else dict(args)
        qc = {
            "config_groups": {"group_0": {"input_activations": inputs, "weights": args, "targets": ["Linear"]}},
            "ignore": excluded,
            "quant_algo": ALGOS[fmt],
        }
    if kv_cache:
        qc["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    qc["producer"] = producer(source)
    qc["quant_method"] = "modelopt"
    return qc


class ModelOpt(Layout):
    """The modelopt layout (see the module docstring)."""

    name = "modelopt"
    quant_method = "modelopt"
    suffixes = (".weight", ".weight_scale", ".weight_scale_2", ".input_scale")
    fused_suffixes = ("", "_weight_scale", "_weight_scale_2", "_input_scale")

    def store(self, packed, scales, s2, input_s2):
        return packed, scales, s2, input_s2

    def weight_values(self, packed, scales, global_scale):
        return fp4_dequantize(packed, scales.float() * global_scale.float())

    def input_s2(self, stored):
        return stored

    def kv_name(self, proj, which):
        return f"{proj}.{which}_scale"

    def kv_proj(self, name):
        return name.rsplit(".", 1)[0]

    def kv_value(self):
        return torch.tensor(1.0, dtype=torch.float32)

    def fp8_scale(self, s):
        return s.float().reshape(())

    def configure(self, tmp, kv_cache, excluded, source=None, formats=None):
        hq = quant_config(kv_cache, excluded, source, formats)
        (tmp / "hf_quant_config.json").write_text(json.dumps(hq, indent=2))
        update_config(tmp, config_json_quantization(kv_cache, excluded, source, formats))

    def config_format(self, ckpt: Path, qc: dict):
        hq_file = ckpt / "hf_quant_config.json"
        src = qc.get("quantization") or qc
        if not src and hq_file.is_file():
            src = json.loads(hq_file.read_text()).get("quantization") or {}
        algo = str(src.get("quant_algo")).upper()
        if algo == "MIXED_PRECISION":
            layers = {m: FORMAT_OF_ALGO.get(str(e.get("quant_algo")).upper()) for m, e in
                      (src.get("quantized_layers") or {}).items()}  # fmt: skip
            return layers.get
        fmt = FORMAT_OF_ALGO.get(algo)
        return lambda m: fmt

    def read_config(self, ckpt: Path, qc: dict, problems: list[str]) -> tuple[list[str], bool]:
        """(excluded-module patterns, FP8 KV cache) of a modelopt checkpoint, read where engines read them.

        vLLM and SGLang take config.json's ``quantization_config`` when there is one (ModelOpt's flat
        form: ``ignore``, ``kv_cache_scheme``; or the nested ``quantization`` form of hf_quant_config.json)
        and fall back to ``hf_quant_config.json`` only without it; TensorRT-LLM reads hf_quant_config.json.
        Both files, when present, must say the same.
        """
        hq_file = ckpt / "hf_quant_config.json"
        hq = json.loads(hq_file.read_text()).get("quantization") if hq_file.is_file() else None
        if qc and qc.get("quant_method") != "modelopt":
            problems.append(f"config.json quant_method is {qc.get('quant_method')!r}, expected 'modelopt'")
        if qc and "quantization" not in qc:  # ModelOpt's config.json form
            if "ignore" not in qc:
                problems.append(
                    "config.json quantization_config has no 'ignore': vLLM and SGLang read the unquantized "
                    "modules there (exclude_modules is not read in config.json)"
                )
            exclude = qc.get("ignore") or []
            scheme = qc.get("kv_cache_scheme")
            kv = isinstance(scheme, dict) and (scheme.get("type"), scheme.get("num_bits")) == ("float", 8)
            if qc.get("kv_cache_quant_algo") and not kv:
                problems.append(
                    "config.json sets kv_cache_quant_algo but no FP8 kv_cache_scheme: vLLM reads only "
                    "kv_cache_scheme in config.json and would run the KV cache unquantized"
                )
            algo = qc.get("quant_algo")
        else:
            src = (qc.get("quantization") if qc else hq) or {}
            if not qc and hq is None:
                problems.append(
                    "no quantization config: neither config.json quantization_config nor hf_quant_config.json"
                )
            exclude, kv, algo = (
                src.get("exclude_modules") or [],
                src.get("kv_cache_quant_algo") == "FP8",
                src.get("quant_algo"),
            )
        if not isinstance(exclude, list):
            problems.append(f"excluded modules must be a list, got {type(exclude).__name__}")
            exclude = []
        if hq is not None:
            if sorted(hq.get("exclude_modules") or []) != sorted(exclude):
                problems.append("hf_quant_config.json exclude_modules and config.json ignore list different modules")
            if (hq.get("kv_cache_quant_algo") == "FP8") != kv:
                problems.append("hf_quant_config.json and config.json disagree on the FP8 KV cache")
        if str(algo).upper() not in (*FORMAT_OF_ALGO, "MIXED_PRECISION"):
            problems.append(
                f"quantization config says quant_algo={algo!r}, expected one of {[*FORMAT_OF_ALGO, 'MIXED_PRECISION']}"
            )
        if (
            hq is not None
            and qc
            and (qc.get("quantization") or qc).get("quantized_layers") != hq.get("quantized_layers")
        ):
            problems.append("hf_quant_config.json and config.json give different quantized_layers")
        return list(exclude), kv


MODELOPT = ModelOpt()
