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
its dtype. ``hf_quant_config.json`` and config.json's ``quantization_config`` describe it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import __version__, nvfp4
from ..experts import QuantExpertsMixin
from ..quantizers import InputQuantizer, QuantLinear, WeightQuantizer
from .common import ExportError, Slice, atomic_dir, model_tensors, saved_layout, take, write_shards

log = logging.getLogger("nvfp4cal")


@dataclass
class QuantSource:
    weight: WeightQuantizer
    inputs: InputQuantizer
    transposed: bool = False  # stored [E, in, out]


def quant_sources(model: nn.Module) -> tuple[dict[str, QuantSource], dict[str, str]]:
    """(parameter name -> NVFP4 quantizers, parameter name -> 'k'|'v' for KV-cache projections)."""
    quant, kv = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            if m.weight_quantizer is not None:
                quant[f"{name}.weight"] = QuantSource(m.weight_quantizer, m.input_quantizer)
            if m.output_quantizer is not None:
                kv[f"{name}.weight"] = name.rsplit(".", 1)[-1][0]
        elif isinstance(m, QuantExpertsMixin):
            if m.gate_up_weight is not None:
                quant[f"{name}.{m.first_proj}"] = QuantSource(m.gate_up_weight, m.gate_up_input, m.transposed)
            if m.down_weight is not None:
                quant[f"{name}.down_proj"] = QuantSource(m.down_weight, m.down_input, m.transposed)
    return quant, kv


def quantized_tensors(names: tuple[str, str, str, str], t: torch.Tensor, src: QuantSource, s: Slice) -> dict:
    """(weight, weight_scale, weight_scale_2, input_scale) of one slice: a Linear, an expert's rows,
    or all experts of a fused parameter (then weight_scale_2 has one entry per expert)."""
    w = take(t.transpose(-1, -2) if src.transposed else t, s)
    blk = take(src.weight.block_amax, s)
    g = src.weight.global_amax if s.expert is None else src.weight.global_amax[s.expert]
    s2 = nvfp4.scale_2(g)
    nib, scales = nvfp4.quantize(w, blk.to(w.device), s2.to(w.device)[(...,) + (None,) * 2])
    in_scale = src.inputs.input_scale().reshape(()).float().clone()
    return dict(zip(names, (nvfp4.pack(nib), scales, s2.clone(), in_scale), strict=True))


def check_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse to write a NaN FP8 byte or a non-finite / non-positive global or input scale."""
    for k, v in tensors.items():
        if v.dtype == nvfp4.FP8:
            bad = (v.view(torch.uint8) & 0x7F) == 0x7F
            if bad.any():
                raise ExportError(f"{k}: {int(bad.sum())} NaN E4M3 scale byte(s); refusing to write")
        elif k.endswith(("_scale_2", "input_scale", "k_scale", "v_scale")):
            if not (torch.isfinite(v).all() and (v > 0).all()):
                raise ExportError(f"{k} = {v.tolist()} is not finite and > 0; refusing to write")


def plan_export(model: nn.Module, dtypes: dict[str, torch.dtype] | None = None) -> tuple[list, list[str], int]:
    """(items for :func:`write_shards`, excluded module names, number of quantized tensors).

    ``dtypes`` maps parameter names to the dtype to write unquantized tensors in (default: as they are).
    """
    dtypes = dtypes or {}
    tensors = model_tensors(model)
    layout = saved_layout(model, tensors)
    quant, kv = quant_sources(model)
    modules = dict(model.named_modules())
    items, excluded, n_quant = [], [], 0
    for out_name, s in layout.items():
        t = tensors[s.param]
        if s.param in quant:
            src = quant[s.param]
            if out_name.endswith(".weight"):
                p = out_name[: -len(".weight")]
                names = (f"{p}.weight", f"{p}.weight_scale", f"{p}.weight_scale_2", f"{p}.input_scale")
            elif s.expert is None and t.dim() == 3:
                names = (out_name, f"{out_name}_weight_scale", f"{out_name}_weight_scale_2", f"{out_name}_input_scale")
            else:
                raise ExportError(f"{out_name}: a quantized weight must be saved under a '.weight' name")
            if src.transposed and not s.full:
                raise ExportError(f"{out_name}: row slices of transposed experts are not supported")
            numel = take(t, s).numel()
            items.append((numel // 2 + numel // 16 + 8, lambda t=t, s=s, n=names, q=src: quantized_tensors(n, t, q, s)))
            n_quant += 1
        else:
            part = take(t, s)
            dt = dtypes.get(s.param, t.dtype)
            nbytes = part.numel() * (torch.finfo(dt).bits // 8 if dt.is_floating_point else part.element_size())
            items.append((nbytes, lambda n=out_name, t=t, s=s, dt=dt: {n: take(t, s).to(dt, copy=True)}))
            owner = modules.get(s.param.rsplit(".", 1)[0])
            if out_name.endswith(".weight") and t.dim() == 2 and not isinstance(owner, nn.Embedding):
                excluded.append(out_name[: -len(".weight")])
        if s.param in kv:
            prefix = out_name[: -len(".weight")]
            which = kv[s.param]
            items.append((4, lambda p=prefix, w=which: {f"{p}.{w}_scale": torch.tensor(1.0, dtype=torch.float32)}))
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head" not in excluded:
        excluded.append("lm_head")
    return items, sorted(set(excluded)), n_quant


def quant_config(kv_cache: bool, excluded: list[str]) -> dict:
    return {
        "producer": {"name": "nvfp4cal", "version": __version__},
        "quantization": {
            "quant_algo": "NVFP4",
            "group_size": nvfp4.BLOCK,
            "kv_cache_quant_algo": "FP8" if kv_cache else None,
            "exclude_modules": excluded,
        },
    }


def export_modelopt(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer=None,
    overwrite: bool = False,
    max_shard_size_gb: float = 5.0,
    progress: bool = True,
    dtypes: dict[str, torch.dtype] | None = None,
) -> dict:
    """Write the checkpoint into ``out_dir`` atomically; returns a summary dict."""
    _, kv = quant_sources(model)
    items, excluded, n_quant = plan_export(model, dtypes)
    with atomic_dir(Path(out_dir), overwrite) as tmp:
        weight_map = write_shards(tmp, items, int(max_shard_size_gb * 2**30), check_tensors, progress)
        hf_quant = quant_config(bool(kv), excluded)
        (tmp / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=2))
        model.config.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["quantization_config"] = {
            "quant_method": "modelopt",
            **hf_quant["quantization"],
            "producer": hf_quant["producer"],
        }
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        from ..verify import verify  # a checkpoint that fails verification never reaches out_dir

        verdict = verify(tmp)
        if not verdict.ok:
            raise ExportError(
                f"the export failed verification ({len(verdict.problems)} problems): " + "; ".join(verdict.problems[:3])
            )
    files = sorted(set(weight_map.values()))
    return {"dir": str(Path(out_dir).resolve()), "quantized_tensors": n_quant, "excluded": excluded, "files": files}
