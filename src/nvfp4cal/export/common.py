"""What every export layout shares: saved names, sharded streaming writes, atomic directories.

Saved names come from transformers itself: each parameter gets a small probe tensor of ids
(one id per row, per expert), and ``revert_weight_conversion`` - what ``save_pretrained`` runs -
renames, splits and unfuses the probes exactly as it would the weights. Reading the ids back
tells, for every saved tensor, which parameter, expert and rows it holds, for any architecture
transformers knows (``mlp.experts.{e}.gate_proj`` for Qwen3-MoE, ``block_sparse_moe.experts.{e}.w1``
for Mixtral, ...).
"""

from __future__ import annotations

import bisect
import json
import os
import queue
import shutil
import struct
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
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
    from ..sharded import is_sharded

    ours = (InputQuantizer, WeightQuantizer, KVCastQuantizer)
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


def saved_layout(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, Slice]:
    """Map each name ``save_pretrained`` would write to the slice of our parameters it holds.

    The result depends only on the model's structure; it is remembered on the model (planning an
    export before calibration and exporting after it pay for it once).
    """
    key = tuple((n, tuple(t.shape)) for n, t in tensors.items())
    memo = model.__dict__.get("_nvfp4cal_saved_layout")
    if memo is not None and memo[0] == key:
        return memo[1]
    from transformers.core_model_loading import revert_weight_conversion

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
    model.__dict__["_nvfp4cal_saved_layout"] = (key, layout)
    return layout


def take(t: torch.Tensor, s: Slice) -> torch.Tensor:
    if s.expert is not None:
        t = t[s.expert]
    return t if s.full or t.dim() == 0 else t[s.start : s.stop]


Producer = Callable[[], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Item:
    """Tensors written together: about ``nbytes``, named ``names``, made by ``produce()`` when written."""

    nbytes: int
    names: tuple[str, ...]
    produce: Producer
    quantized: bool = False  # depends on calibration (False: the model's own tensors, fixed)
    param: str | None = None  # the model tensor it is made from (sharded runs gather its unit first)


ST_DTYPES = {  # torch dtype -> safetensors dtype string
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class Staging:
    """A ring of pinned host buffers for GPU -> file copies (allocated on first use).

    A GPU tensor is copied piece by piece into a free buffer without blocking (DMA at full PCIe
    speed, no page faults), and the writer thread writes the piece once its copy has finished and
    then frees the buffer; the producer waits only when every buffer is in flight.
    """

    def __init__(self, slots: int = 8, slot_bytes: int = 32 << 20):
        self.slots, self.slot_bytes = slots, slot_bytes
        self.free: queue.Queue | None = None

    def acquire(self) -> torch.Tensor:
        if self.free is None:
            self.free = queue.Queue()
            for _ in range(self.slots):
                self.free.put(torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=True))
        return self.free.get()

    def release(self, buf: torch.Tensor) -> None:
        self.free.put(buf)


class ShardWriter:
    """Streams tensors into one safetensors file as they are produced.

    safetensors is ``u64 header size | JSON header | data``. The header's size is only known at the
    end, so room for it is reserved from the names to be written (JSON allows the trailing spaces
    that pad it), each tensor's offset is fixed as it arrives, and the header is written last.
    ``writers`` background threads ``pwrite`` the data at those offsets (releasing the GIL; page-cache
    copies run in parallel) while the caller produces the next tensors; at most ``max_pending`` bytes
    of CPU tensors wait in memory, GPU tensors pass through the pinned :class:`Staging` ring.
    """

    def __init__(
        self, path: Path, names: list[str], staging: Staging | None = None, max_pending: int = 1 << 30, writers: int = 4
    ):
        self.staging = staging or Staging()
        self.path = path
        self.reserve = (sum(len(n) + 200 for n in names) + 256 + 7) // 8 * 8
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.header: dict[str, dict] = {}
        self.offset = 0
        self.pool = ThreadPoolExecutor(max_workers=writers)
        self.pending: deque[tuple[Future, int]] = deque()
        self.pending_bytes, self.max_pending = 0, max_pending

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.header:
            raise ExportError(f"{name} written twice")
        t = t.detach().contiguous()
        nb = t.numel() * t.element_size()
        self.header[name] = {
            "dtype": ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self.offset, self.offset + nb],
        }
        self.offset += nb
        if not nb:
            return
        flat, at = t.reshape(-1).view(torch.uint8), 8 + self.reserve + self.offset - nb
        if flat.is_cuda:
            for off in range(0, nb, self.staging.slot_bytes):
                piece = flat[off : off + self.staging.slot_bytes]
                buf = self.staging.acquire()
                buf[: piece.numel()].copy_(piece, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
                self.pending.append((self.pool.submit(self._write_staged, buf, piece.numel(), done, at + off), 0))
            return
        self.pending.append((self.pool.submit(self._write_at, memoryview(flat.numpy()), at), nb))
        self.pending_bytes += nb
        while self.pending and self.pending_bytes > self.max_pending:
            self._wait_one()

    def _write_at(self, data: memoryview, at: int) -> None:
        """``pwrite`` at a known offset: several writer threads fill the file in parallel."""
        data = data.cast("B")
        while data:
            n = os.pwrite(self.fd, data, at)
            data, at = data[n:], at + n

    def _write_staged(self, buf: torch.Tensor, n: int, done: torch.cuda.Event, at: int) -> None:
        try:
            done.synchronize()
            self._write_at(memoryview(buf[:n].numpy()), at)
        finally:
            self.staging.release(buf)

    def _wait_one(self) -> None:
        fut, nb = self.pending.popleft()
        fut.result()
        self.pending_bytes -= nb

    def close(self, metadata: dict[str, str]) -> None:
        try:
            while self.pending:
                self._wait_one()
            header = json.dumps({"__metadata__": metadata, **self.header}, separators=(",", ":")).encode()
            if len(header) > self.reserve:
                raise ExportError(f"{self.path.name}: safetensors header larger than reserved ({len(header)} bytes)")
            self._write_at(
                memoryview(struct.pack("<Q", self.reserve) + header + b" " * (self.reserve - len(header))), 0
            )
        finally:
            self.pool.shutdown(wait=True)
            os.close(self.fd)


def plan_shards(items: list[Item], max_shard_bytes: int) -> list[list[Item]]:
    """Consecutive items in shards of at most ``max_shard_bytes`` (by their size estimates)."""
    shards: list[list[Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_shard(
    path: Path, group: list[Item], check: Callable[[dict[str, torch.Tensor]], None], staging: Staging, bar=None
) -> tuple[dict[str, str], int]:
    """Produce, check and stream one shard's items into ``path``; returns (name -> file name, bytes)."""
    writer = ShardWriter(path, [name for item in group for name in item.names], staging)
    weight_map = {}
    try:
        for item in group:
            tensors = item.produce()
            check(tensors)
            for k, v in tensors.items():
                writer.add(k, v)
                weight_map[k] = path.name
            if bar is not None:
                bar.update(item.nbytes)
    finally:
        writer.close({"format": "pt"})
    return weight_map, writer.offset


def write_groups(
    out_dir: Path,
    shards: list[list[Item]],
    first: int,
    n: int,
    check: Callable[[dict[str, torch.Tensor]], None],
    staging: Staging,
    bar=None,
) -> tuple[dict[str, str], int]:
    """Write ``shards`` as shard files ``first, first + 1, ...`` of ``n``; returns (name -> file, bytes)."""
    weight_map, total = {}, 0
    for i, group in enumerate(shards, start=first):
        part, nbytes = write_shard(out_dir / shard_name(i, n), group, check, staging, bar)
        weight_map.update(part)
        total += nbytes
    return weight_map, total


def write_index(out_dir: Path, weight_map: dict[str, str], total: int) -> None:
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_shards(
    out_dir: Path,
    items: list[Item],
    max_shard_bytes: int,
    check: Callable[[dict[str, torch.Tensor]], None],
    progress: bool = True,
) -> dict[str, str]:
    """Stream items into safetensors shards of at most ``max_shard_bytes``.

    Items are assigned to shards by their size estimate up front; each item's tensors are produced,
    checked and handed to the shard's writer one item at a time, so no shard is ever held in memory
    whole. Writes ``model.safetensors`` (one shard) or ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json``. Returns name -> file.
    """
    shards = plan_shards(items, max_shard_bytes)
    n = len(shards)
    bar = tqdm(total=sum(i.nbytes for i in items), desc="export", unit="B", unit_scale=True, disable=not progress)
    weight_map, total = write_groups(out_dir, shards, 0, n, check, Staging(), bar)
    bar.close()
    if n > 1:
        write_index(out_dir, weight_map, total)
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


def make_tmp(target: Path, overwrite: bool) -> Path:
    """A fresh temporary directory beside ``target`` (checked first: nothing existing is touched)."""
    target = Path(target).resolve()
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def commit_tmp(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` into place (replacing ``target`` only after the new one is complete)."""
    target = Path(target).resolve()
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


@contextmanager
def atomic_dir(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; rename it into place only on success."""
    tmp = make_tmp(target, overwrite)
    try:
        yield tmp
        commit_tmp(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
