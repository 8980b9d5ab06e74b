"""The durable progress of a layer-by-layer run (what ``calibration.resume=true`` continues from)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from ..model.quantizers import QuantLinear, clear_caches
from ..model.view import weight_quantizers
from ..numerics import nvfp4
from ..numerics.errors import UserError

log = logging.getLogger("nvfp4cal")
# in a layer's saved state, beside its buffers: the weights an algorithm changed (``changes_weights``),
# NVFP4 weights on their grid as packed E2M1 codes (GPTQ), anything else as the tensor itself
CODES = "__codes__"
TENSORS = "__tensors__"


class StateError(UserError):
    pass


class LayerState:
    """The durable progress of a layerwise run: ``progress.json`` and one buffers file per finished layer."""

    def __init__(self, root: Path, fingerprint: dict, resume: bool, writer: bool):
        self.root, self.fingerprint, self.writer = root, fingerprint, writer
        self.progress = root / "progress.json"
        self.done = 0
        self.results: list[dict] = []
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvfp4cal-layer-state")
        self.pending: list = []
        if self.progress.is_file():
            if not resume:
                raise StateError(
                    f"{root} holds the progress of an earlier layerwise run: pass calibration.resume=true "
                    "to continue it, or remove the directory"
                )
            saved = json.loads(self.progress.read_text())
            differ = [k for k in fingerprint if saved["fingerprint"].get(k) != fingerprint[k]]
            if differ:
                raise StateError(
                    f"calibration.resume=true: {root} was made with another {', '.join(differ)}; "
                    "resume with the same settings or remove the directory"
                )
            self.done, self.results = saved["done"], saved["results"]
            log.info("resuming a layerwise run: %d layers done, from %s", self.done, root)
        elif writer:
            root.mkdir(parents=True, exist_ok=True)

    def _file(self, i: int) -> Path:
        return self.root / f"layer_{i:05d}.pt"

    def save(self, i: int, layer: nn.Module, results: dict, changes: dict | None = None) -> None:
        """Record layer ``i`` as finished: its buffers (quantizer state), the weights an algorithm changed
        (``changes``: ``{CODES: ..., TENSORS: ...}``) and its results, then the progress file, written in
        that order on a background thread while the next layer runs (:meth:`flush`)."""
        self.results.append(results)
        self.done = i + 1
        if not self.writer:
            return
        buffers = {n: b.detach().to("cpu", copy=True) for n, b in layer.named_buffers()}
        buffers.update(changes or {})
        progress = json.dumps({"fingerprint": self.fingerprint, "done": self.done, "results": self.results})

        def write():
            tmp = self._file(i).with_suffix(".tmp")
            torch.save(buffers, tmp)
            os.replace(tmp, self._file(i))
            tmp = self.progress.with_suffix(".tmp")
            tmp.write_text(progress)
            os.replace(tmp, self.progress)

        self.pending.append(self.pool.submit(write))

    def flush(self) -> None:
        """Wait for the saves in flight (and raise their errors)."""
        while self.pending:
            self.pending.pop(0).result()

    def load(self, i: int) -> dict:
        self.flush()
        return torch.load(self._file(i), map_location="cpu", weights_only=True)

    def remove(self) -> None:
        self.flush()
        if self.writer:
            shutil.rmtree(self.root, ignore_errors=True)


def _param_of(scope_name: str, prefix: str, owner: nn.Module) -> str:
    """The layer-relative parameter name of a weight named as :func:`weight_quantizers` names it."""
    rel = scope_name[len(prefix) + 1 :]
    return f"{rel}.weight" if isinstance(owner, QuantLinear) else rel


def changed_weights(scope: nn.Module, layer: nn.Module, prefix: str, same: Callable) -> dict:
    """Every parameter of a layer that differs from the source (``same(rel, p)``: equal to it), in the least
    space that restores it exactly: an NVFP4 weight that sits on its grid as its packed codes (restored
    on the saved block scales), anything else as the tensor itself. Fused weights are checked a few experts
    at a time (:func:`nvfp4.row_chunks`): no fp32 copy of a whole 34 GB expert tensor."""
    params = dict(layer.named_parameters())
    changed = {rel for rel, p in params.items() if not same(rel, p)}
    codes, tensors = {}, {}
    modules = dict(scope.named_modules())
    for wname, wq, w in weight_quantizers(scope):
        owner = modules.get(wname) or modules[wname.rsplit(".", 1)[0]]
        rel = _param_of(wname, prefix, owner)
        if rel not in changed:
            continue
        packed = []
        for c, blk, s2 in wq.chunks(w):
            part = w.detach()[c]
            nib, _ = nvfp4.quantize(part, blk, s2)
            if not torch.equal(nvfp4.dequantize(nib, nvfp4.block_scales(blk, s2), s2).to(w.dtype), part):
                break  # off its grid: kept as the tensor itself
            packed.append(nvfp4.pack(nib).cpu())
        else:
            codes[wname] = torch.cat(packed)
            changed.discard(rel)
    for rel in sorted(changed):
        tensors[rel] = params[rel].detach().to("cpu", copy=True)
    out = {}
    if codes:
        out[CODES] = codes
    if tensors:
        out[TENSORS] = tensors
    return out


@torch.no_grad()
def restore_weights(scope: nn.Module, layer: nn.Module, state: dict) -> None:
    """The weights :func:`changed_weights` kept, back into a layer whose buffers are restored."""
    for wname, wq, w in weight_quantizers(scope):
        if wname in state.get(CODES, {}):
            s2 = wq.scale_2_bcast(w.device)
            nib = nvfp4.unpack(state[CODES][wname].to(w.device))
            w.copy_(nvfp4.dequantize(nib, nvfp4.block_scales(wq.block_amax.to(w.device), s2), s2).to(w.dtype))
            wq.clear_cache()
    for rel, t in state.get(TENSORS, {}).items():
        layer.get_parameter(rel).copy_(t)
    if TENSORS in state:
        clear_caches(layer)
