"""``method: tune`` - layer-output tuning: start from the best scales we have (``start``: max, the FP8 sweep,
the Hessian-weighted sweep, or GPTQ's codes on Hessian-swept scales), then learn per-weight rounding offsets
(and per-block scale factors with ``scale > 0``: off by default, they fit the calibration text) on each
decoder layer's output error, W4A4 in the loop, guarded by held-out batches (:mod:`nvfp4cal.model.tuning`,
:mod:`nvfp4cal.numerics.tune`). Layer by layer on quantized inputs, against the unquantized layer's
outputs on unquantized inputs (``target: reference``, which ``needs.reference``) or on the same quantized
inputs (``target: own``: the layer's own error only). It changes the weights (to the tuned grid points) and
the block amaxes, which the layer state keeps."""

from __future__ import annotations

from dataclasses import dataclass

from ..model.sweep import KERNELS
from ..model.tuning import OwnTargets, tune_layer
from ..numerics.comm import RunContext
from ..results import TuneSummary
from .base import Algorithm, AlgorithmError, Needs, Unit, UnitInputs, UnitRun, check_headroom
from .fp8_sweep import sweep_scales
from .gptq import gptq_stage

STARTS = ("max", "mse", "hessian_mse", "gptq")
TARGETS = ("reference", "own")
LOSSES = ("mse", "channel_relative")


@dataclass(frozen=True)
class TuneParams:
    start: str = "hessian_mse"
    iterations: int = 50
    lr: float | None = None  # None: 1 / iterations
    offset: float = 0.5  # |v| bound, in E2M1 units of the block's step
    scale: float = 0.0  # block-scale factors within [1 - scale, 1 + scale]; 0: the start's scales (measured best)
    validation: float = 0.125  # share of each layer's batches held out to choose the kept iterate
    eval_every: int = 10
    min_tokens: int = 16  # experts (or Linears) whose input saw fewer rows keep their start
    kernel: str = "auto"  # the start's sweep kernel
    headroom: float = 1.0  # per-tensor scale headroom (base.apply_headroom)
    dampening: float = 0.01  # start=gptq
    block_columns: int = 128
    act_order: bool = True
    target: str = "reference"  # reference: the unquantized layer on unquantized inputs; own: on the same inputs
    only: str | None = None  # fnmatch pattern of the weights to tune ("*.mlp.*"); the others keep the start
    loss: str = "mse"  # mse | channel_relative (each hidden channel's error over its mean square)
    # calibration batches (of data.batch_size rows, counted over all ranks) whose gradients make one step;
    # null: as many as hold step_tokens tokens. A multiple of the ranks: ddp then takes one process's steps.
    step_batches: int | None = None
    # null step_batches: each step sums the gradients of the fewest batches holding this many tokens (rounded
    # up to a multiple of the ranks, at most every training batch), so a step's gradient sign rests on the
    # same amount of text whatever data.batch_size and data.seq_len are (measured: 1024-token steps fit 64 x 256
    # calibration tokens and lose Gemma 3's code to GPTQ; 2048-token steps do not)
    step_tokens: int = 2048
    # a layer whose tuning state (16 B a weight) exceeds this is tuned in rounds, a group of experts at a time
    # (each round the full schedule; the others on the weights the earlier rounds kept): Kimi-K2's 384 experts
    # of 7168 x 2048 need ~270 GiB at once, ~0.7 GiB an expert
    expert_group_gib: float = 16.0

    def __post_init__(self):
        check_headroom(self.headroom)
        if self.target not in TARGETS:
            raise AlgorithmError(f"recipe.algorithm.target={self.target!r} unknown; valid: {list(TARGETS)}")
        if self.loss not in LOSSES:
            raise AlgorithmError(f"recipe.algorithm.loss={self.loss!r} unknown; valid: {list(LOSSES)}")
        if self.start not in STARTS:
            raise AlgorithmError(f"recipe.algorithm.start={self.start!r} unknown; valid: {list(STARTS)}")
        if self.kernel not in KERNELS:
            raise AlgorithmError(f"recipe.algorithm.kernel={self.kernel!r} unknown; valid: {list(KERNELS)}")
        if self.iterations < 0 or self.eval_every < 1 or self.min_tokens < 1:
            raise AlgorithmError("recipe.algorithm: iterations must be >= 0, eval_every and min_tokens >= 1")
        if self.lr is not None and not self.lr > 0:
            raise AlgorithmError(f"recipe.algorithm.lr must be > 0 (or null: 1 / iterations), got {self.lr}")
        if not (0 <= self.offset <= 1) or not (0 <= self.scale < 1) or not (0 <= self.validation < 1):
            raise AlgorithmError("recipe.algorithm: offset in [0, 1], scale and validation in [0, 1)")
        if not self.expert_group_gib > 0:
            raise AlgorithmError(f"recipe.algorithm.expert_group_gib must be > 0, got {self.expert_group_gib}")
        if self.step_tokens < 1:
            raise AlgorithmError(f"recipe.algorithm.step_tokens must be >= 1, got {self.step_tokens}")
        if self.step_batches is not None and self.step_batches < 1:
            raise AlgorithmError(f"recipe.algorithm.step_batches must be >= 1 (or null), got {self.step_batches}")
        if not (0 < self.dampening < 1) or self.block_columns < 1:
            raise AlgorithmError("recipe.algorithm: dampening must be in (0, 1), block_columns >= 1")


class Tune(Algorithm):
    method = "tune"
    Params = TuneParams
    refines = True
    changes_weights = True

    @property
    def needs(self) -> Needs:  # the unquantized stream only where the targets come from it
        return Needs(
            layerwise=True, propagate="quantized", whole_weights=True, reference=self.params.target == "reference"
        )

    @property
    def kernel(self) -> str | None:
        return self.params.kernel if self.params.start != "max" else None

    @property
    def hessian(self) -> str | None:
        return {"max": None, "mse": None, "hessian_mse": "block", "gptq": "full"}[self.params.start]

    def before(self, unit: Unit, ctx: RunContext) -> None:
        k = self.params.step_batches
        if k is not None and k % ctx.world:
            raise AlgorithmError(
                f"recipe.algorithm.step_batches={k} is not a multiple of the {ctx.world} ranks (each rank takes "
                "an equal share of a step's batches)"
            )
        super().before(unit, ctx)

    def after(self, unit: Unit, inputs: UnitInputs, run: UnitRun) -> None:
        p = self.params
        if p.target == "own":  # before a GPTQ start replaces the weights
            inputs = OwnTargets(unit.module, unit.forward, inputs)
        if p.start != "max":
            sweep_scales(unit, run, p.kernel, hessian=p.start in ("hessian_mse", "gptq"))
        if p.start == "gptq":
            gptq_stage(unit, run, p)
        with run.stage("tune"):
            record = tune_layer(unit.module, unit.forward, inputs, p, run.ctx, unit.name)
        run.results.add("tune", TuneSummary.of_layer(unit.name, record))
        run.measure("measure_tune", "tune", unit)
