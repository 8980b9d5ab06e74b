"""Triton FP8-scale sweep kernels: bit-exact parity with the torch reference (CPU, TRITON_INTERPRET=1)."""

import os

import pytest
import torch

from nvfp4cal.numerics import mse

kern = pytest.importorskip("nvfp4cal.numerics.kernels.fp8_sweep")
DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
BIG = 1024  # many blocks per program: the interpreter costs ~0.6 ms per program


def _cases():
    g = torch.Generator().manual_seed(0)
    n = 2 * BIG + 37  # odd block count: masking of the last program
    tiny = torch.randn(300, 16, generator=g) * torch.logspace(-7, 0, 300).unsqueeze(-1)  # slow: many low blocks
    tiny[5, 3] = 80.0  # subnormal-range scales beside a large global amax
    special = torch.randn(n, 16, generator=g)
    special[:40] = 0.0
    special[40:80] = -2.25
    special[80:120] = 0.0
    special[80:120, 7] = 3.0
    ties = torch.tensor([0.5, 1, 1.5, 2, 3, 4, 6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 0, 6])
    special[120:200] = ties * torch.linspace(0.1, 2, 80).unsqueeze(-1)
    return {
        "normal": torch.randn(n, 16, generator=g),
        "heavy": torch.distributions.StudentT(3.0).sample((n, 16)),
        "tiny_beside_outlier": tiny,
        "special": special,
    }


CASES = _cases()


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_kernel_matches_reference(kind, dtype):
    x = CASES[kind].to(dtype)
    g = x.float().abs().max()
    want = mse.mse_amax_reference(x, g)
    got = kern.mse_amax_triton(x.to(DEV), g, block_b=BIG).cpu()
    assert torch.equal(got, want), f"{(got != want).sum().item()} blocks differ"


@pytest.mark.parametrize("window", [2, 6])
def test_fast_kernel_small_windows_walk_down_exactly(window):
    """A small window forces the walk below it in most blocks; the choices must not change."""
    x = CASES["heavy"]
    g = x.abs().max()
    got = kern.mse_amax_triton(x.to(DEV), g, block_b=BIG, window=window).cpu()
    assert torch.equal(got, mse.mse_amax_reference(x, g))


def test_baseline_kernel_matches_brute_force():
    x = CASES["special"][: BIG + 5]
    g = x.abs().max()
    got = kern.mse_amax_baseline(x.to(DEV), g, block_b=BIG).cpu()
    assert torch.equal(got, mse.brute_force_amax(x, g))


def test_zero_global_amax():
    x = torch.zeros(67, 16)
    assert (kern.mse_amax_triton(x.to(DEV), torch.tensor(0.0), block_b=64) == 0).all()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="builds CPU models: interpreter only")
def test_pipeline_sweep_with_kernel_equals_reference():
    """The sweep driver through the (interpreted) kernel gives the reference's block amaxes."""
    from nvfp4cal.model.insert import insert_quantizers
    from nvfp4cal.model.loaders import build_tiny
    from nvfp4cal.model.sweep import mse_sweep
    from nvfp4cal.model.view import weight_quantizers
    from nvfp4cal.numerics.comm import RunContext
    from nvfp4cal.recipe import build_recipe

    cfg = {
        "hidden_size": 64,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    }
    models = [build_tiny("MixtralConfig", cfg, seed=3).model for _ in range(2)]
    for m in models:
        insert_quantizers(m, build_recipe("t", rules=["*"]))
    assert mse_sweep(models[0], RunContext.single(), "triton")["kernel"] == ["triton"]
    assert mse_sweep(models[1], RunContext.single(), "reference")["kernel"] == ["reference"]
    for (_, a, _), (_, b, _) in zip(weight_quantizers(models[0]), weight_quantizers(models[1]), strict=True):
        assert torch.equal(a.block_amax, b.block_amax)


def test_fast_kernel_one_launch_for_all_experts():
    """x [E, ...] with one global amax per expert: every expert's blocks as the reference chooses them."""
    torch.manual_seed(5)
    x = torch.distributions.StudentT(3.0).sample((3, 347, 16)) * torch.tensor([1e-3, 1.0, 30.0]).view(3, 1, 1)
    x[1, :40] *= 1e-5  # subnormal-range blocks inside one expert
    gs = x.abs().flatten(1).amax(1)
    got = kern.mse_amax_triton(x.to(DEV), gs.to(DEV), block_b=BIG).cpu().view(3, -1)
    for e in range(3):
        assert torch.equal(got[e], mse.mse_amax_reference(x[e], gs[e])), f"expert {e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_sqerr_matches_fake_quant(dtype):
    """The report's one-pass squared error equals sum((w - fake_quantize(w))^2) and sum(w^2)."""
    from nvfp4cal.numerics import nvfp4
    from nvfp4cal.numerics.kernels.fp8_sweep import block_sqerr_triton

    g = torch.Generator().manual_seed(3)
    w = (torch.randn(3, 40, 64, generator=g) * torch.rand(3, 1, 1, generator=g)).to(DEV, dtype)
    blk = nvfp4.block_amax(w)
    s2 = nvfp4.scale_2(blk.flatten(-2).amax(-1))[:, None, None]
    step = nvfp4.block_scales(blk, s2).float() * s2
    err, sig = block_sqerr_triton(w, step, block_b=64)
    fq = nvfp4.fake_quantize(w.float(), blk, s2)  # the NVFP4 values themselves, before any bf16 rounding
    want_err = float((fq - w.float()).pow(2).sum(dtype=torch.float64))
    want_sig = float(w.float().pow(2).sum(dtype=torch.float64))
    assert err == pytest.approx(want_err, rel=1e-5) and sig == pytest.approx(want_sig, rel=1e-6)
