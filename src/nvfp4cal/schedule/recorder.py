"""The stand-in for a decoder layer while a layer-by-layer run captures its inputs."""

from __future__ import annotations

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
