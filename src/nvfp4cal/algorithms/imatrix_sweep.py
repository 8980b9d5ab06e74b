"""``method: imatrix_mse`` - the FP8-scale sweep with each weight element's squared error weighted by its
input channel's activation energy, the diagonal of the input Hessian (llama.cpp's "importance matrix",
llm-compressor's imatrix observer):

    err_k = tree_sum(h * d_k * d_k),   h_i = sum_t x_{t,i}^2 / mean_i(...) + 1e-6,   d_k = |w| - q_k(|w|)

over the calibration rows (per expert: its routed tokens). The plain sweep's exact pruning facts hold for
non-negative weights (:func:`nvfp4cal.numerics.mse.mse_amax_reference`), so it costs about what the plain
sweep costs, where the full 16 x 16 block-Hessian sweep (``hessian_mse``) evaluates every candidate.
It observes one ``[in]`` vector per weight (and expert), summed across ranks."""

from __future__ import annotations

from .fp8_sweep import Fp8Sweep


class ImatrixSweep(Fp8Sweep):
    method = "imatrix_mse"
    weighted = False
    diag = True

    @property
    def hessian(self) -> str:
        return "diag"
