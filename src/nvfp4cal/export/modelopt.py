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

FP8 KV cache adds ``k_proj.k_scale`` / ``v_proj.v_scale`` (float32 []). Every other tensor keeps
its dtype. config.json's ``quantization_config`` (what vLLM and SGLang read) and
``hf_quant_config.json`` (ModelOpt's own file, TensorRT-LLM) describe it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from .. import __version__, nvfp4
from .plan import Layout, update_config, write_checkpoint

log = logging.getLogger("nvfp4cal")


MODELOPT = Layout(
    name="modelopt",
    quant_names=lambda p: (f"{p}.weight", f"{p}.weight_scale", f"{p}.weight_scale_2", f"{p}.input_scale"),
    fused_names=lambda p: (p, f"{p}_weight_scale", f"{p}_weight_scale_2", f"{p}_input_scale"),
    store=lambda packed, scales, s2, in_s2: (packed, scales, s2, in_s2),
    kv_name=lambda proj, which: f"{proj}.{which}_scale",
    kv_value=lambda: torch.tensor(1.0, dtype=torch.float32),
)


def quant_config(kv_cache: bool, excluded: list[str]) -> dict:
    """``hf_quant_config.json``: ModelOpt's own file (TensorRT-LLM reads it; vLLM only when config.json
    carries no ``quantization_config``)."""
    return {
        "producer": {"name": "nvfp4cal", "version": __version__},
        "quantization": {
            "quant_algo": "NVFP4",
            "group_size": nvfp4.BLOCK,
            "kv_cache_quant_algo": "FP8" if kv_cache else None,
            "exclude_modules": excluded,
        },
    }


def _fp4_args() -> dict:
    return {"dynamic": False, "num_bits": 4, "type": "float", "group_size": nvfp4.BLOCK}


def config_json_quantization(kv_cache: bool, excluded: list[str]) -> dict:
    """config.json's ``quantization_config``, field for field what ModelOpt's export writes there.

    vLLM and SGLang read this dict, not ``hf_quant_config.json``, when it is present: the unquantized
    modules under ``ignore`` (``exclude_modules`` is not looked at here), the FP8 KV cache as the
    ``kv_cache_scheme`` dict, W4A4 vs weight-only from ``config_groups`` (``input_activations``).
    """
    qc = {
        "config_groups": {"group_0": {"input_activations": _fp4_args(), "weights": _fp4_args(), "targets": ["Linear"]}},
        "ignore": excluded,
        "quant_algo": "NVFP4",
    }
    if kv_cache:
        qc["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    qc["producer"] = {"name": "nvfp4cal", "version": __version__}
    qc["quant_method"] = "modelopt"
    return qc


def configure(tmp: Path, kv_cache: bool, excluded: list[str]) -> None:
    (tmp / "hf_quant_config.json").write_text(json.dumps(quant_config(kv_cache, excluded), indent=2))
    update_config(tmp, config_json_quantization(kv_cache, excluded))


def export_modelopt(model: nn.Module, out_dir: str | Path, tokenizer=None, **kw) -> dict:
    """Write the modelopt-layout checkpoint into ``out_dir`` atomically (see :func:`plan.write_checkpoint`)."""
    return write_checkpoint(model, out_dir, MODELOPT, configure, tokenizer, **kw)
