"""The post-calibration steps, in order, as plain objects: testable without Lightning.

After max calibration: ``bootstrap`` (dead experts) -> ``measure`` (weight SQNR under max) ->
``perplexity_max`` (held-out perplexity of the max-calibrated model) -> ``sweep`` (FP8-scale MSE or
Hessian sweep) -> ``measure_mse`` -> ``export`` -> ``evaluate`` (perplexity of the original and of
the quantized model). Which of them run follows from the recipe and the run context
(:func:`post_calibration`); the callback only runs them in order and times each under its name.
Every step writes into one :class:`Results`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .bootstrap import bootstrap_dead_experts, check_inputs_calibrated
from .comm import RunContext
from .evaluate import perplexity, weight_errors
from .export.targets import Export, early_writers, export_checkpoints
from .recipe import Algorithm
from .rounding import gptq_weights
from .sweep import mse_sweep

log = logging.getLogger("nvfp4cal")


@dataclass
class Results:
    """What the post-calibration steps found (the report's sections of the same names)."""

    stages: dict[str, dict] = field(default_factory=dict)  # step name -> seconds and memory peaks
    experts: list[dict] = field(default_factory=list)
    weights: dict[str, dict] = field(default_factory=dict)  # weight -> {"max": errors, "mse": errors}
    sweep: dict | None = None
    gptq: dict | None = None
    exports: list[dict] = field(default_factory=list)
    perplexity: dict[str, float] = field(default_factory=dict)
    sharding: dict | None = None  # trainer=fsdp: what each rank holds
    gpu_peak_gib_per_rank: list[float] | None = None  # several GPUs: each rank's highest stage peak

    def as_dict(self) -> dict:
        out = {"experts": self.experts, "weights": self.weights, "exports": self.exports}
        out["perplexity"] = self.perplexity
        for key in ("sweep", "gptq", "sharding", "gpu_peak_gib_per_rank"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class Step:
    """One post-calibration step: ``start`` when calibration begins, ``run`` after it, ``abort`` on an error."""

    name: str
    per_layer = False  # True: runs on one decoder layer at a time in a layer-by-layer run

    def start(self, model: nn.Module, ctx: RunContext) -> None:
        pass

    def run(self, model: nn.Module, ctx: RunContext, results: Results) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        pass


class Bootstrap(Step):
    name = "bootstrap"
    per_layer = True

    def run(self, model, ctx, results):
        check_inputs_calibrated(model)
        results.experts = [vars(d) for d in bootstrap_dead_experts(model)]


class Measure(Step):
    """Weight SQNR and relative MSE under the current block amaxes, kept under ``results.weights[n][key]``.

    ``keep``: leave the fake-quant weights cached for a quant-mode perplexity that follows.
    """

    per_layer = True

    def __init__(self, name: str, key: str, keep: bool):
        self.name, self.key, self.keep = name, key, keep

    def run(self, model, ctx, results):
        for n, e in weight_errors(model, ctx, keep=self.keep).items():
            results.weights.setdefault(n, {})[self.key] = e


class Perplexity(Step):
    """Held-out perplexity with the quantizers in each of ``modes`` (``results.perplexity[label]``)."""

    def __init__(self, name: str, batches: Callable, modes: dict[str, str]):
        self.name, self.batches, self.modes = name, batches, modes

    def run(self, model, ctx, results):
        for label, mode in self.modes.items():
            results.perplexity[label] = perplexity(model, self.batches(), mode)


class Sweep(Step):
    name = "sweep"
    per_layer = True

    def __init__(self, algorithm: Algorithm):
        self.algorithm = algorithm

    def run(self, model, ctx, results):
        results.sweep = mse_sweep(model, ctx, self.algorithm.kernel, hessian=self.algorithm.hessian)


class Gptq(Step):
    """GPTQ rounding of every NVFP4 weight under its full input Hessian (:mod:`nvfp4cal.rounding`)."""

    name = "gptq"
    per_layer = True

    def __init__(self, algorithm: Algorithm):
        self.algorithm = algorithm

    def run(self, model, ctx, results):
        results.gptq, per_weight = gptq_weights(model, ctx, self.algorithm)  # (layers: layerwise merges them)
        for n, e in per_weight.items():
            results.weights.setdefault(n, {})["gptq"] = e


class ExportStep(Step):
    """Writes every checkpoint of ``export``; on one GPU the fixed tensors are written during calibration."""

    name = "export"

    def __init__(self, export: Export, tokenizer=None, dtypes: dict[str, torch.dtype] | None = None):
        self.export, self.tokenizer, self.dtypes = export, tokenizer, dtypes
        self.writers: list = []

    def start(self, model, ctx):
        self.writers = early_writers(model, ctx, self.export, self.tokenizer, self.dtypes)

    def run(self, model, ctx, results):
        writers, self.writers = self.writers, []
        results.exports = export_checkpoints(model, ctx, self.export, self.tokenizer, self.dtypes, writers)

    def abort(self):
        for w in self.writers:  # leave no temporary export directory behind
            w.abort()
        self.writers = []


def post_calibration(
    ctx: RunContext,
    algorithm: Algorithm,
    export: Export,
    tokenizer=None,
    eval_batches: Callable | None = None,
    dtypes: dict[str, torch.dtype] | None = None,
) -> list[Step]:
    """The steps of this run, in order. Perplexity is measured on global rank 0 of a run that holds
    whole weights, when ``eval_batches`` (a callable giving the held-out batches) is given. In a
    layer-by-layer run the steps marked ``per_layer`` run once per decoder layer (:mod:`nvfp4cal.layerwise`)."""
    evaluate = eval_batches is not None and ctx.rank0 and not ctx.sharded
    if eval_batches is not None and ctx.sharded and ctx.rank0:
        log.info("trainer=fsdp: held-out perplexity is not measured (the weight SQNR is)")
    steps: list[Step] = [Bootstrap(), Measure("measure", "max", keep=evaluate)]
    if algorithm.sweep:
        if evaluate:
            steps.append(Perplexity("perplexity_max", eval_batches, {"max_calibrated": "quant"}))
        steps += [Sweep(algorithm), Measure("measure_mse", "mse", keep=evaluate)]
    if algorithm.gptq:
        steps.append(Gptq(algorithm))
    steps.append(ExportStep(export, tokenizer, dtypes))
    if evaluate:
        steps.append(Perplexity("evaluate", eval_batches, {"original": "off", "quantized": "quant"}))
    return steps
