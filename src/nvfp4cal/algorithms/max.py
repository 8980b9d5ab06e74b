"""``method: max`` - max calibration only: block scales from each block's own amax, static input scales
from the largest calibration input. Nothing happens after calibration."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Algorithm


@dataclass(frozen=True)
class MaxParams:
    kernel: str = "auto"  # accepted for every method (recipes share it); max runs no kernel


class Max(Algorithm):
    method = "max"
    Params = MaxParams

    def with_kernel(self, kernel: str) -> Algorithm:
        return self  # it runs no kernel: its recipe keeps what it says
