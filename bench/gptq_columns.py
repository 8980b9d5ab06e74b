"""Benchmark of GPTQ's rounding pass: the torch column loop against the Triton column kernel (#26 item 2).

    python bench/gptq_columns.py [--shapes 960x576,3072x576,576x1536,8x1536x2048] [--block-columns 128]

On a CUDA device: milliseconds (``triton.testing.do_bench``, median) of one ``gptq_round`` pass per shape,
act-order on, with the torch loop and with the kernel (``block_r`` 16 and 32), and whether the two give the
same codes. The default shapes are SmolLM2-135M's passes (q/k/v stacked 960 x 576, gate/up stacked
3072 x 576, down 576 x 1536) and 8 experts of a 1536 x 2048 MoE weight; ``ExOxI`` is ``E`` experts in one
pass. Inputs are rotated over a pool larger than L2. Without CUDA: one small shape through the interpreter
(parity only, no timing).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

SHAPES = "960x576,3072x576,576x1536,8x1536x2048"


def make(shape, seed: int, device: str):
    """(w [E, out, in] fp32, H [E, in, in], steps [E, out, in/16]) with correlated, unequal input channels."""
    from nvfp4cal.numerics import nvfp4

    g = torch.Generator().manual_seed(seed)
    *lead, out, inp = shape
    n = lead[0] if lead else 1
    w = torch.randn(n, out, inp, generator=g) * 0.02
    mix = torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g) / inp**0.5
    x = torch.randn(2 * inp, inp, generator=g) @ mix * torch.rand(inp, generator=g).mul(3).exp()
    h = (x.t() @ x).expand(n, -1, -1).contiguous()
    steps = nvfp4.block_steps(nvfp4.block_amax(w), nvfp4.scale_2(w.abs().amax()))
    return w.to(device), h.to(device), steps.to(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--block-columns", type=int, default=128)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"
    from nvfp4cal.numerics.gptq import gptq_round
    from nvfp4cal.numerics.kernels.gptq import gptq_columns_triton

    if not cuda:
        w, h, s = make((2, 40, 96), 0, "cpu")
        ref = gptq_round(w, h, s, 0.01, 32, True)
        got = gptq_round(w, h, s, 0.01, 32, True, columns=gptq_columns_triton)
        print(f"no CUDA: interpreter parity on 2x40x96: same codes {torch.equal(ref, got)}")
        return 0
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("| shape | torch loop ms | kernel ms (block_r 16) | kernel ms (block_r 32) | speed-up | same codes |")
    print("|---|---|---|---|---|---|")
    for spec in args.shapes.split(","):
        shape = tuple(int(v) for v in spec.split("x"))
        pool = [make(shape, seed, "cuda") for seed in range(2)]  # two problems: a pass's H alone is in L2
        times, outs = {}, {}
        for name, cols in (
            ("torch", None),
            ("k16", functools.partial(gptq_columns_triton, block_r=16)),
            ("k32", functools.partial(gptq_columns_triton, block_r=32)),
        ):
            it = iter(range(1 << 30))

            def one(cols=cols, it=it, pool=pool):
                w, h, s = pool[next(it) % len(pool)]
                return gptq_round(w, h, s, 0.01, args.block_columns, True, columns=cols)

            outs[name] = gptq_round(*pool[0], 0.01, args.block_columns, True, columns=cols)
            times[name] = triton.testing.do_bench(one, warmup=2, rep=200)
        same = torch.equal(outs["torch"], outs["k16"]) and torch.equal(outs["torch"], outs["k32"])
        best = min(times["k16"], times["k32"])
        print(f"| {spec} | {times['torch']:.2f} | {times['k16']:.2f} | {times['k32']:.2f} | "
              f"{times['torch'] / best:.1f}x | {same} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
