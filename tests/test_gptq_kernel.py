"""GPTQ's column loop in Triton (``numerics/kernels/gptq.py``): the same codes as the torch loop, bit for bit
(CPU through TRITON_INTERPRET=1; compiled with NVFP4CAL_GPU_TESTS=1), and how a run chooses it."""

import os

import pytest
import torch

from helpers import run_calibrate, same_tensors
from nvfp4cal.model.rounding import ColumnLoop
from nvfp4cal.numerics import nvfp4
from nvfp4cal.numerics.errors import UserError
from nvfp4cal.numerics.gptq import gptq_round

kern = pytest.importorskip("nvfp4cal.numerics.kernels.gptq")
DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _problem(experts, out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(3.0).sample((experts, out_f, in_f)) * 0.1  # heavy tails
    w[0, 0, :16] = 0.0  # an all-zero block
    w[0, 1, :16] = torch.tensor([0.5, 1, 1.5, 2, 3, 4, 6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 0, 6]) * 0.01  # ties
    x = torch.randn(experts, 4 * in_f, in_f, generator=g) * torch.linspace(0.1, 4.0, in_f)
    x[..., : in_f // 4] += x[..., in_f // 4 : in_f // 2]  # correlated channels
    x[..., 7] = 0.0  # a channel no input reached
    h = x.transpose(-1, -2) @ x
    steps = nvfp4.block_steps(nvfp4.block_amax(w), nvfp4.scale_2(w.abs().amax()))
    return w.to(DEV), h.to(DEV), steps.to(DEV)


@pytest.mark.parametrize(
    "experts,out_f,in_f,block_columns,act_order",
    [(1, 40, 96, 32, False), (2, 33, 80, 32, True), (2, 17, 64, 128, True), (1, 24, 48, 20, False)],
)
def test_the_column_kernel_gives_the_torch_loops_codes(experts, out_f, in_f, block_columns, act_order):
    """Odd row counts (masked rows), a last group shorter than the others, groups not a multiple of 16,
    experts batched, act-order, a dead channel, ties and an all-zero block."""
    w, h, steps = _problem(experts, out_f, in_f)
    ref = gptq_round(w, h, steps, 0.01, block_columns, act_order)
    got = gptq_round(w, h, steps, 0.01, block_columns, act_order, columns=kern.gptq_columns_triton)
    assert torch.equal(got, ref)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="asks for the interpreter's choices")
def test_a_run_chooses_the_torch_loop_off_cuda_and_refuses_triton_there(monkeypatch):
    assert ColumnLoop("auto")(torch.device("cpu")) is None
    assert ColumnLoop("reference")(torch.device("cpu")) is None
    assert ColumnLoop("triton")(torch.device("cpu")) is kern.gptq_columns_triton  # the interpreter is on
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(UserError, match="kernel=triton needs the weights on a CUDA device"):
        ColumnLoop("triton")(torch.device("cpu"))


@pytest.mark.slow  # ~15 s: every GPTQ pass of two tiny layers through the interpreter
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="builds CPU models: interpreter only")
def test_a_gptq_run_with_the_kernel_writes_the_same_checkpoint(tmp_path):
    args = ["model=tiny_llama", "recipe=nvfp4_gptq", "data.num_samples=4", "data.seq_len=32", "data.batch_size=2",
            "data.eval_samples=2", "recipe.algorithm.scales=max"]  # fmt: skip
    run_calibrate(tmp_path / "torch", args)
    run_calibrate(tmp_path / "triton", [*args, "recipe.algorithm.kernel=triton"])
    assert same_tensors(tmp_path / "torch" / "ckpt", tmp_path / "triton" / "ckpt")
