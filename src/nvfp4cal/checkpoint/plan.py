"""The export step's planning and writing: which saved tensors are quantized, their NVFP4 values,
and the streaming, verified write of a checkpoint in any :class:`~.layout.Layout`.

Values of a quantized weight ``w`` with global amax ``g`` and block amaxes ``a_b`` (see nvfp4.py):
``s2 = g / 2688``, block bytes ``E4M3(a_b / 6 / s2)``, nibbles ``E2M1(w / (byte * s2))``; a
:class:`Layout` decides names and how ``s2`` and the input's ``s2`` are stored.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from tqdm.auto import tqdm

from ..model.view import QuantSource, Slice, model_tensors, quant_sources, saved_layout, take
from ..numerics import nvfp4
from ..numerics.errors import ExportError
from .check import verify
from .io import Item, Staging, commit_tmp, make_tmp, plan_shards, write_groups, write_index
from .layout import Layout


class PackedParams:
    """Packed nibbles, FP8 block scales and ``scale_2`` of whole quantized parameters.

    A parameter is quantized on its own device (the GPU in a GPU run) a chunk of experts at a time
    (:func:`nvfp4.row_chunks`: bounded temporaries) and stays there; every saved slice of it (an
    expert's gate rows, ...) is a view, copied to the file by the shard writer. Its block scales are
    checked for NaN bytes here, once per parameter. The last ``keep`` parameters are held:
    ``save_pretrained``'s order interleaves a layer's projections expert by expert.
    """

    def __init__(self, keep: int = 2):
        self.keep = keep
        self.cache: OrderedDict[str, tuple[torch.Tensor, ...]] = OrderedDict()

    @torch.no_grad()
    def get(self, pname: str, t: torch.Tensor, src: QuantSource) -> tuple[torch.Tensor, ...]:
        """(packed uint8, FP8 block scales, scale_2 (CPU), input scale_2 (CPU))."""
        if pname in self.cache:
            self.cache.move_to_end(pname)
            return self.cache[pname]
        w = t.detach().transpose(-1, -2) if src.transposed else t.detach()
        packed = torch.empty((*w.shape[:-1], w.shape[-1] // 2), dtype=torch.uint8, device=w.device)
        scales = torch.empty(src.weight.block_amax.shape, dtype=nvfp4.FP8, device=w.device)
        for c, blk, s2c in src.weight.chunks(w):
            nib, sc = nvfp4.quantize(w[c], blk, s2c)
            packed[c] = nvfp4.pack(nib)
            scales[c] = sc
        nan = nvfp4.nan_scale_bytes(scales)
        if nan:
            raise ExportError(f"{pname}: {nan} NaN E4M3 scale byte(s); refusing to write")
        in_s2 = src.inputs.input_scale().reshape(()).float().cpu()
        self.cache[pname] = (packed, scales, src.weight.scale_2().cpu(), in_s2)
        while len(self.cache) > self.keep:
            self.cache.popitem(last=False)
        return self.cache[pname]


def quantized_tensors(
    names: tuple[str, str, str, str],
    t: torch.Tensor,
    src: QuantSource,
    s: Slice,
    layout: Layout,
    packed_params: PackedParams,
    pname: str,
) -> dict:
    """(weight, weight_scale, weight_scale_2, input_scale) of one slice: a Linear, an expert's rows,
    or all experts of a fused parameter (then weight_scale_2 has one entry per expert), stored as
    ``layout`` says."""
    packed, scales, s2, in_s2 = packed_params.get(pname, t, src)
    s2 = s2 if s.expert is None else s2[s.expert]
    values = layout.store(take(packed, s), take(scales, s), s2.clone(), in_s2.clone())
    return dict(zip(names, values[: len(names)], strict=True))  # weight-only: three names, no input scale


@torch.no_grad()
def fp8_tensors(names: tuple[str, str, str], t: torch.Tensor, src: QuantSource, s: Slice, layout: Layout) -> dict:
    """(weight E4M3, weight_scale, input_scale) of an FP8 Linear, stored as ``layout`` says."""
    scale = src.weight.scale().to(t.device)
    w8 = nvfp4.fp8_quantize(take(t.detach(), s), scale)
    in_scale = src.inputs.input_scale().reshape(()).float().cpu()
    return dict(zip(names, (w8, layout.fp8_scale(scale.cpu()), layout.fp8_scale(in_scale)), strict=True))


def check_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse to write a NaN FP8 byte or a non-finite / non-positive global or input scale.

    FP8 tensors on a GPU were checked per whole parameter by :class:`PackedParams`.
    """
    for k, v in tensors.items():
        if v.dtype == nvfp4.FP8 and not v.is_cuda:
            nan = nvfp4.nan_scale_bytes(v)
            if nan:
                raise ExportError(f"{k}: {nan} NaN E4M3 scale byte(s); refusing to write")
        elif k.endswith(("_scale_2", "input_scale", "global_scale", "k_scale", "v_scale")) or (
            k.endswith("weight_scale") and v.dtype == torch.float32  # an FP8 weight's per-tensor scale
        ):
            if not (torch.isfinite(v).all() and (v > 0).all()):
                raise ExportError(f"{k} = {v.tolist()} is not finite and > 0; refusing to write")


def slice_numel(shape: torch.Size, s: Slice) -> int:
    """Elements of ``take(t, s)`` for a tensor of ``shape`` (without touching a sharded tensor)."""
    if s.expert is not None:
        shape = shape[1:]
    if s.full or not len(shape):
        return math.prod(shape)
    return (s.stop - s.start) * math.prod(shape[1:])


class TensorSource:
    """Where an export reads the model's tensors when it produces them: here, the model itself (one
    process, or DDP where every rank holds everything).

    Another way of holding weights subclasses it: FSDP's gathered units (:class:`nvfp4cal.lightning.fsdp.UnitGate`),
    or layers streamed from disk. ``tensor(name)`` is called on the writing rank (global rank 0) in
    write order; ``follow(name)`` on every other rank in the same order (to take part in collectives);
    ``close()`` once at the end, also after an error.
    """

    def __init__(self, model: nn.Module):
        self.tensors = model_tensors(model)

    def tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def follow(self, name: str | None) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class ExportPlan:
    """What one checkpoint of a model will hold."""

    items: list[Item]  # the tensors to write, in saved order
    excluded: list[str]  # modules kept in their dtype
    n_quant: int  # quantized tensors
    kv_cache: bool  # FP8 KV cache scales
    formats: dict[str, str]  # each quantized module's (or fused parameter's) format


def plan_export(
    model: nn.Module,
    layout: Layout,
    dtypes: dict[str, torch.dtype] | None = None,
    source: TensorSource | None = None,
) -> ExportPlan:
    """The :class:`ExportPlan` of ``model`` in ``layout``.

    ``dtypes`` maps parameter names to the dtype to write unquantized tensors in (default: as they are).
    ``source`` gives a model tensor when an item is produced (default: the model's own).
    """
    dtypes = dtypes or {}
    tensors = model_tensors(model)
    get = source.tensor if source is not None else tensors.__getitem__
    saved = saved_layout(model, tensors)
    quant, kv = quant_sources(model)
    modules = dict(model.named_modules())
    items, excluded, n_quant, formats = [], [], 0, {}
    packed_params = PackedParams()
    for out_name, s in saved.items():
        t = tensors[s.param]
        if s.param in quant:
            src = quant[s.param]
            fmt = src.format
            numel = slice_numel(t.shape, s)
            if fmt == "fp8":
                mod = out_name.removesuffix(".weight")
                names = layout.fp8_names(mod)

                def produce(s=s, n=names, q=src):
                    return fp8_tensors(n, get(s.param), q, s, layout)

                items.append(Item(numel + 8, names, produce, quantized=True, param=s.param))
            else:
                if out_name.endswith(".weight"):
                    mod = out_name[: -len(".weight")]
                    names = layout.quant_names(mod)
                elif s.expert is None and t.dim() == 3:
                    if layout.fused_suffixes is None:
                        raise ExportError(
                            f"{out_name}: experts saved fused (GPT-OSS) have no {layout.name} layout; "
                            "use export.format=modelopt"
                        )
                    mod, names = out_name, layout.fused_names(out_name)
                else:
                    raise ExportError(f"{out_name}: a quantized weight must be saved under a '.weight' name")
                if src.transposed and not s.full:
                    raise ExportError(f"{out_name}: row slices of transposed experts are not supported")
                names = names[:3] if fmt == "nvfp4_w4a16" else names  # weight-only: no input scale

                def produce(s=s, n=names, q=src):
                    return quantized_tensors(n, get(s.param), q, s, layout, packed_params, s.param)

                items.append(Item(numel // 2 + numel // 16 + 8, names, produce, quantized=True, param=s.param))
            formats[mod] = fmt
            n_quant += 1
        else:
            dt = dtypes.get(s.param, t.dtype)
            nbytes = slice_numel(t.shape, s) * (torch.finfo(dt).bits // 8 if dt.is_floating_point else t.element_size())
            # stays on its device: the shard writer copies GPU tensors through pinned buffers
            items.append(
                Item(
                    nbytes, (out_name,), lambda n=out_name, s=s, dt=dt: {n: take(get(s.param), s).to(dt)}, param=s.param
                )
            )
            owner = modules.get(s.param.rsplit(".", 1)[0])
            if out_name.endswith(".weight") and t.dim() == 2 and not isinstance(owner, nn.Embedding):
                excluded.append(out_name[: -len(".weight")])
        if s.param in kv:
            prefix = out_name[: -len(".weight")]
            which = kv[s.param]
            name = layout.kv_name(prefix, which)
            items.append(Item(4, (name,), lambda n=name: {n: layout.kv_value()}, quantized=True))
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head" not in excluded:
        excluded.append("lm_head")
    return ExportPlan(items, sorted(set(excluded)), n_quant, bool(kv), formats)


class CheckpointWriter:
    """One checkpoint: planned up front, written into a temporary directory beside ``out_dir``.

    With ``early=True``, ``start_early()`` (a GPU run calls it when calibration starts) writes, on a
    background thread and a side CUDA stream, every shard of tensors that calibration cannot change -
    the unquantized ones, planned into shards of their own - while the GPU calibrates. ``finish()`` writes the
    quantized weights, the index and the layout's configs, runs the checkpoint check
    (:func:`nvfp4cal.checkpoint.check.verify`) on the result and renames it into place; alone it does all
    of that. ``abort()`` removes the temporary directory.
    """

    def __init__(
        self,
        model: nn.Module,
        out_dir: str | Path,
        layout: Layout,
        *,
        tokenizer=None,
        overwrite: bool = False,
        max_shard_size_gb: float = 5.0,
        progress: bool = True,
        dtypes: dict[str, torch.dtype] | None = None,
        early: bool = False,
        source: TensorSource | None = None,
        source_format: dict | None = None,
    ):
        t0 = time.perf_counter()
        self.model, self.out_dir, self.layout = model, Path(out_dir), layout
        self.tokenizer, self.progress = tokenizer, progress
        self.source_format = source_format  # a quantized source checkpoint: named in the producer metadata
        plan = plan_export(model, layout, dtypes, source)
        items, self.excluded, self.n_quant, self.kv_cache, self.formats = (
            plan.items,
            plan.excluded,
            plan.n_quant,
            plan.kv_cache,
            plan.formats,
        )
        limit = int(max_shard_size_gb * 2**30)
        if early:  # unquantized tensors first, in shards of their own: written while calibration runs
            fixed = [i for i in items if not i.quantized]
            late = [i for i in items if i.quantized]
            self.early_shards = plan_shards(fixed, limit) if fixed else []
            self.late_shards = plan_shards(late, limit) if late else []
        else:  # the saved order (one model.safetensors for a small model)
            self.early_shards, self.late_shards = [], plan_shards(items, limit)
        self.n = len(self.early_shards) + len(self.late_shards)
        self.tmp = make_tmp(self.out_dir, overwrite)
        self.early: threading.Thread | None = None
        self.early_result: tuple[dict, int] | None = None
        self.early_error: BaseException | None = None
        self.seconds = {"plan": time.perf_counter() - t0}

    def _write(self, shards: list[list[Item]], first: int, staging: Staging, bar=None) -> tuple[dict, int]:
        return write_groups(self.tmp, shards, first, self.n, check_tensors, staging, bar)

    def _write_early(self) -> None:
        t0 = time.perf_counter()
        try:
            dev = next((p.device for p in self.model.parameters() if p.is_cuda), None)
            if dev is not None:
                torch.cuda.set_device(dev)  # the current device is per thread
            stream = torch.cuda.Stream(dev) if dev is not None else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                self.early_result = self._write(self.early_shards, 0, Staging())
                if stream is not None:
                    stream.synchronize()
        except BaseException as err:  # noqa: BLE001 (re-raised by finish())
            self.early_error = err
        self.seconds["write_early"] = time.perf_counter() - t0

    def start_early(self) -> None:
        if self.early_shards and self.early is None:
            self.early = threading.Thread(target=self._write_early, name="nvfp4cal-early-export", daemon=True)
            self.early.start()

    def finish(self) -> dict:
        try:
            t0 = time.perf_counter()
            staging = Staging()
            if self.early is None:
                self.early_result = self._write(self.early_shards, 0, staging)
            late_bytes = sum(i.nbytes for g in self.late_shards for i in g)
            bar = tqdm(total=late_bytes, desc="export", unit="B", unit_scale=True, disable=not self.progress)
            late = self._write(self.late_shards, len(self.early_shards), staging, bar)
            bar.close()
            if self.early is not None:
                self.early.join()
                if self.early_error is not None:
                    raise self.early_error
            weight_map = {**self.early_result[0], **late[0]}
            self.seconds["write"] = time.perf_counter() - t0
            if self.n > 1:
                write_index(self.tmp, weight_map, self.early_result[1] + late[1])
            save_config(self.model, self.tmp)
            self.layout.configure(self.tmp, self.kv_cache, self.excluded, self.source_format, self.formats)
            if getattr(self.model, "generation_config", None) is not None:
                self.model.generation_config.save_pretrained(self.tmp)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(self.tmp)
            t0 = time.perf_counter()
            verdict = verify(self.tmp)  # a checkpoint that fails verification never reaches out_dir
            self.seconds["verify"] = time.perf_counter() - t0
            if not verdict.ok:
                raise ExportError(
                    f"the {self.layout.name} export failed verification ({len(verdict.problems)} problems): "
                    + "; ".join(verdict.problems[:3])
                )
            commit_tmp(self.tmp, self.out_dir)
        except BaseException:
            self.abort()
            raise
        return {
            "dir": str(self.out_dir.resolve()),
            "format": self.layout.name,
            "quantized_tensors": self.n_quant,
            "formats": dict(sorted(Counter(self.formats.values()).items())),  # format -> modules written in it
            "excluded": self.excluded,
            "files": sorted(set(weight_map.values())),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }

    def abort(self) -> None:
        if self.early is not None:
            self.early.join()
        shutil.rmtree(self.tmp, ignore_errors=True)


def follow_export(
    model: nn.Module, layout: Layout, dtypes, source: TensorSource, max_shard_size_gb: float = 5.0
) -> None:
    """A rank that does not write: follow each item in the order the writing rank produces them
    (a :class:`CheckpointWriter` without ``early`` writes shard after shard)."""
    items = plan_export(model, layout, dtypes).items
    for shard in plan_shards(items, int(max_shard_size_gb * 2**30)):
        for item in shard:
            source.follow(item.param)


def write_checkpoint(model: nn.Module, out_dir: str | Path, layout: Layout, **kw) -> dict:
    """Plan, write, verify and rename a checkpoint in one go (see :class:`CheckpointWriter`)."""
    return CheckpointWriter(model, out_dir, layout, **kw).finish()


def save_config(model: nn.Module, tmp: Path) -> None:
    """config.json of ``model`` with ``architectures`` naming its class, as ``save_pretrained`` writes it.

    Engines pick the model class from ``architectures``: a config built in memory (an upcycled or
    random model) has none, and vLLM would map e.g. ``model_type: mixtral`` to a pooling model.
    """
    # FSDP2's fully_shard swaps the class for a generated FSDP<Name>(FSDPModule, <Name>)
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    model.config.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["architectures"] = [cls.__name__]
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
