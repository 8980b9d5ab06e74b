"""Diagnose one near-tie block: per-candidate errors on CPU and CUDA torch, and each implementation's choice."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import torch  # noqa: E402

from nvfp4cal.numerics import mse  # noqa: E402
from nvfp4cal.numerics.kernels.fp8_sweep import mse_amax_triton  # noqa: E402
from test_fp8_sweep import CASES  # noqa: E402

x = CASES["special"].to(torch.bfloat16)
g = x.float().abs().max()
i = 1886
for dev in ("cpu", "cuda"):
    xb = x.to(dev)
    amax_k, s_k = mse.candidate_scales(g.to(dev), dev)
    ax = xb[i].float().abs().unsqueeze(0)
    err = mse.block_errors(ax, s_k.unsqueeze(0))[0]
    ref = mse.mse_amax_reference(xb, g.to(dev))[i]
    print(
        dev,
        "ref choice k =",
        int((amax_k == ref).nonzero()),
        {k: err[k].item().hex() for k in (107, 111)},
        "s_k:",
        {k: s_k[k].item().hex() for k in (107, 111)},
        "r_k:",
        {k: (1.0 / s_k[k]).item().hex() for k in (107, 111)},
    )
print(
    "kernel choice:",
    mse_amax_triton(x.cuda(), g)[i].item(),
    "amax_k[107], [111]:",
    (mse.candidate_scales(g)[0][[107, 111]]).tolist(),
)
