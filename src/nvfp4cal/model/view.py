"""The model view: walkers over a model's quantization points and the names its checkpoint saves.

Everything a step needs to find in a model lives here, once: the NVFP4 weights with their
quantizers (:func:`weight_quantizers`, :func:`weight_inputs`, :func:`quant_sources`), the model's own
tensors and where ``save_pretrained`` puts each of them (:func:`model_tensors`, :func:`saved_layout`),
the decoder layers (the units of FSDP and of layer-by-layer work), and the finite-weights check.

Saved names come from transformers itself: each parameter gets a small probe tensor of ids
(one id per row, per expert), and ``revert_weight_conversion`` - what ``save_pretrained`` runs -
renames, splits and unfuses the probes exactly as it would the weights. Reading the ids back
tells, for every saved tensor, which parameter, expert and rows it holds, for any architecture
transformers knows (``mlp.experts.{e}.gate_proj`` for Qwen3-MoE, ``block_sparse_moe.experts.{e}.w1``
for Mixtral, ...).
"""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.core_model_loading import revert_weight_conversion

from ..numerics.comm import Comm, is_sharded, local
from ..numerics.errors import ExportError, UserError
from .experts import QuantExpertsMixin
from .quantizers import FP8WeightQuantizer, InputQuantizer, KVCastQuantizer, QuantLinear, WeightQuantizer


class BadWeightError(UserError):
    pass


@dataclass(frozen=True)
class Slice:
    """A saved tensor's origin: ``param[expert, rows]`` (expert None for 1-D/2-D parameters)."""

    param: str
    expert: int | None
    start: int
    stop: int
    full: bool  # the whole parameter (or the whole expert)


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own state (no quantizer statistics), tied duplicates dropped."""
    ours = (InputQuantizer, WeightQuantizer, FP8WeightQuantizer, KVCastQuantizer)
    skip = {f"{n}." for n, m in model.named_modules() if isinstance(m, ours)}
    skip |= {f"{n}.tokens" for n, m in model.named_modules() if isinstance(m, QuantExpertsMixin)}
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name in skip or name.rsplit(".", 1)[0] + "." in skip:
            continue
        if not t.numel():
            key = None
        elif t.is_meta or is_sharded(t):
            key = id(t)  # no storage to compare; tied parameters are one object
        else:
            key = (t.data_ptr(), tuple(t.shape))
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach()
    return out


# saved_layout's results per model object (planning an export before calibration and exporting after it
# pay for it once); a weak map, so a model that goes away takes its entry with it
_SAVED_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def saved_layout(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, Slice]:
    """Map each name ``save_pretrained`` would write to the slice of our parameters it holds.

    The result depends only on the model's structure; it is remembered per model object.
    """
    key = tuple((n, tuple(t.shape)) for n, t in tensors.items())
    memo = _SAVED_LAYOUTS.get(model)
    if memo is not None and memo[0] == key:
        return memo[1]
    probes, starts, owners, base = {}, [], [], 0
    for name, t in tensors.items():
        rows = t.shape[0] * (t.shape[1] if t.dim() == 3 else 1) if t.dim() else 1
        shape = (*t.shape[:-1], 1) if t.dim() >= 2 else (max(t.numel(), 1),)
        probes[name] = (torch.arange(rows, dtype=torch.float64) + base).reshape(shape)
        starts.append(base)
        owners.append((name, t))
        base += rows
    reverted = revert_weight_conversion(model, probes) if hasattr(model, "config") else probes
    layout = {}
    for out_name, probe in reverted.items():
        ids = probe.reshape(-1).numpy().astype(np.int64)
        i = bisect.bisect_right(starts, int(ids[0])) - 1
        pname, t = owners[i]
        rel = ids - starts[i]
        contiguous = bool(np.all(np.diff(rel) == 1))
        if t.dim() == 3 and contiguous and rel[0] == 0 and len(rel) == t.shape[0] * t.shape[1]:
            layout[out_name] = Slice(pname, None, 0, t.shape[1], True)  # saved fused, as stored (GPT-OSS)
            continue
        per = t.shape[1] if t.dim() == 3 else (t.shape[0] if t.dim() else 1)
        e = int(rel[0] // per) if t.dim() == 3 else None
        if t.dim() == 3 and int(rel[-1] // per) != e:
            raise ExportError(f"{out_name}: saved tensor spans several experts of {pname}; layout not supported")
        if not contiguous:
            raise ExportError(
                f"{out_name}: saved tensor is not a contiguous row slice of {pname}; layout not supported"
            )
        start = int(rel[0] % per) if t.dim() == 3 else int(rel[0])
        stop = start + len(rel)
        layout[out_name] = Slice(pname, e, start, stop, start == 0 and stop == per)
    _SAVED_LAYOUTS[model] = (key, layout)
    return layout


def take(t: torch.Tensor, s: Slice) -> torch.Tensor:
    if s.expert is not None:
        t = t[s.expert]
    return t if s.full or t.dim() == 0 else t[s.start : s.stop]


@dataclass
class QuantSource:
    weight: WeightQuantizer | FP8WeightQuantizer
    inputs: InputQuantizer
    transposed: bool = False  # stored [E, in, out]

    @property
    def format(self) -> str:
        """``nvfp4`` (W4A4), ``nvfp4_w4a16`` (inputs unquantized) or ``fp8`` (W8A8)."""
        if isinstance(self.weight, FP8WeightQuantizer):
            return "fp8"
        return "nvfp4_w4a16" if self.inputs.kind == "none" else "nvfp4"


def quant_sources(model: nn.Module) -> tuple[dict[str, QuantSource], dict[str, str]]:
    """(parameter name -> its weight and input quantizers (any format), parameter name -> 'k'|'v' for
    KV-cache projections)."""
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


def fp8_weights(model: nn.Module) -> list[tuple[str, FP8WeightQuantizer, torch.Tensor]]:
    """(name, quantizer, weight) for every FP8 weight quantizer (format ``fp8``)."""
    return [(n, m.weight_quantizer, m.weight) for n, m in model.named_modules()
            if isinstance(getattr(m, "weight_quantizer", None), FP8WeightQuantizer)]  # fmt: skip


def weight_quantizers(model: nn.Module) -> list[tuple[str, WeightQuantizer, torch.Tensor]]:
    """(name, quantizer, weight) for every enabled NVFP4 weight quantizer."""
    found = []
    for name, m in model.named_modules():
        wq = getattr(m, "weight_quantizer", None)
        if isinstance(wq, WeightQuantizer):
            found.append((name, wq, m.weight))
        if isinstance(m, QuantExpertsMixin):
            for wq, param in ((m.gate_up_weight, m.first_proj), (m.down_weight, "down_proj")):
                if wq is not None:
                    found.append((f"{name}.{param}", wq, m.logical_weight(param)))
    return found


def weight_inputs(model: nn.Module) -> dict[str, InputQuantizer]:
    """The input quantizer that feeds each weight of :func:`weight_quantizers` (same names)."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(getattr(m, "weight_quantizer", None), WeightQuantizer):
            found[name] = m.input_quantizer
        if isinstance(m, QuantExpertsMixin):
            found[f"{name}.{m.first_proj}"], found[f"{name}.down_proj"] = m.gate_up_input, m.down_input
    return found


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every entry of the model's ``...layers`` ModuleList(s): the FSDP units."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks"):
            out += [(f"{name}.{i}", layer) for i, layer in enumerate(m)]
    return out


def check_finite(model: nn.Module) -> None:
    """Every floating parameter finite (a sharded one: this rank's rows; a meta one is checked when filled)."""
    for name, p in model.named_parameters():
        p = local(p)
        if not p.is_floating_point() or p.is_meta:
            continue
        flat = p.detach().reshape(-1)  # in pieces of 2^28: no mask the size of a 34 GB expert tensor
        if not all(bool(torch.isfinite(c).all()) for c in flat.split(1 << 28)):
            raise BadWeightError(f"weight {name} holds NaN or Inf values; fix or re-export the model before quantizing")


def sync_statistics(model: nn.Module, comm: Comm) -> None:
    """Combine every calibration statistic across ranks as its module declares (``STATISTICS``:
    input amaxes with MAX; rows seen, expert token counts and input Hessians with SUM)."""
    if comm.world == 1:
        return
    reduce = {"max": comm.max_, "sum": comm.sum_}
    for m in model.modules():
        for attr, how in getattr(type(m), "STATISTICS", {}).items():
            t = getattr(m, attr, None)
            if t is not None:
                reduce[how](t)
