"""The cached calibration activations of a layer-by-layer run: on the device, in CPU memory, or in files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch


def nbytes(obj) -> int:
    """Bytes of the tensors in ``obj`` (lists, tuples, dicts; a tensor shared twice counted twice)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(nbytes(o) for o in obj.values())
    return 0


def _to(obj, device: torch.device, pin: bool = False):
    """``obj`` (tensors in lists, tuples, dicts) on ``device``, the same tensor moved once."""
    memo: dict[int, torch.Tensor] = {}

    def move(o):
        if isinstance(o, torch.Tensor):
            if id(o) not in memo:
                t = o.detach().to(device)
                memo[id(o)] = t.pin_memory() if pin and t.device.type == "cpu" else t
            return memo[id(o)]
        if isinstance(o, tuple):
            return tuple(move(x) for x in o)
        if isinstance(o, list):
            return [move(x) for x in o]
        if isinstance(o, dict):
            return {k: move(v) for k, v in o.items()}
        return o

    return move(obj)


class ActivationStore:
    """Per calibration batch: the current layer's input hidden states and every layer's keyword inputs.

    ``where``: ``gpu`` (the compute device), ``cpu`` (pinned when computing on a GPU) or ``disk``
    (one file per batch under ``root``, read back memory-mapped).
    """

    def __init__(self, where: str, device: torch.device, root: Path):
        self.where, self.device, self.root = where, device, root
        self.items: list = []
        self.staged: dict[int, torch.Tensor] = {}
        if where == "disk":
            root.mkdir(parents=True, exist_ok=True)

    def _put(self, i: int, item) -> None:
        if self.where == "disk":
            path = self.root / f"batch_{i:06d}.pt"
            tmp = path.with_suffix(".tmp")
            torch.save(_to(item, torch.device("cpu")), tmp)
            os.replace(tmp, path)
            item = path
        elif self.where == "cpu":
            item = _to(item, torch.device("cpu"), pin=self.device.type == "cuda")
        else:
            item = _to(item, self.device)
        if i == len(self.items):
            self.items.append(item)
        else:
            self.items[i] = item

    def add(self, hidden: torch.Tensor, layer_kwargs: list[dict]) -> None:
        self._put(len(self.items), (hidden, layer_kwargs))

    def __len__(self) -> int:
        return len(self.items)

    def get(self, i: int) -> tuple[torch.Tensor, list[dict]]:
        item = self.items[i]
        if self.where == "disk":
            item = torch.load(item, mmap=True, weights_only=False)
        return _to(item, self.device)

    def set_hidden(self, i: int, hidden: torch.Tensor) -> None:
        """The next layer's input for batch ``i`` (its keyword inputs stay)."""
        item = self.items[i]
        if self.where == "disk":
            kwargs = torch.load(item, mmap=True, weights_only=False)[1]
        else:
            kwargs = item[1]
        self._put(i, (hidden, kwargs))

    def stage_hidden(self, i: int, hidden: torch.Tensor) -> None:
        """The next layer's input for batch ``i``, kept aside (as the store keeps it) until :meth:`commit`:
        the current layer's inputs stay readable meanwhile."""
        if self.where == "disk":
            path = self.root / f"next_{i:06d}.pt"
            torch.save(hidden.detach().cpu(), path)
            self.staged[i] = path
        elif self.where == "cpu":
            self.staged[i] = _to(hidden, torch.device("cpu"), pin=self.device.type == "cuda")
        else:
            self.staged[i] = hidden.detach()

    def staged_hidden(self, i: int) -> torch.Tensor:
        """Batch ``i``'s staged output (before :meth:`commit`), on the device."""
        h = self.staged[i]
        if self.where == "disk":
            h = torch.load(h, weights_only=True)
        return h.to(self.device)

    def commit(self) -> None:
        """The staged outputs become the inputs (the next layer's)."""
        staged, self.staged = self.staged, {}
        for i, h in sorted(staged.items()):
            if self.where == "disk":
                path = h
                h = torch.load(path, weights_only=True)
                self.set_hidden(i, h)
                path.unlink()
            else:
                self.set_hidden(i, h)

    def close(self) -> None:
        self.staged = {}
        self.items = []
        if self.where == "disk":
            shutil.rmtree(self.root, ignore_errors=True)


def choose_offload(asked: str, estimate: int, device: torch.device) -> str:
    """``auto``: the device if the activations take at most half of its free memory, else CPU memory
    if they take at most half of what is available, else files."""
    if asked != "auto":
        if asked == "gpu" and device.type != "cuda":
            return "cpu"  # on a CPU run "the device" is CPU memory
        return asked
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if estimate <= free // 2:
            return "gpu"
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        available = 0
    return "cpu" if estimate <= available // 2 else "disk"
