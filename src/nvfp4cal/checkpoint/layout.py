"""What an export layout is: one object that names, stores, reads back and describes NVFP4 tensors.

A quantized weight ``w`` with global amax ``g`` and block amaxes ``a_b`` has (see nvfp4.py)
``s2 = g / 2688``, block bytes ``E4M3(a_b / 6 / s2)`` and nibbles ``E2M1(w / (byte * s2))``; its
input has ``input_s2 = input_amax / 2688``. A :class:`Layout` decides

* the four names of a quantized module (:meth:`Layout.quant_names`) or of experts saved fused
  (:meth:`Layout.fused_names`), and of an FP8 KV-cache scale (:meth:`Layout.kv_name`); a weight-only
  NVFP4 module (``nvfp4_w4a16``) has the first three; an FP8 module (``fp8``: E4M3 weight, per-tensor
  ``weight_scale = amax / 448`` and ``input_scale = input_amax / 448``) has :meth:`Layout.fp8_names`;
* how ``s2`` and ``input_s2`` are stored (:meth:`Layout.store`) and read back
  (:meth:`Layout.weight_values`, :meth:`Layout.input_s2`);
* its config files (:meth:`Layout.configure`) and what an engine reads from them
  (:meth:`Layout.read_config`).

The writer (:mod:`.plan`), the checker (:mod:`.check`) and the reader (:mod:`nvfp4cal.checkpoint.reload`) all
take one of these objects; :data:`LAYOUTS` holds them by ``export.format`` name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..model.quantizers import FUSED_SCALE_GROUPS  # noqa: F401 (the layouts' and the check's)
from ..numerics import nvfp4
from ..version import __version__


class Layout:
    """Base of the layouts; subclasses set the names and the config files (see the module docstring)."""

    name: str  # export.format
    quant_method: str  # config.json quantization_config.quant_method
    # suffixes of (packed weight, block scales, global scale, input scale) after a module name
    suffixes: tuple[str, str, str, str]
    # the same after a fused experts parameter's saved name; None: the layout cannot hold fused experts
    fused_suffixes: tuple[str, str, str, str] | None = None

    fp8_suffixes = (".weight", ".weight_scale", ".input_scale")  # the same in both layouts

    def quant_names(self, module: str) -> tuple[str, str, str, str]:
        return tuple(module + s for s in self.suffixes)

    def fp8_names(self, module: str) -> tuple[str, str, str]:
        return tuple(module + s for s in self.fp8_suffixes)

    def fp8_scale(self, s: torch.Tensor) -> torch.Tensor:
        """A per-tensor FP8 scale as this layout stores it (fp32)."""
        raise NotImplementedError

    def fp8_modules(self, tensors) -> set[str]:
        """Modules stored in FP8: an E4M3 ``.weight`` beside an fp32 ``.weight_scale``."""
        return {k[: -len(".weight")] for k, v in tensors.items()
                if k.endswith(".weight") and v.dtype == nvfp4.FP8 and k[: -len(".weight")] + ".weight_scale" in tensors}  # fmt: skip

    def fp8_input_scales(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """FP8 module -> its input's per-tensor scale (``input_amax / 448``)."""
        return {m: tensors[m + ".input_scale"].reshape(()).float() for m in self.fp8_modules(tensors)
                if m + ".input_scale" in tensors}  # fmt: skip

    def fused_names(self, param: str) -> tuple[str, str, str, str] | None:
        return None if self.fused_suffixes is None else tuple(param + s for s in self.fused_suffixes)

    # -- values -------------------------------------------------------------------------------------
    def store(self, packed, scales, s2, input_s2) -> tuple[torch.Tensor, ...]:
        """Our values (``s2 = g / 2688``) as this layout writes them."""
        raise NotImplementedError

    def weight_values(self, packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
        """fp32 weight values of stored tensors, dequantized as this layout defines them."""
        raise NotImplementedError

    def input_s2(self, stored: torch.Tensor) -> torch.Tensor:
        """The input's ``s2`` from its stored scale."""
        raise NotImplementedError

    def kv_name(self, proj: str, which: str) -> str:
        """The KV-cache scale of k/v projection module ``proj`` (``which``: 'k' or 'v')."""
        raise NotImplementedError

    def kv_proj(self, name: str) -> str:
        """The k/v projection module a stored KV-cache scale belongs to (inverse of :meth:`kv_name`)."""
        raise NotImplementedError

    def kv_value(self) -> torch.Tensor:
        raise NotImplementedError

    # -- config files -------------------------------------------------------------------------------
    def configure(
        self, tmp: Path, kv_cache: bool, excluded: list[str], source: dict | None = None, formats: dict | None = None
    ) -> None:
        """Write this layout's config files into ``tmp`` (config.json is there already); ``source``: the
        quantization the source checkpoint carried (named in the producer metadata); ``formats``: each
        quantized module's format (default: all ``nvfp4``)."""
        raise NotImplementedError

    def read_config(self, ckpt: Path, qc: dict, problems: list[str]) -> tuple[list[str], bool]:
        """(excluded-module patterns, FP8 KV cache) as engines read them; what is wrong goes to ``problems``."""
        raise NotImplementedError

    def config_format(self, ckpt: Path, qc: dict):
        """A function: module name -> the format the config files say it is in (None: not said)."""
        raise NotImplementedError

    # -- reading back ---------------------------------------------------------------------------------
    def dequantize(self, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
        """(saved name -> tensor with NVFP4 weights dequantized to fp32 under transformers' name,
        module (or fused parameter) -> input ``s2``, k/v projection module -> KV scale)."""
        packed, scale, glob, inp = self.suffixes
        fused = self.fused_suffixes
        skip = {scale, glob} | ({fused[1], fused[2]} if fused else set())
        weights, inputs, kv = {}, {}, {}
        fp8 = self.fp8_modules(tensors)
        for k, v in tensors.items():
            owner, _, leaf = k.rpartition(".")
            if owner in fp8 and leaf in ("weight", "weight_scale", "input_scale"):
                if leaf == "weight":  # FP8: weight * weight_scale; the input scale: fp8_input_scales
                    weights[k] = v.float() * tensors[owner + ".weight_scale"].float().reshape(())
                continue
            if k.endswith(tuple(skip)):
                continue
            mod = k.removesuffix(packed)
            if k.endswith(packed) and mod + scale in tensors:
                weights[f"{mod}.weight"] = self.weight_values(v, tensors[mod + scale], tensors[mod + glob])
            elif k.endswith(inp):
                inputs[k.removesuffix(inp)] = self.input_s2(v)
            elif fused and k.endswith(fused[3]):
                inputs[k.removesuffix(fused[3])] = self.input_s2(v)
            elif k.endswith((".k_scale", ".v_scale")):
                kv[self.kv_proj(k)] = v
            elif fused and k + fused[1] in tensors:  # fused experts [E, out, in/2], one global scale per expert
                weights[k] = self.weight_values(v, tensors[k + fused[1]], tensors[k + fused[2]][:, None, None])
            else:
                weights[k] = v
        return weights, inputs, kv

    def packed_modules(self, names) -> set[str]:
        """Modules (or fused parameters) whose NVFP4 packed weight and block scales are among ``names``."""
        packed, scale = self.suffixes[:2]
        names = set(names)
        return {n.removesuffix(packed) for n in names if n.endswith(packed) and n.removesuffix(packed) + scale in names}

    def holds(self, names) -> bool:
        """Whether tensors of these names are in this layout (its packed-weight names occur)."""
        return bool(self.packed_modules(names))


def format_groups(formats: dict[str, str]) -> dict[str, list[str]]:
    """format -> the sorted module names in it."""
    out: dict[str, list[str]] = {}
    for m, f in sorted(formats.items()):
        out.setdefault(f, []).append(m)
    return out


def producer(source: dict | None = None) -> dict:
    """The ``producer`` entry of the quantization configs (with the source's format when it had one)."""
    out = {"name": "nvfp4cal", "version": __version__}
    if source is not None:
        out["source_quantization"] = source
    return out


def update_config(tmp: Path, quantization_config: dict) -> None:
    """Add ``quantization_config`` to the config.json written in ``tmp``."""
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["quantization_config"] = quantization_config
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))


def fp4_dequantize(packed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """fp32 ``e2m1 * step_b`` of packed nibbles, one step per block of 16."""
    return nvfp4.dequantize_with_step(nvfp4.unpack(packed), step)
