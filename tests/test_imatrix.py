"""The imatrix sweep (method imatrix_mse): each element's squared error weighted by its input channel's
activation energy. The pruned reference is exact against all 126 candidates under the same weights, unit
weights give the plain sweep's choices, and through the pipeline it never loses to max on its objective."""

import os

import pytest
import torch

from helpers import SMALL, run_calibrate
from nvfp4cal.numerics import mse, nvfp4


def _weighted_brute_force(w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """All 126 candidates per block, the same fp32 ops (the unpruned definition)."""
    ax = w.float().abs().reshape(-1, nvfp4.BLOCK)
    hb = h.float().reshape(1, -1, nvfp4.BLOCK).expand(w.shape[0], -1, -1).reshape(-1, nvfp4.BLOCK)
    amax_k, s_k = mse.candidate_scales(g)
    err = mse.block_errors(ax, s_k.expand(ax.shape[0], -1), hb)
    return amax_k[err.argmin(-1)]


@pytest.mark.parametrize("kind", ["normal", "heavy", "ill_conditioned"])
def test_pruned_reference_is_exact_under_weights(kind):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(256, 512, generator=gen)
    if kind == "heavy":
        w = torch.distributions.StudentT(2.5).sample((256, 512))
    h = torch.rand(512, generator=gen)
    if kind == "ill_conditioned":  # channel energies over twelve decades, some channels silent
        h = torch.logspace(-6, 6, 512)[torch.randperm(512, generator=gen)]
        h[::7] = 0.0
    h = h / h.mean() + 1e-6
    g = w.abs().max()
    got = mse.mse_amax_reference(w, g, chunk=1000, weights=h)
    assert torch.equal(got, _weighted_brute_force(w, g, h))
    if kind == "ill_conditioned":  # the weights matter: some blocks choose differently from the plain sweep
        assert not torch.equal(got, mse.mse_amax_reference(w, g))


def test_unit_weights_are_the_plain_sweep():
    w = torch.distributions.StudentT(3.0).sample((128, 256))
    g = w.abs().max()
    assert torch.equal(mse.mse_amax_reference(w, g, weights=torch.ones(256)), mse.mse_amax_reference(w, g))


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen3_moe"])
def test_imatrix_recipe_runs_and_reports_its_method(tmp_path, model):
    recipe = "nvfp4_imatrix_mse" if model == "tiny_llama" else "nvfp4_experts_only_imatrix_mse_fp8_cast_kv"
    res = run_calibrate(tmp_path, [f"model={model}", f"recipe={recipe}", *SMALL])
    sweep = res.report["sweep"]
    kernels = [["imatrix_reference"]] + (
        [["imatrix_triton"]] if torch.cuda.is_available() else []
    )  # auto: Triton on CUDA
    assert sweep["method"] == "imatrix_mse" and sweep["kernel"] in kernels and sweep["weights"] > 0
    assert all("mse" in w for w in res.report["weights"].values())


def test_triton_kernel_under_weights_equals_the_reference():
    """The plain fast kernel with one weight per element: every expert's choices equal the reference's
    under its own weights, bit for bit (silent channels, twelve decades of energy, blocks near the
    subnormal floor that start from the top candidate, a one-candidate window that walks down)."""
    from nvfp4cal.numerics.kernels.fp8_sweep import mse_amax_triton

    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    gen = torch.Generator().manual_seed(2)
    w = torch.distributions.StudentT(2.5).sample((3, 8, 64))
    w[1, :, :16] *= 1e-5
    g = w.abs().flatten(1).amax(-1)
    g[2] *= 4
    h = torch.logspace(-6, 6, 64)[torch.randperm(64, generator=gen)].expand(3, -1).clone()
    h[0, ::7] = 0.0
    h[1] = torch.rand(64, generator=gen)
    h = h / h.mean(-1, keepdim=True) + 1e-6
    got = mse_amax_triton(w.to(dev), g.to(dev), block_b=32, window=1, weights=h.to(dev)).cpu().reshape(3, -1)
    for e in range(3):  # window 1: the walk down decides (the pipeline test below runs the default window)
        assert torch.equal(got[e], mse.mse_amax_reference(w[e], g[e], weights=h[e])), e


@pytest.mark.parametrize(
    "model,recipe",
    [("tiny_qwen3_moe", "nvfp4_experts_only_imatrix_mse_fp8_cast_kv"), ("tiny_llama", "nvfp4_imatrix_mse")],
)
def test_imatrix_sweep_through_the_kernel_equals_the_reference(monkeypatch, model, recipe):
    """The sweep driver through the (interpreted) kernel gives the reference's block amaxes: all live experts
    of a fused weight in one launch, experts that got no token through the plain kernel. (Programs of 1024
    blocks: the interpreter's cost is per program; the choices do not depend on the program size.)"""
    import copy
    import functools

    from nvfp4cal.numerics.kernels import fp8_sweep

    monkeypatch.setattr(fp8_sweep, "mse_amax_triton", functools.partial(fp8_sweep.mse_amax_triton, block_b=1024))

    from helpers import calibrated
    from nvfp4cal.model.sweep import mse_sweep
    from nvfp4cal.model.view import weight_quantizers
    from nvfp4cal.numerics.comm import RunContext

    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    a = calibrated(model, recipe)
    b = copy.deepcopy(a)
    a.to(dev)
    ra = mse_sweep(a, RunContext.single(), "triton", diag=True)
    rb = mse_sweep(b, RunContext.single(), "reference", diag=True)
    assert "imatrix_triton" in ra["kernel"] and "imatrix_reference" in rb["kernel"] and ra["fallback"] == rb["fallback"]
    for (n, qa, _), (_, qb, _) in zip(weight_quantizers(a), weight_quantizers(b), strict=True):
        assert torch.equal(qa.block_amax.cpu(), qb.block_amax), n
