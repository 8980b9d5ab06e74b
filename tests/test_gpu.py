"""GPU-only checks (skipped without CUDA): compiled kernels equal the reference; the pipeline writes the
same checkpoint bytes with the Triton kernel as with the torch reference.

Run on a GPU machine with ``NVFP4CAL_GPU_TESTS=1 pytest -m gpu`` (so Triton compiles, not interprets).
"""

import filecmp

import pytest
import torch

from conftest import run_calibrate
from nvfp4cal import mse

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dist", ["normal", "student_t3", "tiny_beside_outlier"])
def test_compiled_kernels_match_reference(dtype, dist):
    from nvfp4cal.kernels.fp8_sweep import mse_amax_baseline, mse_amax_triton

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
    common = [
        "model=tiny_mixtral",
        "model.dtype=bfloat16",
        "model.config.hidden_size=576",
        "model.config.intermediate_size=1536",
        "model.config.num_hidden_layers=4",
        "model.config.head_dim=64",
        "model.config.num_attention_heads=9",
        "model.config.num_key_value_heads=3",
        "recipe=nvfp4_mse",
        "trainer=gpu",
        "data.num_samples=32",
        "data.seq_len=128",
    ]
    a = run_calibrate(tmp_path / "triton", [*common, "recipe.algorithm.kernel=triton"])
    b = run_calibrate(tmp_path / "reference", [*common, "recipe.algorithm.kernel=reference"])
    assert a.report["sweep"]["kernel"] == ["triton"] and b.report["sweep"]["kernel"] == ["reference"]
    ca, cb = tmp_path / "triton" / "ckpt", tmp_path / "reference" / "ckpt"
    names = sorted(p.name for p in ca.iterdir())
    assert names == sorted(p.name for p in cb.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(ca, cb, names, shallow=False)
    assert not mismatch and not errors, mismatch
