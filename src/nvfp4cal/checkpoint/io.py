"""Safetensors I/O of a checkpoint: streamed shard files, the index, atomic directories.

Items (tensors produced when written) are grouped into shards by huggingface_hub's
``split_state_dict_into_shards_factory`` (consecutive items up to ``max_shard_size``; an item larger
than that gets a shard of its own) under its file names (``model.safetensors`` or
``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``). Each shard file is
written as its tensors are produced (:class:`ShardWriter`), so no shard is ever held in memory.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import struct
import tempfile
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from huggingface_hub.constants import SAFETENSORS_WEIGHTS_FILE_PATTERN

from ..numerics.errors import ExportError

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
    """Items in shards of about ``max_shard_bytes`` (by their size estimates), as huggingface_hub splits
    a state dict: consecutive items, an item over the limit in a shard of its own."""
    split = split_state_dict_into_shards_factory(
        dict(enumerate(items)), get_storage_size=lambda item: item.nbytes, filename_pattern="{suffix}",
        max_shard_size=max_shard_bytes,
    )  # fmt: skip
    return [[items[i] for i in keys] for keys in split.filename_to_tensors.values()]


def shard_name(i: int, n: int) -> str:
    """The file name of shard ``i`` of ``n``, as huggingface_hub names them."""
    return SAFETENSORS_WEIGHTS_FILE_PATTERN.format(suffix="" if n == 1 else f"-{i + 1:05d}-of-{n:05d}")


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
