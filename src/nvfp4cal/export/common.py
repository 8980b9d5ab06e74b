"""What every export layout shares: saved names, sharded streaming writes, atomic directories.

Saved names come from transformers itself: each parameter gets a small probe tensor of ids
(one id per row, per expert), and ``revert_weight_conversion`` - what ``save_pretrained`` runs -
renames, splits and unfuses the probes exactly as it would the weights. Reading the ids back
tells, for every saved tensor, which parameter, expert and rows it holds, for any architecture
transformers knows (``mlp.experts.{e}.gate_proj`` for Qwen3-MoE, ``block_sparse_moe.experts.{e}.w1``
for Mixtral, ...).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError


class ExportError(UserError):
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
    from ..experts import QuantExpertsMixin
    from ..quantizers import InputQuantizer, KVCastQuantizer, WeightQuantizer

    ours = (InputQuantizer, WeightQuantizer, KVCastQuantizer)
    skip = {f"{n}." for n, m in model.named_modules() if isinstance(m, ours)}
    skip |= {f"{n}.tokens" for n, m in model.named_modules() if isinstance(m, QuantExpertsMixin)}
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name in skip or name.rsplit(".", 1)[0] + "." in skip:
            continue
        key = (t.data_ptr(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach()
    return out


def saved_layout(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, Slice]:
    """Map each name ``save_pretrained`` would write to the slice of our parameters it holds."""
    from transformers.core_model_loading import revert_weight_conversion

    probes, bases, base = {}, [], 0
    for name, t in tensors.items():
        rows = t.shape[0] * (t.shape[1] if t.dim() == 3 else 1) if t.dim() else 1
        shape = (*t.shape[:-1], 1) if t.dim() >= 2 else (max(t.numel(), 1),)
        probes[name] = (torch.arange(rows, dtype=torch.float64) + base).reshape(shape)
        bases.append((base, name, t))
        base += rows
    reverted = revert_weight_conversion(model, probes) if hasattr(model, "config") else probes
    layout = {}
    for out_name, probe in reverted.items():
        ids = probe.reshape(-1).long()
        first = int(ids[0])
        b, pname, t = max((x for x in bases if x[0] <= first), key=lambda x: x[0])
        rel = ids - b
        if t.dim() == 3 and torch.equal(rel, torch.arange(t.shape[0] * t.shape[1])):
            layout[out_name] = Slice(pname, None, 0, t.shape[1], True)  # saved fused, as stored (GPT-OSS)
            continue
        if t.dim() == 3:
            per = t.shape[1]
            experts = (rel // per).unique()
            if experts.numel() != 1:
                raise ExportError(f"{out_name}: saved tensor spans several experts of {pname}; layout not supported")
            rows = rel % per
            e = int(experts[0])
        else:
            rows, e, per = rel, None, (t.shape[0] if t.dim() else 1)
        start, stop = int(rows[0]), int(rows[-1]) + 1
        if not torch.equal(rows, torch.arange(start, stop)):
            raise ExportError(
                f"{out_name}: saved tensor is not a contiguous row slice of {pname}; layout not supported"
            )
        layout[out_name] = Slice(pname, e, start, stop, start == 0 and stop == per)
    return layout


def take(t: torch.Tensor, s: Slice) -> torch.Tensor:
    if s.expert is not None:
        t = t[s.expert]
    return t if s.full or t.dim() == 0 else t[s.start : s.stop]


Producer = Callable[[], dict[str, torch.Tensor]]


def write_shards(
    out_dir: Path,
    items: list[tuple[int, Producer]],
    max_shard_bytes: int,
    check: Callable[[dict[str, torch.Tensor]], None],
    progress: bool = True,
) -> dict[str, str]:
    """Stream ``(nbytes, producer)`` items into safetensors shards of at most ``max_shard_bytes``.

    Only one shard's tensors are held at a time. Writes ``model.safetensors`` (one shard) or
    ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``. Returns name -> file.
    """
    shards: list[list[Producer]] = [[]]
    size = 0
    for nbytes, prod in items:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(prod)
        size += nbytes
    n = len(shards)
    weight_map, total = {}, 0
    for i, group in enumerate(tqdm(shards, desc="export", unit="shard", disable=not progress)):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for prod in group:
            tensors.update(prod())
        check(tensors)
        tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return weight_map


def check_target(target: Path, overwrite: bool) -> None:
    """Fail before any work when the export would need to overwrite an existing result."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise ExportError(
            f"export dir {target} already exists; choose another export.dir or pass export.overwrite=true"
        )
    if target.exists() and not target.is_dir():
        raise ExportError(f"export dir {target} exists and is not a directory")


@contextmanager
def atomic_dir(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; rename it into place only on success."""
    target = Path(target).resolve()
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
