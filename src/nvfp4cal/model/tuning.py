"""Layer-output tuning of one decoder layer: rounding offsets and block-scale factors for every NVFP4 weight,
learnt by signed gradient descent on the layer's output error (:mod:`nvfp4cal.numerics.tune`).

For layer ``l`` with quantized inputs ``x_q`` (its quantized predecessors' outputs) and targets
``y = layer_l(x)`` (the unquantized layer on unquantized inputs), minimise over ``(v, alpha)``::

    L(v, alpha) = mean_{t,c} w_c (layer_l^{W4A4}(x_q; v, alpha) - y)_{t,c}^2

with every input quantizer in the forward (gradients straight through the roundings); ``loss: mse``:
``w_c = 1``; ``loss: channel_relative``: ``w_c = 1 / mean_t(y_{t,c}^2)`` over the layer's
calibration tokens, so each hidden channel's error counts relative to that channel's size. In a residual
stream with a few massive channels - Gemma 3 270M's layers 1-11 hold 96-99% of the hidden state's energy in
8 of 640 channels, and 41-84% of max calibration's squared error - plain MSE spends the tuning on those few
channels, whose error the next layer's RMSNorm mostly divides away, we expect. With ``target: own``
(:class:`OwnTargets`), ``y = layer_l(x_q)``: the unquantized layer on the same quantized inputs, so the
loss holds only this layer's own error, not its predecessors'.

Each iteration takes ``k`` training batches (``step_batches``, counted over all ranks; by default the fewest
that hold ``step_tokens`` tokens, ``k = world * ceil(ceil(step_tokens / tokens_per_batch) / world)``, at most
every training batch of a rank) and sums their gradients: ``v <- clip(v - lr_t sign(dL/dv), -offset, offset)``,
``alpha <- clip(alpha - lr_t sign(dL/dalpha), 1 - scale, 1 + scale)``, ``lr_t = lr (1 - t / iterations)``.
Under data parallelism each rank takes ``k / world`` of its own batches and the gradients and losses are
summed across ranks (every rank takes the same step). A rank's batch ``i`` holds the rows of one process's
batches ``world * i .. world * i + world - 1`` (the distributed sampler deals rows out in turn), so with the
same ``k`` a ddp run steps on the rows one process steps on: the same tuning up to the order of fp32 sums.

The guard: the last ``validation`` share of the layer's batches is never trained on; the kept iterate is the
one with the lowest validation loss among the start and every ``eval_every``-th iterate, so it is never worse
than the start on validation (without a validation batch: on the training batches). The kept ``(v, alpha)``
become on-grid weights and block amaxes that the export packs into exactly the tuned forward's values; a
kept start changes nothing (byte-identical). Weights that ``only`` (an fnmatch pattern of weight names, as
in the recipe's rules, e.g. ``*.mlp.*``) leaves out keep their start. Experts whose input saw fewer than
``min_tokens`` rows keep the start and are listed.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..numerics.comm import RunContext
from ..numerics.errors import UserError
from ..numerics.tune import fixed_ratio, frozen, offset_fake_quantize, tuned_fake_quantize
from .experts import PartlyTuned
from .quantizers import QUANTIZER_TYPES, InputQuantizer, KVCastQuantizer, set_mode
from .view import weight_inputs, weight_quantizers


@dataclass
class Tunable:
    """One NVFP4 weight under tuning: its offsets ``v`` and block-scale factors ``alpha``."""

    name: str
    wq: object
    w: torch.Tensor
    v: torch.Tensor
    alpha: torch.Tensor
    frozen_experts: list[int]
    fixed: tuple[torch.Tensor, torch.Tensor] | None = None  # (w / step, step) while the block scales stay
    span: tuple[int, int] | None = None  # experts a .. b - 1 of a fused weight (grouped tuning); None: all of it

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.span is None else x[self.span[0] : self.span[1]]

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor | PartlyTuned:
        if self.fixed is not None:  # scale = 0: the same values without recomputing w / step each call
            part = offset_fake_quantize(*self.fixed, self.v, w.dtype)
        else:
            s2 = self.wq.scale_2_bcast(w.device)
            part = tuned_fake_quantize(self.rows(w), self.rows(self.wq.block_amax), self.rows(s2), self.v, self.alpha)
        return part if self.span is None else PartlyTuned(self.wq.quantized(w), part, self.span[0])

    @torch.no_grad()
    def freeze(self) -> None:
        """The kept ``(v, alpha)`` into on-grid weights and block amaxes (its experts only when grouped)."""
        s2 = self.rows(self.wq.scale_2_bcast(self.w.device))
        w_new, amax = frozen(self.rows(self.w), self.rows(self.wq.block_amax), s2, self.v, self.alpha)
        self.rows(self.w).copy_(w_new)
        self.rows(self.wq.block_amax).copy_(amax)
        self.wq.clear_cache()


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class _Tuning:
    """The unit in tuning mode for the duration of a ``with``: weights through their tunable fake quant,
    gradients through every quantizer, the unit's own parameters frozen."""

    def __init__(self, module: nn.Module, items: list[Tunable]):
        self.module, self.items = module, items

    def __enter__(self):
        self.grads = {p: p.requires_grad for p in self.module.parameters()}
        for p in self.grads:
            p.requires_grad_(False)
        for t in self.items:
            t.wq.tuned = t.fake_quant
        for m in self.module.modules():
            if isinstance(m, (InputQuantizer, KVCastQuantizer)):
                m.grad_through = True
        set_mode(self.module, "quant")
        return self

    def __exit__(self, *exc):
        set_mode(self.module, "off")
        for m in self.module.modules():
            if isinstance(m, (InputQuantizer, KVCastQuantizer)):
                m.grad_through = False
        for t in self.items:
            t.wq.tuned = None
            t.wq.clear_cache()
        for p, g in self.grads.items():
            p.requires_grad_(g)


class OwnTargets:
    """A unit's inputs whose target for each batch is the unquantized unit's output on the same inputs
    (computed once, quantizers off, before any weight changes)."""

    def __init__(self, module: nn.Module, forward: nn.Module, inputs):
        self.inputs = inputs
        modes = {m: m.mode for m in module.modules() if isinstance(m, QUANTIZER_TYPES)}
        set_mode(module, "off")
        try:
            with torch.no_grad():
                self.targets = [_output(forward(*a, **k)).detach() for a, k in inputs]
        finally:
            for m, mode in modes.items():
                m.mode = mode

    def __len__(self) -> int:
        return len(self.inputs)

    def __iter__(self):
        return iter(self.inputs)

    def batch(self, b: int):
        return self.inputs.batch(b)

    def target(self, b: int) -> torch.Tensor:
        return self.targets[b]


@torch.no_grad()
def channel_weights(inputs, ctx: RunContext) -> torch.Tensor:
    """``1 / mean_t(y_{t,c}^2)`` per hidden channel over every batch's targets (summed across ranks); a
    channel below 1e-6 of the mean channel's mean square is weighed as that floor."""
    sq, n = None, torch.zeros((), dtype=torch.float64, device=ctx.device)
    for b in range(len(inputs)):
        y = inputs.target(b).to(ctx.device).float()
        part = y.pow(2).reshape(-1, y.shape[-1]).sum(0, dtype=torch.float64)
        sq = part if sq is None else sq + part
        n += y.numel() // y.shape[-1]
    if ctx.world > 1:
        ctx.comm.sum_(sq), ctx.comm.sum_(n)
    ms = sq / n
    return (1.0 / ms.clamp_min(1e-6 * float(ms.mean()))).float()


def _split(n: int, share: float) -> tuple[list[int], list[int]]:
    """(training, validation) batch indices: the last ``round(n * share)`` batches validate (at least one
    when ``share > 0`` and ``n >= 2``; none with a single batch)."""
    n_val = 0 if n < 2 or share <= 0 else min(n - 1, max(1, round(n * share)))
    return list(range(n - n_val)), list(range(n - n_val, n))


def _batch_tokens(inputs) -> int:
    """Tokens in one batch: the leading dimensions of the unit's first tensor input (its hidden states)."""
    args, kwargs = inputs.batch(0)
    x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    if x is None or x.dim() < 2:
        raise UserError("layer-output tuning: the layer's first input is not a (batch, tokens, hidden) tensor")
    return x.shape[:-1].numel()


def _per_rank_batches(inputs, params, ctx: RunContext, n_train: int) -> int:
    """Batches each rank takes a step: ``step_batches / world`` (Tune.before checked the multiple), else the
    fewest batches holding ``step_tokens`` tokens over all ranks, at most ``n_train`` (the largest batch and
    the fewest training batches over the ranks decide, so that every rank takes the same count)."""
    if params.step_batches is not None:
        return params.step_batches // ctx.world
    facts = torch.tensor([float(_batch_tokens(inputs)), -float(n_train)], device=ctx.device)
    if ctx.world > 1:
        ctx.comm.max_(facts)
    tokens, n_train = int(facts[0].item()), -int(facts[1].item())
    k = -(-params.step_tokens // tokens)
    return max(1, min(-(-k // ctx.world), n_train))


# fp32 offsets, their gradient, the kept copy and w / step (block factors: 1/16 of that)
STATE_BYTES_PER_WEIGHT = 16
STATE_BYTES = STATE_BYTES_PER_WEIGHT * (1 + 1 / 16)


def expert_groups(weights: list[tuple[str, object, torch.Tensor]], group_gib: float) -> list[tuple[int, int] | None]:
    """The rounds a layer is tuned in: ``[None]`` (every weight at once) when the tuning state of its weights
    fits ``group_gib``, else spans ``(a, b)`` of the fused experts' index, as many experts a round as fit
    (at least one): the fused weights' experts a group at a time, the other weights in the first round."""
    fused = [w for _, _, w in weights if w.shape[:-2].numel() > 1]
    total = sum(w.numel() for _, _, w in weights) * STATE_BYTES
    if not fused or total <= group_gib * 2**30:
        return [None]
    n = fused[0].shape[:-2].numel()
    if any(w.shape[:-2].numel() != n for w in fused):
        raise UserError("layer-output tuning in expert groups: the layer's fused weights hold different expert counts")
    per_expert = sum(w.numel() for w in fused) / n * STATE_BYTES
    k = max(1, int(group_gib * 2**30 // per_expert))
    return [(a, min(a + k, n)) for a in range(0, n, k)]


def _check_memory(weights: list, span: tuple[int, int] | None, dev: torch.device, name: str) -> None:
    """One line, before anything is allocated, when the tuning state of a round cannot fit the device (a
    grouped round also keeps the start's fake quant of each whole fused weight)."""
    n = sum(w.numel() if span is None or w.dim() < 3 else w[span[0] : span[1]].numel() for _, _, w in weights)
    need = n * STATE_BYTES
    if span is not None:
        need += sum(w.numel() * w.element_size() for _, _, w in weights if w.dim() >= 3)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        if need > free:
            raise UserError(
                f"layer-output tuning of {name} needs {need / 2**30:.1f} GiB for its offsets, gradients and kept "
                f"copy ({n / 1e9:.2f} G weights) but the GPU has {free / 2**30:.1f} GiB free; lower "
                "recipe.algorithm.expert_group_gib, tune fewer weights (recipe.rules) or use recipe=nvfp4_gptq"
            )


def tune_layer(module: nn.Module, forward: nn.Module, inputs, params, ctx: RunContext, name: str = "the layer") -> dict:
    """Tune every NVFP4 weight of ``module`` (a decoder layer in its scope, quantizers calibrated) on
    ``inputs`` (``batch(b) -> (args, kwargs)``, ``target(b)``, ``len``); returns the layer's record. A layer
    whose tuning state exceeds ``expert_group_gib`` is tuned in rounds (:func:`expert_groups`): each round
    runs the full schedule on its experts, from the weights the earlier rounds kept."""
    weights = [x for x in weight_quantizers(module) if params.only is None or fnmatch.fnmatchcase(x[0], params.only)]
    rounds = expert_groups(weights, params.expert_group_gib)
    shown = tqdm(
        rounds, desc=f"tune {name} (expert groups)", unit="group", disable=len(rounds) == 1 or not ctx.progress
    )

    @functools.cache
    def step_plan(n_train: int) -> tuple[int, torch.Tensor | None]:
        """(batches a rank takes a step, the channel weights of ``loss: channel_relative``): the same in every
        round (each takes a collective or a pass over the targets), so computed once, by the first round."""
        cw = channel_weights(inputs, ctx) if params.loss == "channel_relative" else None
        return _per_rank_batches(inputs, params, ctx, n_train), cw

    records = [_tune_round(module, forward, inputs, params, ctx, name, weights, span, first=i == 0, plan=step_plan)
               for i, span in enumerate(shown)]  # fmt: skip
    if len(records) == 1:
        return records[0]
    first, last = records[0], records[-1]
    return {**last, "weights": first["weights"], "kept_start": [k for r in records for k in r["kept_start"]],
            "kept_iteration": max(r["kept_iteration"] for r in records),
            "train_loss": None if first["train_loss"] is None else [first["train_loss"][0], last["train_loss"][1]],
            "validation_loss": None if first["validation_loss"] is None
            else [first["validation_loss"][0], last["validation_loss"][1]],
            "expert_groups": [{"experts": list(span), "kept_iteration": r["kept_iteration"],
                               "validation_loss": r["validation_loss"]} for span, r in zip(rounds, records, strict=True)]}  # fmt: skip


def _tune_round(module, forward, inputs, params, ctx: RunContext, name: str, weights: list,
                span: tuple[int, int] | None, first: bool, plan: Callable) -> dict:  # fmt: skip
    """One round of :func:`tune_layer`: the weights ``weights`` (a fused weight's experts ``span`` only, and
    the other weights only in the ``first`` round); ``plan(n_train)``: the rounds' shared step facts."""
    dev = ctx.device
    seen = weight_inputs(module)
    _check_memory(weights, span, dev, name)
    items = []
    tuned_scales = params.scale > 0  # else the block scales stay: w / step once per weight (fixed_ratio)
    for wname, wq, w in weights:
        lead = w.shape[:-2]
        grouped = span is not None and lead.numel() > 1
        if span is not None and not grouped and not first:
            continue  # a Linear of a grouped layer: tuned in the first round
        a, b = span if grouped else (0, lead.numel())
        counts = seen[wname].seen.reshape(-1).tolist() if wname in seen else []  # one host sync per weight
        low = [e - a for e, c in enumerate(counts) if c < params.min_tokens and a <= e < b]
        if lead.numel() == 1 and low:
            continue  # a Linear that saw too few rows: keeps its start
        part, blk = (w[a:b], wq.block_amax[a:b]) if grouped else (w, wq.block_amax)
        s2 = wq.scale_2_bcast(w.device)
        v = torch.zeros(part.shape, dtype=torch.float32, device=w.device, requires_grad=True)
        alpha = torch.ones(blk.shape, dtype=torch.float32, device=w.device, requires_grad=tuned_scales)
        fixed = None if tuned_scales else fixed_ratio(part, blk, s2[a:b] if grouped else s2)
        items.append(
            Tunable(wname, wq, w, v, alpha, low if lead.numel() > 1 else [], fixed, (a, b) if grouped else None)
        )
    train, val = _split(len(inputs), params.validation)
    record = {"weights": len(items), "train_batches": len(train), "validation_batches": len(val),
              "train_loss_batches": min(len(train), max(1, len(val))),
              "kept_start": [f"{t.name}[{e + (t.span[0] if t.span else 0)}]" for t in items for e in t.frozen_experts]}  # fmt: skip
    if not items or params.iterations == 0 or not train:
        return {**record, "iterations": 0, "kept_iteration": 0, "train_loss": None, "validation_loss": None}
    select = val or train
    probe = train[: max(1, len(val))]  # the training loss is measured on as many training batches as validate
    lr = params.lr if params.lr is not None else 1.0 / params.iterations
    per_rank, cw = plan(len(train))

    def loss(b: int) -> torch.Tensor:
        args, kwargs = inputs.batch(b)
        y = _output(forward(*args, **kwargs)).float()
        ref = inputs.target(b).to(y.device).float()
        err = (y - ref).pow(2)
        return (err * cw).mean() if cw is not None else err.mean()

    @torch.no_grad()
    def mean_loss(batches: list[int]) -> float:
        total = torch.zeros((), dtype=torch.float64, device=dev)
        for b in batches:
            total += loss(b).double()
        n = torch.tensor(float(len(batches)), dtype=torch.float64, device=dev)
        if ctx.world > 1:
            ctx.comm.sum_(total), ctx.comm.sum_(n)
        return float(total / n)

    tensors = [x for t in items for x in (t.v, t.alpha)]
    with _Tuning(module, items):
        start_train, start_sel = mean_loss(probe), mean_loss(select)
        best, best_at, best_state = start_sel, 0, None
        for it in range(params.iterations):
            with torch.enable_grad():
                for j in range(per_rank):
                    loss(train[(it * per_rank + j) % len(train)]).backward()
            with torch.no_grad():
                step = lr * (1.0 - it / params.iterations)
                for t in items:
                    for x, bound in ((t.v, params.offset), (t.alpha, params.scale)):
                        g = x.grad
                        if g is None:  # not reached by this batch's forward (the same on every rank)
                            continue
                        if ctx.world > 1:
                            ctx.comm.sum_(g)
                        x.sub_(step * torch.sign(g))
                        centre = 0.0 if x is t.v else 1.0
                        x.clamp_(centre - bound, centre + bound)
                        x.grad = None
                    for e in t.frozen_experts:  # too few rows: the start
                        t.v[e].zero_(), t.alpha[e].fill_(1.0)
            if (it + 1) % params.eval_every == 0 or it + 1 == params.iterations:
                cur = mean_loss(select)
                if cur < best:
                    best, best_at = cur, it + 1
                    best_state = [x.detach().clone() for x in tensors]
        if best_state is not None:
            with torch.no_grad():
                for x, kept in zip(tensors, best_state, strict=True):
                    x.copy_(kept)
            kept_train = mean_loss(probe)
        else:
            kept_train = start_train
    if best_state is not None:  # the kept iterate becomes on-grid weights and block amaxes
        for t in items:
            t.freeze()
    return {**record, "iterations": params.iterations, "kept_iteration": best_at, "step_batches": per_rank * ctx.world,
            "train_loss": [start_train, kept_train], "validation_loss": [start_sel, best] if val else None}  # fmt: skip
