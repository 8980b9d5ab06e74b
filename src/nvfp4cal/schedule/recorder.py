"""Stand-ins for decoder layers: capturing the first layer's inputs and every layer's keyword inputs (a
layer-by-layer run's calibration and evaluation passes), and putting the layers' own forwards back."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..numerics.errors import UserError


class Recorder(nn.Module):
    """Stands in for a decoder layer during capture: records the layer's keyword inputs, returns its input."""

    def __init__(self, index: int, sink: dict):
        super().__init__()
        self.index, self.sink = index, sink

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise UserError("calibration=layerwise: a decoder layer got positional inputs besides hidden_states")
        if self.index == 0:
            self.sink["hidden"] = hidden_states
        self.sink.setdefault("kwargs", {})[self.index] = kwargs
        return hidden_states


def stand_in(layers: list[tuple[str, nn.Module]], forward_of: Callable[[int], Callable]) -> list[Callable]:
    """Every layer's forward replaced by ``forward_of(i)``; returns the layers' own forwards (:func:`restore`)."""
    saved = [layer.forward for _, layer in layers]
    for i, (_, layer) in enumerate(layers):
        layer.forward = forward_of(i)
    return saved


def restore(layers: list[tuple[str, nn.Module]], saved: list[Callable]) -> None:
    for (_, layer), fwd in zip(layers, saved, strict=True):
        layer.forward = fwd


def record(layers: list[tuple[str, nn.Module]], sink: dict) -> list[Callable]:
    """Every layer replaced by a :class:`Recorder` writing into ``sink``; returns the layers' own forwards."""
    return stand_in(layers, lambda i: Recorder(i, sink).forward)


@torch.no_grad()
def captured(model: nn.Module, ids: torch.Tensor, sink: dict, n: int, **extra) -> tuple[torch.Tensor, list[dict]]:
    """One batch through a model whose ``n`` layers are recorders: (the first layer's hidden states, every
    layer's keyword inputs)."""
    sink.clear()
    model(input_ids=ids, use_cache=False, **extra)
    return sink["hidden"], [sink["kwargs"][i] for i in range(n)]
