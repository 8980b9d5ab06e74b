"""The durable progress of a layer-by-layer run (what ``calibration.resume=true`` continues from)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

log = logging.getLogger("nvfp4cal")
CODES = "__codes__"  # in a layer's saved state: the packed E2M1 codes of weights a step rounded (GPTQ)


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

    def save(self, i: int, layer: nn.Module, results: dict, codes: dict | None = None) -> None:
        """Record layer ``i`` as finished: its buffers (quantizer state) and results, then the progress
        file, written in that order on a background thread while the next layer runs (:meth:`flush`)."""
        self.results.append(results)
        self.done = i + 1
        if not self.writer:
            return
        buffers = {n: b.detach().to("cpu", copy=True) for n, b in layer.named_buffers()}
        if codes is not None:
            buffers[CODES] = codes
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
