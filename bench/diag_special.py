"""Diagnose blocks where the compiled sweep kernels and the torch reference disagree (GPU)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import torch  # noqa: E402

from nvfp4cal.numerics import mse  # noqa: E402
from nvfp4cal.numerics.kernels.fp8_sweep import mse_amax_baseline, mse_amax_triton  # noqa: E402
from test_fp8_sweep import CASES  # noqa: E402

for kind in CASES:
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        x = CASES[kind].to(dt)
        g = x.float().abs().max()
        want = mse.mse_amax_reference(x, g)
        fast = mse_amax_triton(x.cuda(), g).cpu()
        base = mse_amax_baseline(x.cuda(), g).cpu()
        bad = (fast != want).nonzero().flatten()
        print(kind, dt, "fast differs:", bad.numel(), "baseline differs:", int((base != want).sum()))
        amax_k, s_k = mse.candidate_scales(g)
        for i in bad[:3].tolist():
            ax = x[i].float().abs().unsqueeze(0)
            err = mse.block_errors(ax, s_k.unsqueeze(0))[0]
            kw, kf = int((amax_k == want[i]).nonzero()), int((amax_k == fast[i]).nonzero())
            print(f"  block {i}: x={x[i].float().tolist()}")
            print(
                f"    ref k={kw} err={err[kw].item():.9e}  fast k={kf} err={err[kf].item():.9e} base={base[i].item()}"
            )
