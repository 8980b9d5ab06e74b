"""Layer-by-layer calibration (``calibration=layerwise``): a model larger than the device, one decoder
layer at a time, resumable.

The model is built on the meta device; its loader gives ``fill`` (rows of any parameter, from the
checkpoint's safetensors or from seeds). A model already in memory (the embedded default, a model given
to the Python API) gets a ``fill`` that reads its own tensors (:func:`nvfp4cal.model.loaders.fill_from_memory`)
and is whole again, calibrated, when the run ends. A model already in memory (the embedded default, a model given
to the Python API) gets a ``fill`` that reads its own tensors (:func:`nvfp4cal.model.loaders.fill_from_memory`)
and is whole again, calibrated, when the run ends. Schedule, driven by ``Trainer.validate``:

1. **Capture** (the Trainer's pass over the DataModule's batches): the parameters outside the decoder
   layers (embeddings, final norm, LM head) are materialized, every decoder layer is replaced by a
   recorder that keeps the keyword inputs the model passes it (masks per attention type, position
   embeddings, ...) and returns its input; the first layer's inputs are kept per batch in an
   :class:`ActivationStore` (on the device, in CPU memory, or in files: ``calibration.offload``).
2. **Layers**, in order: materialize the layer (``fill``), recalibrate its weight quantizers, run every
   cached batch through it with the quantizers calibrating (its outputs become the next layer's
   inputs: the unquantized outputs by default, ``calibration.propagate=quantized`` the W4A4 ones),
   reduce its statistics across ranks, run the per-unit steps (bootstrap, measure, the algorithm's
   hook) on it (all of it :func:`nvfp4cal.calibration.calibrate_unit`, as for the whole model), save its
   buffers (quantizer state) and every weight the algorithm changed to the state directory, free it.
3. **Export**: the usual writer, reading the model's tensors through :class:`LayerwiseSource`, which
   materializes one layer at a time with its saved quantizer state and changed weights.

With unquantized propagation every layer sees exactly the inputs it sees in a whole-model forward, so
the checkpoint is byte-identical to a whole-model run of the same weights, data and recipe.
Progress is durable: ``state_dir/progress.json`` (the configuration's fingerprint and the finished
layers) and one file of buffers per finished layer. ``calibration.resume=true`` recomputes the inputs
of the first unfinished layer by running the finished ones again (their weights and saved state) and
continues from there.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algorithms import Algorithm, Unit
from ..calibration import RunUnit, calibrate_unit, forward
from ..checkpoint.plan import TensorSource
from ..evaluation.compare import Comparison
from ..model.quantizers import InputQuantizer, clear_caches, set_mode
from ..model.view import decoder_layers
from ..numerics import nvfp4
from ..numerics.comm import RunContext
from ..numerics.errors import UserError
from ..results import Results
from .activations import ActivationStore, choose_offload, nbytes
from .layer_state import LayerState, changed_weights, restore_weights
from .recorder import captured, restore
from .recorder import record as record_layers
from .streamed import evaluate_streamed

log = logging.getLogger("nvfp4cal")
OFFLOADS = ("auto", "gpu", "cpu", "disk")
PROPAGATIONS = ("unquantized", "quantized")
Fill = Callable[[str, torch.Tensor, int, int, int], None]


@dataclass
class Layerwise:
    """``calibration=layerwise``: the config group's object (see the module docstring)."""

    state_dir: str
    offload: str = "auto"
    resume: bool = False
    propagate: str = "unquantized"
    layerwise = True

    def __post_init__(self):
        if self.offload not in OFFLOADS:
            raise UserError(f"calibration.offload={self.offload!r} unknown; use one of {list(OFFLOADS)}")
        if self.propagate not in PROPAGATIONS:
            raise UserError(f"calibration.propagate={self.propagate!r} unknown; use one of {list(PROPAGATIONS)}")

    def schedule(self, algorithm: Algorithm, fill: Fill, fingerprint: dict, held: bool = False) -> LayerwiseSchedule:
        return LayerwiseSchedule(self, fill, fingerprint, algorithm, held)


def _scope(prefix: str, module: nn.Module) -> nn.Module:
    """A container whose ``named_modules`` names ``module`` as ``prefix`` (the steps then name weights
    as in the whole model)."""
    root = cur = nn.Module()
    *parents, last = prefix.split(".")
    for part in parents:
        nxt = nn.Module()
        cur.add_module(part, nxt)
        cur = nxt
    cur.add_module(last, module)
    return root


class LayerMaterializer:
    """Makes one decoder layer real (from ``fill``) and sends it back to the meta device; counts how many
    are real at once (``peak``)."""

    def __init__(self, model: nn.Module, fill: Fill, device: torch.device, upcast: bool):
        self.model, self.fill, self.device, self.upcast = model, fill, device, upcast
        self.layers = decoder_layers(model)
        self.dtypes = {n: p.dtype for n, p in model.named_parameters()}  # as loaded (before any fp32 upcast)
        self.real: set[int] = set()
        self.peak = 0

    def outside(self) -> None:
        """Materialize every parameter outside the decoder layers (embeddings, norms, LM head)."""
        prefixes = tuple(f"{n}." for n, _ in self.layers)
        owners = dict(self.model.named_modules())
        with torch.no_grad():
            for name, p in list(self.model.named_parameters()):
                if name.startswith(prefixes) or not p.is_meta:
                    continue
                t = torch.empty(p.shape, dtype=p.dtype, device=self.device)
                rows = p.shape[0] if p.dim() else 1
                self.fill(name, t, 0, rows, rows)
                if self.upcast and t.is_floating_point():
                    t = t.float()
                mod, _, leaf = name.rpartition(".")
                owners[mod]._parameters[leaf] = nn.Parameter(t, requires_grad=False)
            if getattr(self.model.config, "tie_word_embeddings", False):
                self.model.tie_weights()
            if self.upcast:
                for mod in owners.values():
                    for leaf, b in list(mod._buffers.items()):
                        if b is not None and b.is_floating_point() and not b.is_meta:
                            mod._buffers[leaf] = b.float()

    def enter(self, i: int, state: dict | None = None) -> nn.Module:
        """Layer ``i`` with real weights; its buffers from ``state`` (saved) or fresh (statistics zero,
        weight quantizers calibrated from the weights)."""
        name, layer = self.layers[i]
        keep = {n: b.detach().clone() for n, b in layer.named_buffers() if not b.is_meta}
        layer.to_empty(device=self.device)
        with torch.no_grad():
            for n, p in layer.named_parameters():
                rows = p.shape[0] if p.dim() else 1
                self.fill(f"{name}.{n}", p, 0, rows, rows)
            for n, b in keep.items():
                layer.get_buffer(n).copy_(b)
            if self.upcast:
                layer.float()
            if state is not None:
                for n, b in layer.named_buffers():
                    b.copy_(state[n])
                restore_weights(_scope(name, layer), layer, state)
        self.real.add(i)
        self.peak = max(self.peak, len(self.real))
        return layer

    def source_equal(self, i: int, rel: str, p: torch.Tensor) -> bool:
        """Whether parameter ``rel`` of layer ``i`` equals the source's (read again, a few rows at a time, in
        ``p``'s dtype)."""
        name = f"{self.layers[i][0]}.{rel}"
        p = p.detach()
        rows = p.shape[0] if p.dim() else 1
        for c in nvfp4.row_chunks(p) if p.dim() else [slice(None)]:
            start, stop, _ = c.indices(rows)
            t = torch.empty((stop - start, *p.shape[1:]) if p.dim() else (), dtype=self.dtypes[name], device=p.device)
            self.fill(name, t, start, stop, rows)
            if not torch.equal(t.to(p.dtype), p[start:stop] if p.dim() else p):
                return False
        return True

    def leave(self, i: int) -> None:
        name, layer = self.layers[i]
        clear_caches(layer)
        for m in layer.modules():
            if isinstance(m, InputQuantizer):
                m.hessian = None
        layer.to("meta")
        for n, p in layer.named_parameters():  # back to the loaded dtype: the next fill rounds as the first did
            if p.dtype != self.dtypes[f"{name}.{n}"]:
                p.data = p.data.to(self.dtypes[f"{name}.{n}"])
        self.real.discard(i)


class LayerwiseSource(TensorSource):
    """The export's tensors in layer-by-layer mode: each decoder layer materialized once more, with the
    quantizer state saved when it was calibrated; everything else as it is."""

    def __init__(self, model: nn.Module, materializer: LayerMaterializer, state: LayerState):
        super().__init__(model)
        self.model, self.m, self.state = model, materializer, state
        self.prefixes = [f"{n}." for n, _ in materializer.layers]
        self.current: int | None = None

    def tensor(self, name: str) -> torch.Tensor:
        i = next((k for k, p in enumerate(self.prefixes) if name.startswith(p)), None)
        if i is not None and i != self.current:
            self.close()
            self.m.enter(i, self.state.load(i))
            self.current = i
        try:
            return self.model.get_parameter(name).detach()
        except AttributeError:
            return self.model.get_buffer(name).detach()

    def close(self) -> None:
        if self.current is not None:
            self.m.leave(self.current)
            self.current = None


class LayerInputs:
    """Layer ``i``'s calibration inputs from the activation store: ``((hidden,), kwargs)`` per batch;
    ``target(b)``: the unquantized layer's output on the unquantized stream (``reference``, staged)."""

    def __init__(self, store: ActivationStore, i: int, reference: ActivationStore | None = None):
        self.store, self.i, self.reference = store, i, reference

    def __len__(self) -> int:
        return len(self.store)

    def batch(self, b: int) -> tuple[tuple, dict]:
        hidden, kwargs = self.store.get(b)
        return (hidden,), kwargs[self.i]

    def __iter__(self) -> Iterator[tuple[tuple, dict]]:
        for b in range(len(self.store)):
            yield self.batch(b)

    def target(self, b: int) -> torch.Tensor:
        if self.reference is None:
            raise RuntimeError("the layer's targets were not kept: the algorithm must declare needs.reference")
        return self.reference.staged_hidden(b)


class ReferenceInputs(LayerInputs):
    """Layer ``i``'s unquantized inputs: the reference stream's hidden states with the store's keyword inputs."""

    def batch(self, b: int) -> tuple[tuple, dict]:
        hidden, _ = self.reference.get(b)
        return (hidden,), self.store.get(b)[1][self.i]


@dataclass
class LayerwiseSchedule:
    """The layer-by-layer schedule of one run (see the module docstring)."""

    config: Layerwise
    fill: Fill
    fingerprint: dict
    algorithm: Algorithm
    held: bool = False  # the fill reads a model held in memory: it is made whole again at the end
    layers: list[dict] = field(default_factory=list)  # per-layer seconds, for the report
    store: ActivationStore | None = None
    reference: ActivationStore | None = None  # the unquantized stream (an algorithm that needs targets)
    materializer: LayerMaterializer | None = None
    state: LayerState | None = None
    holds_model = False  # on the meta device: kept out of the strategy's reach

    def context(self, model: nn.Module, ctx: RunContext) -> RunContext:
        """Set up on the run's device; the context's tensor source becomes the layer-by-layer one."""
        upcast = ctx.device.type == "cpu" and any(
            p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()
        )
        self.materializer = LayerMaterializer(model, self.fill, ctx.device, upcast)
        if not self.materializer.layers:
            raise UserError(f"calibration=layerwise: {type(model).__name__} has no decoder-layer list")
        self.state = LayerState(Path(self.config.state_dir), self.fingerprint, self.config.resume, ctx.rank0)
        self.materializer.outside()
        return dataclasses.replace(ctx, tensors=lambda m: LayerwiseSource(m, self.materializer, self.state))

    # -- 1. capture (the Trainer's pass) ---------------------------------------------------------------
    def start(self, model: nn.Module, ctx: RunContext) -> None:
        self._sink: dict = {}
        self._saved_forwards = record_layers(self.materializer.layers, self._sink)
        set_mode(model, "off")
        self._root = Path(self.config.state_dir) / f"activations_rank{ctx.rank}"

    @torch.no_grad()
    def observe(self, model: nn.Module, batch: dict, extra: dict, ctx: RunContext, n_batches: int) -> None:
        ids = batch["input_ids"].to(ctx.device)
        item = captured(model, ids, self._sink, len(self.materializer.layers), **extra)
        if self.store is None:
            estimate = nbytes(item[0]) * n_batches + nbytes(item[1]) * n_batches  # keyword inputs: an upper bound
            where = choose_offload(self.config.offload, estimate, ctx.device)
            log.info(
                "layerwise: %d batches of activations, about %.3f GiB: kept %s (calibration.offload=%s)",
                n_batches, estimate / 2**30, {"gpu": "on the device", "cpu": "in CPU memory", "disk": f"in {self._root}"}[where],
                self.config.offload,
            )  # fmt: skip
            self.store = ActivationStore(where, ctx.device, self._root)
            if self.algorithm.needs.reference:
                self.reference = ActivationStore(where, ctx.device, self._root / "reference")
        self.store.add(*item)
        if self.reference is not None:
            self.reference.add(item[0], [])

    # -- 2. layers -----------------------------------------------------------------------------------
    def finish(self, model: nn.Module, ctx: RunContext, results: Results, run_unit: RunUnit,
               batches: Callable[[], Iterable[dict]] | None = None, extra: dict | None = None) -> None:  # fmt: skip
        """Calibrate, run the steps on and persist every decoder layer in order."""
        restore(self.materializer.layers, self._saved_forwards)
        if self.store is None:
            raise UserError("calibration=layerwise: the data gave no calibration batch")
        n = len(self.materializer.layers)
        quantized = self.config.propagate == "quantized"
        fail_after = os.environ.get("NVFP4CAL_FAIL_AFTER_LAYER")  # fault injection for the resume tests
        quiet = dataclasses.replace(ctx, progress=False)  # one bar over layers, none per step and layer
        bar = tqdm(total=n, initial=self.state.done, desc=f"layers ({self.store.where})", unit="layer",
                   disable=not ctx.progress)  # fmt: skip
        for i in range(self.state.done):  # resumed: recompute the inputs of the first unfinished layer
            if self.reference is not None:  # the unquantized stream: the layer as read
                self._reference_pass(i)
                self.reference.commit()
            unit = self._unit(i, self.state.load(i))
            forward(unit, LayerInputs(self.store, i), "quant" if quantized else "off", self.store.set_hidden)
            self.materializer.leave(i)
        for record in self.state.results:
            self._merge(results, record, resumed=True)
        for i in range(self.state.done, n):
            t0 = time.perf_counter()
            unit = self._reference_pass(i) if self.reference is not None else self._unit(i)
            inputs = LayerInputs(self.store, i, self.reference)
            # unquantized propagation: the calibration pass's outputs are the next layer's inputs, kept
            # aside until this layer's steps (which may read its inputs) are done
            keep = None if quantized else self.store.stage_hidden
            part = calibrate_unit(unit, inputs, self.algorithm, quiet, run_unit, keep)
            if quantized:
                forward(unit, inputs, "quant", self.store.stage_hidden)
            self.store.commit()
            if self.reference is not None:
                self.reference.commit()
            record = {"layer": unit.name, "seconds": round(time.perf_counter() - t0, 3), **part.record()}
            changes = self._changes(unit, i) if self.algorithm.changes_weights else None
            self.state.save(i, unit.forward, record, changes)
            self._merge(results, record)
            self.materializer.leave(i)
            bar.set_postfix_str(f"{unit.name}: {record['seconds']:.1f} s")
            bar.update(1)
            if fail_after is not None and int(fail_after) == i:
                raise RuntimeError(f"NVFP4CAL_FAIL_AFTER_LAYER={fail_after}: stopping after layer {i} on purpose")
        bar.close()
        self.store.close()
        if self.reference is not None:
            self.reference.close()
        self.state.flush()

    def _unit(self, i: int, state: dict | None = None) -> Unit:
        name, _ = self.materializer.layers[i]
        layer = self.materializer.enter(i, state)
        return Unit(name, _scope(name, layer), layer, index=i, fresh=state is None)

    def _reference_pass(self, i: int) -> Unit:
        """Layer ``i`` as read, run on the unquantized stream with its quantizers off; the outputs are staged
        in the reference store (the layer's targets, then the next layer's unquantized inputs). Returns the
        fresh unit."""
        unit = self._unit(i)
        forward(unit, ReferenceInputs(self.store, i, self.reference), "off", self.reference.stage_hidden)
        return unit

    def _changes(self, unit: Unit, i: int) -> dict:
        clear_caches(unit.module)  # the propagation's fake-quant copies (34 GB for a Kimi-K2 layer): not needed now
        return changed_weights(unit.module, unit.forward, unit.name,
                               lambda rel, p: self.materializer.source_equal(i, rel, p))  # fmt: skip

    def _merge(self, results: Results, record: dict, resumed: bool = False) -> None:
        """One finished layer's results into the run's."""
        results.merge(Results.from_record(record))
        self.layers.append({"layer": record["layer"], "seconds": record["seconds"], "resumed": resumed})

    def evaluate(self, model: nn.Module, sets: dict, ctx: RunContext) -> dict[str, Comparison]:
        """Every evaluation set scored for the original and the quantized model, streamed one decoder layer
        at a time (:func:`nvfp4cal.schedule.streamed.evaluate_streamed`)."""
        return evaluate_streamed(model, self.materializer, self.state, sets, ctx)

    def report(self) -> dict:
        return {"layers": self.layers, "layers_materialized_at_once": self.materializer.peak}

    def abort(self) -> None:
        """After an error or a stop: the cached activations go; the progress stays for a resume."""
        if self.state is not None:
            try:
                self.state.flush()  # the layers finished so far are on disk before the run ends
            except Exception as err:  # noqa: BLE001 (the error that stopped the run is the one to report)
                log.warning("layerwise: saving the progress failed: %s", err)
        for store in (self.store, self.reference):
            if store is not None:
                store.close()

    def done(self) -> None:
        """After a successful export: a model held in memory is made whole again (every layer with its
        calibrated state and weights); the progress is no longer needed."""
        if self.held:
            for i in range(len(self.materializer.layers)):
                self.materializer.enter(i, self.state.load(i))
        self.state.remove()
