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

FP8 KV cache adds ``self_attn.k_scale`` / ``self_attn.v_scale`` (float32 [1]) on the attention
module and config.json's ``kv_cache_scheme``. Experts that ``save_pretrained`` keeps fused
(GPT-OSS) cannot be written: compressed-tensors schemes target Linear modules.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import nvfp4
from .layout import Layout, fp4_dequantize, producer, update_config


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


def quantization_config(kv_cache: bool, excluded: list[str], source: dict | None = None) -> dict:
    """config.json's ``quantization_config`` for an NVFP4 W4A4 checkpoint in this layout."""
    kv = None
    if kv_cache:
        kv = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}
    return {
        "quant_method": "compressed-tensors",
        "format": "nvfp4-pack-quantized",
        "quantization_status": "compressed",
        "version": None,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": _fp4_args(False),
                "input_activations": _fp4_args("local"),
                "output_activations": None,
                "format": "nvfp4-pack-quantized",
            }
        },
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

    def configure(self, tmp: Path, kv_cache: bool, excluded: list[str], source: dict | None = None) -> None:
        update_config(tmp, quantization_config(kv_cache, excluded, source))

    def read_config(self, ckpt: Path, qc: dict, problems: list[str]) -> tuple[list[str], bool]:
        """(excluded-module patterns, FP8 KV cache) from config.json's ``quantization_config``."""
        if qc.get("format") != "nvfp4-pack-quantized":
            problems.append(f"compressed-tensors format is {qc.get('format')!r}, expected 'nvfp4-pack-quantized'")
        for gname, group in (qc.get("config_groups") or {}).items():
            w = group.get("weights") or {}
            if (w.get("num_bits"), w.get("type"), w.get("group_size")) != (4, "float", 16):
                problems.append(f"config group {gname}: weights are not FP4 with group_size 16")
        if not qc.get("config_groups"):
            problems.append("compressed-tensors config has no config_groups")
        return list(qc.get("ignore") or []), qc.get("kv_cache_scheme") is not None


COMPRESSED_TENSORS = CompressedTensors()
