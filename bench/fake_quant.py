"""Activation fake quant (``nvfp4.fake_quantize_dynamic``): today's formulation against session 10's, same values.

    .venv/bin/python bench/fake_quant.py [--device cuda] [--rounds 3]

Session 10 rounded with a magic number chosen by two ``masked_fill_`` passes and took ``|x|`` twice (once for
the block amaxes, once for the rounding); today the binade's magic number comes from the exponent bits, ``|x|``
is taken once and the rounding runs in place. The shapes: the inputs of the default MoE's experts (a quarter
of a 4 x 256 batch routed to one expert) and of SmolLM2's attention and MLP projections.
"""

from __future__ import annotations

import argparse
import time

import torch

from nvfp4cal.numerics import nvfp4

SHAPES = [(256, 576), (256, 1536), (1024, 576), (1024, 1536), (2048, 576)]


def before(x: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """Session 10's activation fake quant (masked_fill magic numbers, |x| twice, sign by ``where``)."""
    xb = x.detach().float().unflatten(-1, (-1, nvfp4.BLOCK))
    step = nvfp4.block_steps(xb.abs().amax(-1), s2).unsqueeze(-1)
    y = xb.abs() / step
    m = torch.full_like(y, 6291456.0)
    m.masked_fill_(y >= 2.0, 12582912.0).masked_fill_(y >= 4.0, 25165824.0)
    q = y.add(m).sub_(m).clamp_max_(nvfp4.FP4_MAX).mul_(step)
    return torch.where(xb < 0, -q, q).flatten(-2).to(x.dtype)


def timed(f, device: str, n: int = 50) -> float:
    f()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        f()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    print(f"device {args.device}, {torch.get_num_threads()} threads; ms per call (best of {args.rounds} rounds)")
    print("| shape | before | now | same values |\n|---|---|---|---|")
    for shape in SHAPES:
        x = (torch.randn(shape, generator=g) * torch.rand(shape, generator=g).pow(3) * 4).to(args.device)
        s2 = nvfp4.scale_2(x.abs().amax())
        same = torch.equal(before(x, s2), nvfp4.fake_quantize_dynamic(x, s2))
        old = min(timed(lambda: before(x, s2), args.device) for _ in range(args.rounds))  # noqa: B023
        new = min(timed(lambda: nvfp4.fake_quantize_dynamic(x, s2), args.device) for _ in range(args.rounds))  # noqa: B023
        print(f"| {shape[0]}x{shape[1]} | {old:.2f} | {new:.2f} | {same} |")


if __name__ == "__main__":
    main()
