"""Benchmark of the FP8-scale MSE sweep: torch reference, baseline Triton kernel, fast Triton kernel.

    python bench/mse_sweep.py [--shapes 8192x4096,4096x16384] [--dtype bfloat16] [--no-reference]

On a CUDA device: milliseconds (triton.testing.do_bench, median), speedup over the baseline,
effective GB/s (weight read + amax written) against a device-to-device copy of the same bytes,
and how many blocks differ from the torch reference (must be 0). The imatrix columns: the fast kernel
with one weight per input channel (``weights=``, channel energies over six decades) against the torch
reference under the same weights (``imx ref ms`` the reference's time, which the imatrix recipe took on a
GPU before the kernel had weights). Inputs are rotated over a pool
larger than L2 so every timed call reads from device memory. Without CUDA, it runs a small
parity check through the Triton interpreter instead and says so.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

# expert shapes of the default model (SmolLM2-135M upcycled): gate_up [2*1536, 576], down [576, 1536]
SHAPES = "8192x4096,4096x16384,1536x2048,3072x576,576x1536"
CONFIGS = [(128, 4), (256, 4), (256, 8), (512, 4), (512, 8), (1024, 8)]


def make(shape: tuple[int, int], dist: str, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    if dist == "normal":
        x = torch.randn(shape, generator=g)
    else:
        x = torch.distributions.StudentT(torch.tensor(3.0)).sample(shape)
    return (x * 0.02).to(dtype).to(device)


def rotating(fn, args_list):
    """A no-argument callable that calls ``fn(*args)`` on the next argument set each time."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(args_list)
        fn(*args_list[state["i"]])

    return call


def bench_cuda(args) -> None:
    import triton.testing

    from nvfp4cal.numerics.kernels.fp8_sweep import mse_amax_baseline, mse_amax_triton
    from nvfp4cal.numerics.mse import mse_amax_reference

    dtype = getattr(torch, args.dtype)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"# {torch.cuda.get_device_name(0)}, L2 {l2 / 2**20:.0f} MiB, torch {torch.__version__}, dtype {args.dtype}")
    rows = []
    for spec in args.shapes.split(","):
        shape = tuple(int(v) for v in spec.split("x"))
        for dist in ("normal", "student_t3"):
            nbytes = shape[0] * shape[1] * dtype.itemsize
            pool = max(1, -(-4 * l2 // nbytes))  # > 4x L2 of inputs in rotation
            xs = [make(shape, dist, dtype, "cuda", seed) for seed in range(pool)]
            gs = [x.float().abs().max() for x in xs]
            n_blocks = xs[0].numel() // 16
            want = mse_amax_reference(xs[0], gs[0])
            hw = torch.logspace(-3, 3, shape[1], device="cuda")[torch.randperm(shape[1], device="cuda")]
            hw = hw / hw.mean() + 1e-6
            diffs = {
                "baseline": int((mse_amax_baseline(xs[0], gs[0]) != want).sum()),
                "fast": int((mse_amax_triton(xs[0], gs[0]) != want).sum()),
                "imatrix": int(
                    (mse_amax_triton(xs[0], gs[0], weights=hw) != mse_amax_reference(xs[0], gs[0], weights=hw)).sum()
                ),
            }
            inputs = list(zip(xs, gs, strict=True))
            t_base = triton.testing.do_bench(
                rotating(mse_amax_baseline, inputs), warmup=50, rep=300, return_mode="median"
            )
            t_cfg = {}
            for bb, nw in CONFIGS:
                fn = rotating(lambda x, g, bb=bb, nw=nw: mse_amax_triton(x, g, block_b=bb, num_warps=nw), inputs)
                t_cfg[(bb, nw)] = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
            print(
                f"{spec} {dist}: fast kernel by (block_b, num_warps): "
                + ", ".join(f"{k}: {v:.3f}" for k, v in t_cfg.items()),
                flush=True,
            )
            t_fast = t_cfg[(128, 4)]  # the default of mse_amax_triton
            t_imx = triton.testing.do_bench(
                rotating(lambda x, g, hw=hw: mse_amax_triton(x, g, weights=hw), inputs),
                warmup=50,
                rep=300,
                return_mode="median",
            )
            t_ref = t_imx_ref = None
            if args.reference:
                t_ref = triton.testing.do_bench(
                    rotating(mse_amax_reference, inputs), warmup=5, rep=50, return_mode="median"
                )
                t_imx_ref = triton.testing.do_bench(
                    rotating(lambda x, g, hw=hw: mse_amax_reference(x, g, weights=hw), inputs),
                    warmup=2,
                    rep=20,
                    return_mode="median",
                )
            moved = nbytes + n_blocks * 4
            half = moved // 2 + 1  # int16 elements: read `moved` bytes, write `moved` bytes
            bufs = [tuple(torch.empty(half, dtype=torch.int16, device="cuda") for _ in range(2)) for _ in range(pool)]
            t_copy = triton.testing.do_bench(
                rotating(lambda d, s: d.copy_(s), bufs), warmup=50, rep=300, return_mode="median"
            )
            rows.append((spec, dist, t_ref, t_base, t_fast, t_copy, moved, diffs, t_imx, t_imx_ref))
            del xs, gs, inputs, bufs
            torch.cuda.empty_cache()
    print(
        f"{'shape':>11} {'dist':>10} {'ref ms':>8} {'base ms':>8} {'fast ms':>8} {'speedup':>7} "
        f"{'fast GB/s':>9} {'copy GB/s':>9} {'diff base':>9} {'diff fast':>9} {'imx ms':>8} {'imx ref ms':>10} "
        f"{'diff imx':>8}"
    )
    for spec, dist, t_ref, t_base, t_fast, t_copy, moved, d, t_imx, t_imx_ref in rows:
        ref = f"{t_ref:8.3f}" if t_ref is not None else f"{'-':>8}"
        imx_ref = f"{t_imx_ref:10.3f}" if t_imx_ref is not None else f"{'-':>10}"
        print(
            f"{spec:>11} {dist:>10} {ref} {t_base:8.3f} {t_fast:8.3f} {t_base / t_fast:7.1f} "
            f"{moved / t_fast / 1e6:9.0f} {2 * moved / t_copy / 1e6:9.0f} {d['baseline']:>9} {d['fast']:>9} "
            f"{t_imx:8.3f} {imx_ref} {d['imatrix']:>8}"
        )


def check_cpu() -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from nvfp4cal.numerics.kernels.fp8_sweep import mse_amax_triton
    from nvfp4cal.numerics.mse import mse_amax_reference

    x = make((256, 1024), "student_t3", torch.float32, "cpu", 0)
    g = x.abs().max()
    diff = int((mse_amax_triton(x, g, block_b=4096) != mse_amax_reference(x, g)).sum())
    print(f"no CUDA device: interpreter parity check on 256x1024, blocks differing from the reference: {diff}")
    hw = torch.logspace(-3, 3, 1024)[torch.randperm(1024)]
    diff = int((mse_amax_triton(x, g, block_b=4096, weights=hw) != mse_amax_reference(x, g, weights=hw)).sum())
    print(f"  with one weight per input channel (imatrix): {diff}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=SHAPES)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--no-reference", dest="reference", action="store_false", help="skip timing the torch reference")
    args = p.parse_args()
    if torch.cuda.is_available():
        bench_cuda(args)
    else:
        check_cpu()


if __name__ == "__main__":
    main()
