"""The export layouts by ``export.format`` name, and the layout a checkpoint's config says it is in."""

from __future__ import annotations

from .compressed_tensors import COMPRESSED_TENSORS
from .layout import Layout
from .modelopt import MODELOPT

LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (MODELOPT, COMPRESSED_TENSORS)}


def layout_of(quantization_config: dict | None) -> Layout:
    """The layout config.json's ``quantization_config`` names (modelopt when it names none: then
    ``hf_quant_config.json`` describes the checkpoint)."""
    method = (quantization_config or {}).get("quant_method")
    for layout in LAYOUTS.values():
        if layout.quant_method == method:
            return layout
    return MODELOPT


def layout_of_tensors(names) -> Layout:
    """The layout whose packed-weight names occur among ``names`` (modelopt when none does)."""
    return next((layout for layout in LAYOUTS.values() if layout.holds(names)), MODELOPT)
