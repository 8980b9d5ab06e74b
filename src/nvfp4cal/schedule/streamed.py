"""Evaluation streamed one decoder layer at a time (a layer-by-layer run's evaluation sets): the batches'
first-layer inputs are captured, each layer is materialized twice - from the source (the original) and with
its saved state and changed weights (the quantized model, quant mode) - and carries both streams on; the
model's head (final norm, LM head) turns each stream's last hidden states into logits, compared batch by
batch (:mod:`nvfp4cal.evaluation.compare`). Memory: one layer at a time plus the sets' hidden states."""

from __future__ import annotations

import torch
from torch import nn

from ..evaluation.compare import Comparison
from ..model.quantizers import set_mode
from ..numerics.comm import RunContext
from .recorder import captured, record, restore, stand_in


@torch.no_grad()
def evaluate_streamed(model: nn.Module, materializer, state, sets: dict, ctx: RunContext) -> dict[str, Comparison]:
    """Every evaluation set (name -> a callable giving its batches) scored for the original and the
    quantized model, streamed one decoder layer at a time (the same bound as calibration): the
    batches' first-layer inputs are captured, each layer is materialized twice - from the source (the
    original) and with its saved state and changed weights (the quantized model, quant mode) - and
    carries both streams on; the model's head (final norm, LM head) then turns each stream's last
    hidden states into logits, compared batch by batch (:mod:`nvfp4cal.evaluation.compare`)."""
    layers = materializer.layers
    n, sink = len(layers), {}
    saved = record(layers, sink)
    streams = []  # per batch: set, ids, original hidden, quantized hidden, every layer's keyword inputs
    try:
        for name, batches in sets.items():
            for batch in batches():
                ids = batch["input_ids"].to(ctx.device)
                hidden, kwargs = captured(model, ids, sink, n)
                streams.append([name, ids, hidden, hidden, kwargs])
    finally:
        restore(layers, saved)
    for i in range(n):
        for slot, saved_state, mode in ((2, None, "off"), (3, state.load(i), "quant")):
            layer = materializer.enter(i, saved_state)
            set_mode(layer, mode)
            for s in streams:
                s[slot] = layer(s[slot], **s[4][i])
            set_mode(layer, "off")
            materializer.leave(i)
    out = {name: Comparison() for name in sets}
    try:
        for s in streams:
            logits = []
            for slot, mode in ((2, "off"), (3, "quant")):
                set_mode(model, mode)  # quantized modules outside the decoder layers (an LM head a recipe quantizes)
                last = s[slot]  # the head scores the stream's last hidden states
                stand_in(
                    layers, lambda i, _last=last: (lambda h, *a, **k: _last) if i == n - 1 else (lambda h, *a, **k: h)
                )
                logits.append(model(input_ids=s[1], use_cache=False).logits)
            out[s[0]].add(logits[0], logits[1], s[1])
    finally:
        set_mode(model, "off")
        restore(layers, saved)
    return out
