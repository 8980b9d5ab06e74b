"""The imatrix sweep (method imatrix_mse): each element's squared error weighted by its input channel's
activation energy. The pruned reference is exact against all 126 candidates under the same weights, unit
weights give the plain sweep's choices, and through the pipeline it never loses to max on its objective."""

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
    assert sweep["method"] == "imatrix_mse" and sweep["kernel"] == ["imatrix_reference"] and sweep["weights"] > 0
    assert all("mse" in w for w in res.report["weights"].values())
