"""The export group (``conf/export/*.yaml``, built through ``_target_``) and the export step.

:class:`Export` says which checkpoints a run writes (``format``: one layout, or ``both`` into
``dir/modelopt`` and ``dir/compressed_tensors``), refuses an existing directory before any work,
plans every layout against the model before calibration (a layout that cannot hold the model fails
early) and makes the writers. :func:`export_checkpoints` is the step: global rank 0 writes, reading
the model's tensors from the run's tensor source; in a run that holds rows of every weight on each
rank the others follow the same units in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..numerics.comm import RunContext
from ..numerics.errors import ExportError
from .formats import LAYOUTS
from .io import check_target
from .layout import Layout
from .plan import CheckpointWriter, TensorSource, follow_export, plan_export


@dataclass
class Export:
    """``export.*``: where and in which layouts the checkpoint is written."""

    dir: str | None  # None: no checkpoint is written (the Python API exports later)
    format: str = "modelopt"
    overwrite: bool = False
    max_shard_size_gb: float = 5.0

    def __post_init__(self):
        if self.format not in (*LAYOUTS, "both"):
            raise ExportError(f"export.format={self.format!r} unknown; use one of {[*LAYOUTS, 'both']}")
        if not isinstance(self.max_shard_size_gb, (int, float)) or not self.max_shard_size_gb > 0:
            raise ExportError(f"export.max_shard_size_gb={self.max_shard_size_gb!r} must be a number > 0")

    def targets(self) -> list[tuple[Layout, Path]]:
        """(layout, directory) of every checkpoint this export writes."""
        if self.dir is None:
            return []
        if self.format == "both":
            return [(layout, Path(self.dir) / name) for name, layout in LAYOUTS.items()]
        return [(LAYOUTS[self.format], Path(self.dir))]

    def check_targets(self) -> None:
        """Before any work: no existing result is overwritten unless ``export.overwrite=true``."""
        for _, out in self.targets():
            check_target(out, self.overwrite)

    def check_model(self, model: nn.Module) -> None:
        """Plan every export now (names and slices only) so that an impossible layout fails early."""
        for layout, _ in self.targets():
            plan_export(model, layout)

    def writer(
        self, model: nn.Module, layout: Layout, out: Path, ctx: RunContext, *, tokenizer=None, dtypes=None,
        early: bool = False, source: TensorSource | None = None, source_format: dict | None = None,
    ) -> CheckpointWriter:  # fmt: skip
        return CheckpointWriter(
            model, out, layout, tokenizer=tokenizer, overwrite=self.overwrite, max_shard_size_gb=self.max_shard_size_gb,
            progress=ctx.progress, dtypes=dtypes, early=early, source=source, source_format=source_format,
        )  # fmt: skip


def early_writers(model: nn.Module, ctx: RunContext, export: Export, tokenizer=None, dtypes=None,
                  source_format: dict | None = None) -> list:  # fmt: skip
    """On one GPU holding whole weights: writers that start writing the tensors calibration cannot
    change (the unquantized ones) while the GPU calibrates; elsewhere none."""
    if ctx.device.type != "cuda" or not ctx.rank0 or ctx.sharded or ctx.tensors is not None:
        return []  # (a tensor source of its own: the weights are not all there while calibrating)
    writers = []
    for layout, out in export.targets():
        writers.append(export.writer(model, layout, out, ctx, tokenizer=tokenizer, dtypes=dtypes, early=True,
                                     source_format=source_format))  # fmt: skip
        writers[-1].start_early()
    return writers


def export_checkpoints(
    model: nn.Module,
    ctx: RunContext,
    export: Export,
    tokenizer=None,
    dtypes: dict[str, torch.dtype] | None = None,
    writers: list[CheckpointWriter] | None = None,
    source_format: dict | None = None,
) -> list[dict]:
    """The export step: write, verify and rename every checkpoint of ``export``; returns what each wrote.

    ``writers``: the :func:`early_writers` started during calibration (they finish here).
    ``ctx.tensors`` says where the tensors come from (default: the model's own).
    """
    writers = list(writers or [])
    source = ctx.tensors(model) if ctx.tensors is not None else TensorSource(model)
    done = []
    try:
        for i, (layout, out) in enumerate(export.targets()):
            if ctx.rank0:
                w = writers[i] if i < len(writers) else None
                w = w or export.writer(model, layout, out, ctx, tokenizer=tokenizer, dtypes=dtypes, source=source,
                                       source_format=source_format)  # fmt: skip
                done.append(w.finish())
            elif ctx.sharded:  # take part in the same gathers, unit by unit
                follow_export(model, layout, dtypes, source, export.max_shard_size_gb)
            source.close()
    except BaseException:
        for w in writers[len(done) :]:
            w.abort()
        raise
    finally:
        source.close()
    ctx.comm.barrier()
    return done


def export_model(model: nn.Module, dir: str | Path, format: str = "modelopt", tokenizer=None, overwrite: bool = False,
                 dtypes: dict[str, torch.dtype] | None = None):  # fmt: skip
    """Write the checkpoint(s) of a calibrated model (``format``: modelopt, compressed_tensors or both),
    each verified before it is renamed into place; returns what each wrote. The Python API's
    ``nvfp4cal.checkpoint``. ``dtypes``: the dtypes to write unquantized tensors in (a model computed in fp32)."""
    target = Export(dir=str(dir), format=format, overwrite=overwrite)
    target.check_targets()
    ctx = RunContext.single()  # one process, no progress bars
    return [
        target.writer(model, layout, out, ctx, tokenizer=tokenizer, dtypes=dtypes).finish()
        for layout, out in target.targets()
    ]
