"""GPU-only checks (skipped without CUDA): compiled kernels equal the reference; the pipeline writes the
same checkpoint bytes with the Triton kernel as with the torch reference.

Run on a GPU machine with ``NVFP4CAL_GPU_TESTS=1 pytest -m gpu`` (so Triton compiles, not interprets).
"""

import filecmp

import pytest
import torch

from helpers import run_calibrate
from nvfp4cal.numerics import mse

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _mixtral_576(layers: int) -> list[str]:
    """A bf16 Mixtral with the default model's widths on the GPU (32 x 128 calibration tokens)."""
    return [
        "model=tiny_mixtral",
        "model.dtype=bfloat16",
        "model.config.hidden_size=576",
        "model.config.intermediate_size=1536",
        f"model.config.num_hidden_layers={layers}",
        "model.config.head_dim=64",
        "model.config.num_attention_heads=9",
        "model.config.num_key_value_heads=3",
        "trainer=gpu",
        "data.num_samples=32",
        "data.seq_len=128",
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dist", ["normal", "student_t3", "tiny_beside_outlier"])
def test_compiled_kernels_match_reference(dtype, dist):
    from nvfp4cal.numerics.kernels.fp8_sweep import mse_amax_baseline, mse_amax_triton

    g = torch.Generator().manual_seed(1)
    n = (1 << 20) + 77
    if dist == "normal":
        x = torch.randn(n, 16, generator=g)
    elif dist == "student_t3":
        x = torch.distributions.StudentT(3.0).sample((n, 16))
    else:
        x = torch.randn(n, 16, generator=g) * torch.logspace(-8, 0, n).unsqueeze(-1)
        x[3, 3] = 100.0
    x = x.to(dtype).cuda()
    gmax = x.float().abs().max()
    want = mse.mse_amax_reference(x, gmax)
    assert torch.equal(mse_amax_triton(x, gmax), want)
    assert torch.equal(mse_amax_baseline(x[: 1 << 16], gmax), want[: 1 << 16])


def test_pipeline_same_bytes_with_kernel_and_reference(tmp_path):
    common = [*_mixtral_576(layers=4), "recipe=nvfp4_mse"]
    a = run_calibrate(tmp_path / "triton", [*common, "recipe.algorithm.kernel=triton"])
    b = run_calibrate(tmp_path / "reference", [*common, "recipe.algorithm.kernel=reference"])
    assert a.report["sweep"]["kernel"] == ["triton"] and b.report["sweep"]["kernel"] == ["reference"]
    ca, cb = tmp_path / "triton" / "ckpt", tmp_path / "reference" / "ckpt"
    names = sorted(p.name for p in ca.iterdir())
    assert names == sorted(p.name for p in cb.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(ca, cb, names, shallow=False)
    assert not mismatch and not errors, mismatch


def test_grouped_experts_on_cuda_match_eager():
    """bf16 on CUDA picks the grouped path (torch._grouped_mm); it agrees with the eager loop."""
    from helpers import tiny_model
    from nvfp4cal.model.experts import QuantExpertsMixin
    from nvfp4cal.model.insert import insert_quantizers
    from nvfp4cal.model.quantizers import set_mode
    from nvfp4cal.recipe import build_recipe

    outs, amax = {}, {}
    for impl in ("eager", "auto"):
        m = tiny_model("tiny_qwen3_moe").to("cuda", torch.bfloat16)
        insert_quantizers(m, build_recipe("t", rules=["*.experts.*"]))
        experts = [x for x in m.modules() if isinstance(x, QuantExpertsMixin)]
        for x in experts:
            x.grouped = impl
        assert experts[0].use_grouped(torch.zeros(1, device="cuda")) == (impl == "auto")
        set_mode(m, "calib")
        ids = torch.randint(0, 200, (4, 64), generator=torch.Generator().manual_seed(0)).cuda()
        with torch.no_grad():
            outs[impl] = m(input_ids=ids, use_cache=False).logits.float()
        amax[impl] = torch.stack([x.gate_up_input.amax for x in experts])
    torch.testing.assert_close(outs["auto"], outs["eager"], rtol=0.05, atol=0.05)
    torch.testing.assert_close(amax["auto"], amax["eager"], rtol=0.02, atol=0)


def test_hessian_kernel_matches_reference_on_cuda():
    """Compiled Hessian kernel vs the torch reference on the same Hessians: equal choices but for near ties."""
    from nvfp4cal.numerics import hessian
    from nvfp4cal.numerics.kernels.hessian_sweep import hessian_amax_triton

    g = torch.Generator().manual_seed(2)
    w = (torch.distributions.StudentT(3.0).sample((4, 512, 1024)) * 0.02).to(torch.bfloat16)
    mix = torch.eye(1024) + 0.3 * torch.randn(1024, 1024, generator=g) / 32
    h = torch.stack([hessian.block_hessian(torch.randn(256, 1024, generator=g) @ mix) for _ in range(4)])
    gmax = w.float().abs().flatten(1).amax(-1)
    got = hessian_amax_triton(w.cuda(), gmax.cuda(), h.cuda()).cpu()
    total = 0
    for e in range(4):
        want = hessian.hessian_amax_reference(w[e].cuda(), gmax[e].cuda(), h[e].cuda()).cpu().reshape(512, -1)
        diff = (got[e] != want).reshape(-1).nonzero().squeeze(-1)
        total += diff.numel()
        if diff.numel():
            _, err = hessian.brute_force_fp64(w[e], gmax[e], h[e])
            amax_k, _ = mse.candidate_scales(gmax[e])
            a = torch.searchsorted(amax_k, got[e].reshape(-1)[diff])
            b = torch.searchsorted(amax_k, want.reshape(-1)[diff])
            assert ((err[diff, a] - err[diff, b]).abs() <= 1e-5 * err[diff, b]).all()
    assert total <= 4 * 512 * 64 // 1000  # near ties: well under 0.1% of the blocks


def test_pipeline_hessian_sweep_on_cuda(tmp_path):
    common = [*_mixtral_576(layers=2), "recipe=nvfp4_hessian_mse"]
    a = run_calibrate(tmp_path / "triton", [*common, "recipe.algorithm.kernel=triton"])
    b = run_calibrate(tmp_path / "reference", [*common, "recipe.algorithm.kernel=reference"])
    assert a.report["sweep"]["kernel"] == ["hessian_triton"] and b.report["sweep"]["kernel"] == ["hessian_reference"]
    from nvfp4cal.checkpoint.reload import read_tensors

    ta, tb = read_tensors(tmp_path / "triton" / "ckpt"), read_tensors(tmp_path / "reference" / "ckpt")
    differ = total = 0
    for k in ta:
        if k.endswith(".weight_scale"):
            x, y = ta[k].view(torch.uint8), tb[k].view(torch.uint8)
            differ, total = differ + int((x != y).sum()), total + x.numel()
    assert total > 0 and differ <= total // 1000, (differ, total)


def test_hessians_enabled_on_the_cpu_accumulate_on_the_gpu():
    """A model built on the CPU and moved by the Trainer: its Hessians follow the rows to the GPU."""
    from nvfp4cal.model.quantizers import InputQuantizer

    for full in (False, True):
        q = InputQuantizer()
        q.enable_hessian(32, full=full)
        x = torch.randn(64, 32, device="cuda")
        q.observe(x)
        assert q.hessian.device.type == "cuda"
        assert q.block_hessians([0]).shape == (1, 2, 16, 16)


def test_pipeline_default_recipe_on_cuda(tmp_path):
    """The default recipe (experts-only imatrix sweep) on the GPU: its weighted sweep runs on CUDA tensors,
    experts that got no token take the plain Triton kernel's choices; the checkpoint verifies."""
    from nvfp4cal.checkpoint.check import verify

    res = run_calibrate(tmp_path, [*_mixtral_576(layers=2), "model.config.num_local_experts=16"])
    sweep = res.report["sweep"]
    assert sweep["method"] == "imatrix_mse" and "imatrix_triton" in sweep["kernel"]
    assert ("triton" in sweep["kernel"]) == bool(sweep["fallback"])
    assert verify(tmp_path / "ckpt").ok
    ppl = res.report["perplexity"]
    assert ppl["quantized"] < float("inf")
