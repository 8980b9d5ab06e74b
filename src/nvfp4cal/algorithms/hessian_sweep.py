"""``method: hessian_mse`` - the FP8-scale sweep with each block's error weighted by its input Hessian:
the chosen candidate minimises ``e_b^T H_b e_b`` with ``e_b = w_b - fq(w_b)`` and ``H_b = sum_t x_b x_b^T``
over the calibration rows (per expert: its routed tokens). Reference :mod:`nvfp4cal.numerics.hessian`, Triton
:mod:`nvfp4cal.numerics.kernels.hessian_sweep`; experts that saw no token keep the plain sweep's choices."""

from __future__ import annotations

from .fp8_sweep import Fp8Sweep


class HessianSweep(Fp8Sweep):
    method = "hessian_mse"
    weighted = True

    @property
    def hessian(self) -> str:
        return "block"
