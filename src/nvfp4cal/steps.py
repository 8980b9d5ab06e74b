"""The post-calibration steps, in order, as plain objects: testable without Lightning.

Per unit (the whole model, or each decoder layer): ``bootstrap`` (dead experts) -> ``measure`` (weight
SQNR under max) -> ``perplexity_max`` (held-out perplexity of the max-calibrated model; whole-model runs
of an algorithm that refines max) -> the algorithm's ``after`` hook (its own stages: ``sweep``,
``measure_mse``, ``gptq``, ...). Once per run: ``export`` -> ``evaluate`` (perplexity of the original and
of the quantized model). :func:`post_calibration` lists them for a run; the callback runs and times them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .algorithms import Algorithm, Unit, UnitInputs, UnitRun
from .checkpoint.targets import Export, early_writers, export_checkpoints
from .evaluation.compare import compare
from .evaluation.metrics import perplexity_of, token_nll
from .evaluation.sets import CORPUS
from .model.bootstrap import bootstrap_dead_experts, check_inputs_calibrated
from .numerics.comm import RunContext

log = logging.getLogger("nvfp4cal")


class Step:
    """One step: ``start`` when calibration begins, ``run`` after it (per unit or once), ``abort`` on an error.
    A step that times its own parts (the algorithm's) sets ``timed = False``."""

    name: str
    timed = True

    def start(self, model, ctx: RunContext) -> None:
        pass

    def run(self, unit: Unit, inputs: UnitInputs | None, run: UnitRun) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        pass


class Bootstrap(Step):
    name = "bootstrap"

    def run(self, unit, inputs, run):
        check_inputs_calibrated(unit.module)
        run.results.experts = [vars(d) for d in bootstrap_dead_experts(unit.module)]


class Measure(Step):
    """Weight SQNR and relative MSE under the current block amaxes, kept under ``results.weights[n][key]``."""

    timed = False  # run.measure times it

    def __init__(self, name: str, key: str):
        self.name, self.key = name, key

    def run(self, unit, inputs, run):
        run.measure(self.name, self.key, unit)


EvalSets = dict  # set name -> a callable giving its batches ({"input_ids": [b, t]})


class MaxPerplexity(Step):
    """Each token's loss under the max-calibrated model on every evaluation set (``results.max_token_nll[set]``:
    its perplexity and the paired comparison), before the algorithm changes anything."""

    name = "perplexity_max"

    def __init__(self, sets: EvalSets):
        self.sets = sets

    def run(self, unit, inputs, run):
        for name, batches in self.sets.items():
            run.results.max_token_nll[name] = token_nll(unit.module, batches(), "quant")


class Evaluate(Step):
    """The quantized model against the original on every evaluation set (:mod:`nvfp4cal.evaluation.compare`):
    on the whole model, or through the schedule (``streamed(model, sets, ctx)``: layer by layer)."""

    name = "evaluate"

    def __init__(self, sets: EvalSets, streamed: Callable | None = None):
        self.sets, self.streamed = sets, streamed

    def run(self, unit, inputs, run):
        if self.streamed is not None:
            found = self.streamed(unit.module, self.sets, run.ctx)
        else:
            found = {name: compare(unit.module, batches()) for name, batches in self.sets.items()}
        ev = {}
        for n, c in found.items():
            max_nll = run.results.max_token_nll.get(n)
            ev[n] = c.result(None if max_nll is None else perplexity_of(max_nll), max_nll)
        run.results.evaluation = ev
        if CORPUS in ev:  # the report's top-line perplexities: the corpus's held-out rows
            run.results.perplexity.update(ev[CORPUS]["perplexity"])


class AlgorithmStep(Step):
    """The algorithm's ``after`` hook on the calibrated unit, with the unit's calibration inputs."""

    timed = False

    def __init__(self, algorithm: Algorithm):
        self.algorithm, self.name = algorithm, algorithm.method

    def run(self, unit, inputs, run):
        self.algorithm.after(unit, inputs, run)


class ExportStep(Step):
    """Writes every checkpoint of ``export``; on one GPU the fixed tensors are written during calibration."""

    name = "export"

    def __init__(self, export: Export, tokenizer=None, dtypes: dict[str, torch.dtype] | None = None,
                 source_format: dict | None = None):  # fmt: skip
        self.export, self.tokenizer, self.dtypes, self.source_format = export, tokenizer, dtypes, source_format
        self.writers: list = []

    def start(self, model, ctx):
        self.writers = early_writers(model, ctx, self.export, self.tokenizer, self.dtypes, self.source_format)

    def run(self, unit, inputs, run):
        writers, self.writers = self.writers, []
        run.results.exports = export_checkpoints(unit.module, run.ctx, self.export, self.tokenizer, self.dtypes,
                                                 writers, self.source_format)  # fmt: skip

    def abort(self):
        for w in self.writers:  # leave no temporary export directory behind
            w.abort()
        self.writers = []


@dataclass
class StepPlan:
    """The steps of one run: ``per_unit`` after each unit's calibration, ``once`` after all of them;
    ``keep``: the measurements leave fake-quant weights cached for a quant-mode perplexity."""

    per_unit: list[Step]
    once: list[Step]
    keep: bool = False

    def all(self) -> list[Step]:
        return [*self.per_unit, *self.once]


def post_calibration(
    ctx: RunContext,
    algorithm: Algorithm,
    export: Export,
    tokenizer=None,
    eval_sets: EvalSets | None = None,
    dtypes: dict[str, torch.dtype] | None = None,
    source_format: dict | None = None,
    streamed: Callable | None = None,
) -> StepPlan:
    """The steps of this run, in order. The evaluation sets (``eval_sets``: name -> a callable giving its
    batches) are scored on global rank 0 of a run that holds whole weights; ``streamed``: the schedule
    scores them (layer by layer, after the export; the max-calibrated model is not kept there)."""
    evaluate = bool(eval_sets) and ctx.rank0 and (streamed is not None or not ctx.sharded)
    if eval_sets and ctx.sharded and ctx.rank0:
        log.info("trainer=fsdp: the evaluation sets are not scored (the weight SQNR is)")
    per_unit: list[Step] = [Bootstrap(), Measure("measure", "max")]
    if algorithm.refines and evaluate and streamed is None:
        per_unit.append(MaxPerplexity(eval_sets))
    per_unit.append(AlgorithmStep(algorithm))
    once: list[Step] = [ExportStep(export, tokenizer, dtypes, source_format)]
    if evaluate:
        once.append(Evaluate(eval_sets, streamed))
    return StepPlan(per_unit, once, keep=evaluate and streamed is None)
