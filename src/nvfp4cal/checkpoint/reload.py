"""Read an exported checkpoint (modelopt or compressed-tensors layout) back: dequantized tensors and a W4A4 model.

Each layout dequantizes as its :class:`~nvfp4cal.checkpoint.layout.Layout` object defines: modelopt
``e2m1 * (byte * weight_scale_2)``, compressed-tensors ``e2m1 * (byte / weight_global_scale)`` (the two
differ in the last bit of the step for some bytes).

Used by the tests (export round trips) and by anyone who wants to evaluate an export on CPU.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..model.experts import QuantExpertsMixin, convert
from ..model.quantizers import KVCastQuantizer, QuantLinear, set_mode
from ..model.view import model_tensors, saved_layout
from ..numerics import nvfp4
from .formats import layout_of, layout_of_tensors
from .layout import Layout


def read_tensors(ckpt: str | Path) -> dict[str, torch.Tensor]:
    ckpt = Path(ckpt)
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def dequantized(
    tensors: dict[str, torch.Tensor], layout: Layout | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(saved name -> tensor with NVFP4 weights dequantized to fp32, module -> input_scale, module -> kv scales),
    read as ``layout`` defines it (default: the layout whose names the tensors carry)."""
    return (layout or layout_of_tensors(tensors)).dequantize(tensors)


def rebuild_model(ckpt: str | Path, dtype: torch.dtype | None = None):
    """A transformers model with the export's dequantized weights, its inputs fake-quantized with
    the exported ``input_scale`` (NVFP4; FP8 for FP8 Linears; none for weight-only NVFP4) and its k/v
    outputs cast to FP8: what an engine computes, emulated."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    ckpt = Path(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    tensors, layout_obj = read_tensors(ckpt), layout_of(cfg.get("quantization_config"))
    weights, inputs, kv = dequantized(tensors, layout_obj)
    fp8_inputs = layout_obj.fp8_input_scales(tensors)  # FP8 Linears: their inputs cast to FP8 (W8A8)
    nvfp4_mods = layout_obj.packed_modules(tensors)
    del tensors
    cfg.pop("quantization_config", None)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        config = AutoConfig.from_pretrained(tmp)
        dtype = dtype or getattr(config, "dtype", None) or torch.float32
        weights = {
            k: (v.to(dtype) if v.is_floating_point() and v.dtype == torch.float32 else v) for k, v in weights.items()
        }
        with no_init_weights():
            skeleton = AutoModelForCausalLM.from_config(config)
        for name, m in skeleton.named_modules():  # fused experts were written untransposed
            for p in ("gate_up_proj", "up_proj", "down_proj"):
                key = f"{name}.{p}"
                if key in weights and key in inputs and getattr(m, "is_transposed", False):
                    weights[key] = weights[key].transpose(-1, -2).contiguous()
        del skeleton
        save_file({k: v.contiguous() for k, v in weights.items()}, str(Path(tmp) / "model.safetensors"))
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype)
    model.eval()
    layout = saved_layout(model, model_tensors(model))
    modules = dict(model.named_modules())
    for out_name, s in layout.items():
        mod = out_name[: -len(".weight")] if out_name.endswith(".weight") else out_name
        owner_name, _, pname = s.param.rpartition(".")
        owner = modules[owner_name]
        if mod in inputs:
            scale = inputs[mod].float().reshape(())
            if pname == "weight":
                QuantLinear.convert(owner, nvfp4_on=True, kv=False, weights=False)
                owner.input_quantizer.fixed_scale = scale
            else:
                if not isinstance(owner, QuantExpertsMixin):
                    convert(owner_name, owner, True, True, weights=False)
                q = owner.down_input if pname == "down_proj" else owner.gate_up_input
                if q.fixed_scale is not None and not torch.equal(q.fixed_scale, scale):
                    raise ValueError(f"{mod}: input_scale differs between experts of {owner_name}")
                q.fixed_scale = scale
        elif mod in nvfp4_mods and pname != "weight" and not isinstance(owner, QuantExpertsMixin):
            convert(owner_name, owner, True, True, weights=False)  # weight-only experts: our experts forward
        if mod in fp8_inputs and pname == "weight":
            QuantLinear.convert(owner, nvfp4_on=True, kv=False, weights=False, fmt="fp8")
            owner.input_quantizer.fixed_scale = fp8_inputs[mod].float().reshape(())
        if mod in kv and pname == "weight":
            QuantLinear.convert(owner, nvfp4_on=False, kv=True)
            owner.output_quantizer = KVCastQuantizer().to(owner.weight.device)
            owner.output_quantizer.amax.fill_(float(kv[mod]) * nvfp4.FP8_MAX)
    for m in model.modules():
        if isinstance(m, QuantExpertsMixin):
            m.inputs_on = (m.gate_up_input.fixed_scale is not None, m.down_input.fixed_scale is not None)
    set_mode(model, "quant")
    return model
