"""Fused-experts modules: calibration forward and token counts (the dead-expert bootstrap: bootstrap.py).

transformers 5.x stores a layer's experts fused as 3-D parameters,
``gate_up_proj`` [E, 2I, H] (gate rows first, then up rows) and ``down_proj`` [E, H, I].
:class:`QuantExpertsMixin` is swapped into such a module's class. Its forward sees each expert's
input to gate_up and to down, counts its tokens, and in ``quant`` mode runs it W4A4, in one of two
ways (``grouped``):

* ``eager``: the per-expert loop (the same math as transformers' ``eager`` implementation);
* ``grouped``: the (token, expert) pairs sorted by expert and both projections run as one
  ``torch._grouped_mm`` each; per-expert input amaxes are a ``scatter_reduce(amax)`` of per-row
  amaxes by expert id, token counts a ``bincount`` - no Python loop over experts, no host sync.
  The K contributions of a token are summed in a fixed order (deterministic, no atomics).

``auto`` (the default) is ``grouped`` for bf16 weights on CUDA, else ``eager``.

Input amaxes are recorded per expert; engines consume one input scale per layer and projection,
the max over the layer's experts (``InputQuantizer.shared_amax``), and so does ``quant`` mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..numerics.errors import UserError
from .quantizers import InputQuantizer, WeightQuantizer


class UnsupportedExpertsError(UserError):
    pass


def is_fused_experts(module: nn.Module) -> bool:
    """A module holding 3-D expert parameters (the transformers 5.x fused layout or another); not a conv."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return False
    return any(p.dim() == 3 for p in module.parameters(recurse=False))


def first_proj_name(module: nn.Module) -> str:
    """The first projection: ``gate_up_proj`` (gated experts) or ``up_proj`` (``has_gate=False``)."""
    return "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"


def logical(p: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The [E, out, in] view of an expert weight stored [E, out, in] or, transposed, [E, in, out]."""
    return p.transpose(-1, -2) if transposed else p


class PartlyTuned:
    """A fused experts weight [E, ...] while layer-output tuning takes its experts in groups: experts
    ``a .. a + len(part) - 1`` come from ``part`` (differentiable), the others from ``base`` (the start's fake
    quant, no gradient), so that no gradient of the whole weight's size is ever formed."""

    def __init__(self, base: torch.Tensor, part: torch.Tensor, a: int):
        self.base, self.part, self.a, self.b = base, part, a, a + part.shape[0]
        self._rows: tuple[torch.Tensor, ...] | None = None

    def transpose(self, d0: int, d1: int) -> PartlyTuned:
        return PartlyTuned(self.base.transpose(d0, d1), self.part.transpose(d0, d1), self.a)

    def __getitem__(self, e: int) -> torch.Tensor:
        if self.a <= e < self.b:
            if self._rows is None:  # one unbind: its backward stacks the experts' gradients once
                self._rows = self.part.unbind(0)
            return self._rows[e - self.a]
        return self.base[e]


def _span(*ws) -> tuple[int, int] | None:
    return next(((w.a, w.b) for w in ws if isinstance(w, PartlyTuned)), None)


def _whole(w):
    return w.base if isinstance(w, PartlyTuned) else w


def _part(w, a: int, b: int):
    return w.part if isinstance(w, PartlyTuned) else (None if w is None else w[a:b])


def check_layout(name: str, module: nn.Module) -> None:
    """Accept the layouts transformers' experts decorator describes; name anything else.

    ``gate_up_proj`` [E, 2I, H] (gate rows then up rows, or interleaved with ``is_concatenated=False``)
    or ``up_proj`` [E, I, H] without a gate, ``down_proj`` [E, H, I]; each transposed
    ([E, in, out]) with ``is_transposed``; optional ``*_bias`` [E, out] and ``post_expert_norm``.
    """
    first = getattr(module, first_proj_name(module), None)
    dn = getattr(module, "down_proj", None)
    tr = bool(getattr(module, "is_transposed", False))
    ok = isinstance(first, nn.Parameter) and isinstance(dn, nn.Parameter) and first.dim() == 3 and dn.dim() == 3
    if ok:
        (e1, o1, i1), (e2, o2, i2) = logical(first, tr).shape, logical(dn, tr).shape
        inter = o1 // 2 if getattr(module, "has_gate", True) else o1
        ok = e1 == e2 and i1 == o2 and i2 == inter and callable(getattr(module, "act_fn", None) or module._apply_gate)
    extra = [
        n
        for n, p in module.named_parameters(recurse=False)
        if p.dim() == 3 and n not in (first_proj_name(module), "down_proj")
    ]
    if not ok or extra:
        raise UnsupportedExpertsError(
            f"{name}: fused-experts class {type(module).__name__} has a layout nvfp4cal does not know "
            "(expected gate_up_proj [E, 2I, H] or up_proj [E, I, H] and down_proj [E, H, I], transposed or not); "
            "exclude it with a recipe rule {pattern: '" + name + ".*', enable: false} or report the model"
        )


class QuantExpertsMixin:
    """Mixed into a fused-experts class: per-expert calibration and W4A4 forward.

    ``gate_up_*`` quantizers belong to the first projection (``gate_up_proj``, or ``up_proj`` for
    experts without a gate), ``down_*`` to ``down_proj``. Weight quantizers see the logical
    [E, out, in] view, so NVFP4 blocks always run along each expert's input dim.
    """

    STATISTICS = {"tokens": "sum"}  # routed tokens per expert, summed across ranks
    gate_up_input: InputQuantizer
    down_input: InputQuantizer
    gate_up_weight: WeightQuantizer | None
    down_weight: WeightQuantizer | None

    def init_quant(self, gate_up_on: bool, down_on: bool, weights: bool = True) -> None:
        self.first_proj = first_proj_name(self)
        self.transposed = bool(getattr(self, "is_transposed", False))
        first = getattr(self, self.first_proj)
        n, dev = first.shape[0], first.device
        self.gate_up_input = InputQuantizer(n).to(dev)
        self.down_input = InputQuantizer(n).to(dev)
        self.register_buffer("tokens", torch.zeros(n, dtype=torch.int64, device=dev))
        self.gate_up_weight = self.down_weight = None
        self.inputs_on = (gate_up_on, down_on)
        for on, attr, pname in ((gate_up_on, "gate_up_weight", self.first_proj), (down_on, "down_weight", "down_proj")):
            if on and weights:
                w = self.logical_weight(pname)
                wq = WeightQuantizer(w.shape).to(dev)
                wq.calibrate(w)
                setattr(self, attr, wq)

    def logical_weight(self, pname: str) -> torch.Tensor:
        return logical(getattr(self, pname), self.transposed)

    @property
    def quant_on(self) -> bool:
        return any(self.inputs_on)

    def _input(self, q: InputQuantizer, x: torch.Tensor, e: int, on: bool) -> torch.Tensor:
        if q.mode == "calib":
            q.observe(x, e)
            return x
        if q.mode == "quant" and on and q.kind == "nvfp4":  # kind "none": weight-only, inputs as they are
            return q.fake_quant(x)
        return x

    def _weight(self, pname: str, wq: WeightQuantizer | None) -> torch.Tensor:
        """Stored layout of the weight to compute with: the parameter, or its fake-quant."""
        if wq is None or wq.mode != "quant":
            return getattr(self, pname)
        return logical(wq(self.logical_weight(pname)), self.transposed)

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """The same ops as transformers' eager experts: ``x @ w + b`` when transposed, else ``F.linear``."""
        if self.transposed:
            y = x @ w
            return y if b is None else y + b
        return F.linear(x, w, b)

    def use_grouped(self, hidden_states: torch.Tensor) -> bool:
        mode = getattr(self, "grouped", "auto")
        if mode == "auto":
            w = getattr(self, self.first_proj)
            return hidden_states.is_cuda and w.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
        return mode == "grouped"

    @torch.no_grad()
    def _routed(self, top_k_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(expert of each (token, slot) pair, flattened, with 0 for ids outside [0, E) - other ranks'
        experts under expert parallelism -, which pairs are valid, tokens per expert [E]); in ``calib``
        mode the counts are added to ``tokens``. No host synchronisation."""
        n = self.tokens.numel()
        flat = top_k_index.reshape(-1)
        valid = (flat >= 0) & (flat < n)
        expert_of = torch.where(valid, flat, 0)
        counts = torch.zeros(n, dtype=torch.int64, device=flat.device).scatter_add_(0, expert_of, valid.long())
        if self.gate_up_input.mode == "calib":
            self.tokens += counts.to(self.tokens.device)
        return expert_of, valid, counts

    def forward(self, hidden_states, top_k_index, top_k_weights):  # noqa: D102 (transformers' signature)
        if self.use_grouped(hidden_states):
            return self.forward_grouped(hidden_states, top_k_index, top_k_weights)
        return self.forward_eager(hidden_states, top_k_index, top_k_weights)

    def _grouped_input(self, q: InputQuantizer, x: torch.Tensor, expert: torch.Tensor, keep: torch.Tensor, on: bool):
        """Rows of ``x`` belong to experts ``expert`` (sorted; rows with ``keep`` False are not observed):
        per-expert amax in one scatter."""
        if q.mode == "calib":
            row = x.detach().abs().amax(-1).float() * keep
            q.amax.scatter_reduce_(0, expert, row, "amax")
            q.seen.index_add_(0, expert, keep.long())
            if q.hessian is not None:  # per expert: its routed rows, contiguous (sorted by expert)
                rows = x.float() * keep[:, None]  # rows of other ranks' experts add nothing
                counts = torch.bincount(expert, minlength=q.hessian.shape[0]).tolist()  # one host sync
                for e, seg in enumerate(torch.split(rows, counts)):
                    if seg.shape[0]:
                        q.add_hessian(e, seg)
            return x
        if q.mode == "quant" and on and q.kind == "nvfp4":  # kind "none": weight-only, inputs as they are
            return q.fake_quant(x)
        return x

    def forward_grouped(self, hidden_states, top_k_index, top_k_weights):
        """All experts in two ``torch._grouped_mm`` calls (see the module docstring)."""
        t, k = top_k_index.shape
        expert_of, valid, counts = self._routed(top_k_index)
        route = torch.where(valid, top_k_weights.reshape(-1), 0)
        n = counts.numel()
        order = torch.argsort(expert_of, stable=True)
        expert = expert_of[order]
        offs = torch.bincount(expert, minlength=n).cumsum(0).to(torch.int32)
        tok, keep = order // k, valid[order]
        x = self._grouped_input(self.gate_up_input, hidden_states[tok], expert, keep, self.inputs_on[0])
        w1, w2 = self._weight(self.first_proj, self.gate_up_weight), self._weight("down_proj", self.down_weight)
        b1, b2 = getattr(self, f"{self.first_proj}_bias", None), getattr(self, "down_proj_bias", None)
        span = _span(w1, w2)
        if span is None:
            y = self._grouped_rows(x, expert, keep, offs, w1, w2, b1, b2)
        else:  # grouped tuning: every row on the start's weights, then the group's rows again, differentiable
            with torch.no_grad():
                y = self._grouped_rows(x, expert, keep, offs, _whole(w1), _whole(w2), b1, b2)
            a, b = span
            r0, r1 = torch.cat([offs.new_zeros(1), offs])[[a, b]].tolist()  # the group's rows (one host sync)
            if r1 > r0:
                part = self._grouped_rows(x[r0:r1], expert[r0:r1] - a, keep[r0:r1], offs[a:b] - r0,
                                          _part(w1, a, b), _part(w2, a, b), _part(b1, a, b), _part(b2, a, b))  # fmt: skip
                y = torch.cat([y[:r0], part, y[r1:]])
        y = y * route[order, None].to(y.dtype)
        unsorted = torch.empty_like(y)
        unsorted[order] = y
        return unsorted.view(t, k, -1).sum(1).to(hidden_states.dtype)

    def _grouped_rows(self, x, expert, keep, offs, w1, w2, b1, b2):
        """Rows ``x`` sorted by ``expert`` (ends ``offs``) through both projections of their experts."""
        # grouped_mm wants [E, in, out]: the stored layout when transposed, else a transposed view
        h = torch._grouped_mm(x, w1 if self.transposed else w1.transpose(-1, -2), offs=offs)
        h = h if b1 is None else h + b1[expert]
        h = self._apply_gate(h) if getattr(self, "has_gate", True) else self.act_fn(h)
        h = self._grouped_input(self.down_input, h, expert, keep, self.inputs_on[1])
        y = torch._grouped_mm(h, w2 if self.transposed else w2.transpose(-1, -2), offs=offs)
        y = y if b2 is None else y + b2[expert]
        if getattr(self, "has_post_expert_norm", False):
            y = self.post_expert_norm(y)
        return y

    def forward_eager(self, hidden_states, top_k_index, top_k_weights):
        """The per-expert loop, in the order of transformers' eager implementation."""
        out = torch.zeros_like(hidden_states)
        counts = self._routed(top_k_index)[2]
        w1, w2 = self._weight(self.first_proj, self.gate_up_weight), self._weight("down_proj", self.down_weight)
        b1, b2 = getattr(self, f"{self.first_proj}_bias", None), getattr(self, "down_proj_bias", None)
        for e in counts.nonzero().flatten().tolist():
            pos, tok = torch.where(top_k_index.T == e)  # the order of transformers' eager loop
            x = self._input(self.gate_up_input, hidden_states[tok], e, self.inputs_on[0])
            h = self._linear(x, w1[e], None if b1 is None else b1[e])
            h = self._apply_gate(h) if getattr(self, "has_gate", True) else self.act_fn(h)
            h = self._input(self.down_input, h, e, self.inputs_on[1])
            y = self._linear(h, w2[e], None if b2 is None else b2[e])
            if getattr(self, "has_post_expert_norm", False):
                y = self.post_expert_norm(y)
            y = y * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def convert(name: str, module: nn.Module, gate_up_on: bool, down_on: bool, weights: bool = True) -> nn.Module:
    """Swap :class:`QuantExpertsMixin` into ``module``'s class (in place; names unchanged)."""
    check_layout(name, module)
    if not isinstance(module, QuantExpertsMixin):
        cls = type(module)
        module.__class__ = type(f"Quant{cls.__name__}", (QuantExpertsMixin, cls), {})
        if not hasattr(module, "_apply_gate"):
            module._apply_gate = lambda h, m=module: m.act_fn(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1]
    module.init_quant(gate_up_on, down_on, weights)
    return module
