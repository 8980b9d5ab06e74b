"""Benchmark of the Hessian-weighted FP8-scale sweep: torch reference, Triton kernel, and the plain sweep.

    python bench/hessian_sweep.py [--shapes 8192x4096,8x3072x576] [--configs 32x4,64x4,64x8]

On a CUDA device: milliseconds (``triton.testing.do_bench``, median) of the plain fast kernel, the
torch reference on the GPU, the exhaustive Hessian kernel (all 126 candidates, ``hessian_amax_baseline``)
and the pruned Hessian kernel per (block_r, num_warps); the median bound factor ``f`` of the Hessians;
whether the pruned kernel's choices equal the exhaustive kernel's; how many blocks it chooses
differently from the reference, and whether each such block is a near tie (both candidates' fp64
errors within 1e-5). Inputs are rotated over a pool larger than L2. A shape ``ExOxI`` is ``E``
experts of ``O x I`` in one launch. Without CUDA: a small parity check through the interpreter.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from mse_sweep import rotating  # noqa: E402 (the same input rotation as the plain sweep's benchmark)

SHAPES = "8192x4096,8x3072x576,8x576x1536,4x1536x2048"


def make(shape, seed: int, device: str):
    g = torch.Generator().manual_seed(seed)
    *lead, out, inp = shape
    n = lead[0] if lead else 1
    w = (torch.randn(n, out, inp, generator=g) * 0.02).to(torch.bfloat16)
    mix = torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g) / inp**0.5
    x = torch.randn(512, inp, generator=g) @ mix * torch.rand(inp, generator=g).mul(3).exp()
    from nvfp4cal.numerics.hessian import block_hessian

    h = block_hessian(x).expand(n, -1, -1, -1).contiguous()
    w, h = w.to(device), h.to(device)
    return (w if lead else w[0]), w.float().abs().flatten(1).amax(-1).reshape(lead or []), (h if lead else h[0])


def reference(w, g, h):
    from nvfp4cal.numerics.hessian import hessian_amax_reference

    if w.dim() == 2:
        return hessian_amax_reference(w, g, h).reshape(w.shape[0], -1)
    return torch.stack([hessian_amax_reference(w[e], g[e], h[e]).reshape(w.shape[1], -1) for e in range(w.shape[0])])


def near_ties(w, g, h, got, want) -> tuple[int, int]:
    """(blocks that differ, of those the ones that are not fp64 near ties), checked on the first expert."""
    from nvfp4cal.numerics.mse import candidate_scales
    from nvfp4cal.numerics.nvfp4 import e2m1_round, rdiv

    w0, g0, h0 = (w, g, h) if w.dim() == 2 else (w[0], g[0], h[0])
    a, b = (t if t.dim() == 2 else t[0] for t in (got, want))
    total = int((got != want).sum())
    diff = (a != b).nonzero().cpu()  # (row, column block) of the first expert's differing blocks
    if not diff.numel():
        return total, 0
    rows, cols = diff[:, 0], diff[:, 1]
    x = w0.float().cpu().reshape(w0.shape[0], -1, 16)[rows, cols]  # [n, 16]
    amax_k, s_k = candidate_scales(g0.cpu())
    q = e2m1_round(x.abs()[:, None] * rdiv(1.0, s_k)[None, :, None]) * s_k[None, :, None]
    d = (x[:, None] - torch.where(x[:, None] < 0, -q, q)).double()  # [n, 126, 16]
    err = torch.einsum("nki,nij,nkj->nk", d, h0.cpu().double()[cols], d)
    ka = torch.searchsorted(amax_k, a[rows, cols].cpu())
    kb = torch.searchsorted(amax_k, b[rows, cols].cpu())
    i = torch.arange(len(rows))
    rel = (err[i, ka] - err[i, kb]).abs() / err[i, kb]
    return total, int((rel > 1e-5).sum())


def bench_cuda(args) -> None:
    import triton.testing

    from nvfp4cal.numerics.hessian import pruning_factors
    from nvfp4cal.numerics.kernels.fp8_sweep import mse_amax_triton
    from nvfp4cal.numerics.kernels.hessian_sweep import hessian_amax_baseline, hessian_amax_triton

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"# {torch.cuda.get_device_name(0)}, L2 {l2 / 2**20:.0f} MiB, torch {torch.__version__}")
    configs = []
    for c in args.configs.split(","):  # BLOCK_RxWARPS[:precision]
        size, *opts = c.split(":")
        b, nw = (int(v) for v in size.split("x"))
        prec = next((o for o in opts if o in ("ieee", "tf32x3", "tf32")), "ieee")
        configs.append((c, dict(block_r=b, num_warps=nw, precision=prec)))
    print("| shape | blocks | median f | factors ms | plain fast ms | reference ms | exhaustive ieee ms |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for spec in args.shapes.split(","):
        shape = tuple(int(v) for v in spec.split("x"))
        w, g, h = make(shape, 0, "cuda")
        pool = max(2, int(4 * l2 // max(1, w.numel() * 2)) + 1)
        sets = [make(shape, i, "cuda") for i in range(min(pool, 8))]
        blocks = w.numel() // 16
        plain = triton.testing.do_bench(rotating(lambda w, g, h: mse_amax_triton(w, g), sets), warmup=5, rep=50)
        ref = reference(w, g, h)
        ref_ms = (
            triton.testing.do_bench(rotating(reference, sets), warmup=1, rep=5)
            if not args.no_reference
            else float("nan")
        )
        exhaustive = triton.testing.do_bench(rotating(hessian_amax_baseline, sets), warmup=2, rep=20)
        f = float(pruning_factors(h)[1].median())
        factors = triton.testing.do_bench(rotating(lambda w, g, h: pruning_factors(h), sets), warmup=2, rep=20)
        print(
            f"| {spec} | {blocks} | {f:.2f} | {factors:.3f} | {plain:.3f} | {ref_ms:.1f} | {exhaustive:.3f} |",
            flush=True,
        )
        fsets = [(w_, g_, h_, pruning_factors(h_)) for w_, g_, h_ in sets]
        for name, kw in configs:
            fn = lambda w, g, h, fac, kw=kw: hessian_amax_triton(w, g, h, factors=fac, **kw)  # noqa: E731
            ms = triton.testing.do_bench(rotating(fn, fsets), warmup=5, rep=50)
            got = hessian_amax_triton(w, g, h, **kw)
            same = bool(torch.equal(got, hessian_amax_baseline(w, g, h, precision=kw["precision"])))
            differ, bad = near_ties(w, g, h, got.reshape(ref.shape), ref)
            rows.append(f"| {spec} | {name} | {ms:.3f} | {ms / plain:.1f} | {same} | {differ} | {bad} |")
    print("\nThe pruned kernel, factors precomputed (ms), its ratio to the plain fast kernel, whether it equals")
    print("the exhaustive kernel of the same precision, blocks that differ from the reference, not near ties:\n")
    print("| shape | config | ms | x plain | = exhaustive | differ from ref | not near ties |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows), flush=True)


def interpreter_check() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    from nvfp4cal.numerics.kernels.hessian_sweep import hessian_amax_triton

    w, g, h = make((2, 32, 32), 0, "cpu")
    got = hessian_amax_triton(w, g, h)
    differ, bad = near_ties(w, g, h, got, reference(w, g, h))
    print(f"no CUDA: interpreter parity on 2 experts of 32x32: {differ} blocks differ, {bad} not near ties")
    if bad:
        raise SystemExit(1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--configs", default="16x2,32x4,64x4,64x4:tf32x3")
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args(argv)
    if torch.cuda.is_available():
        bench_cuda(args)
    else:
        interpreter_check()
    return 0


if __name__ == "__main__":
    sys.exit(main())
