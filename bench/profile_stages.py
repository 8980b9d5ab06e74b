"""cProfile of the post-calibration stages (sweep, export, verify) on the e2e workload's model.

Diagnosis only: builds the random Qwen3-MoE stack on the GPU, inserts the quantizers, sets every
input amax to 1 (no calibration pass), then profiles each stage and prints the top functions.
Usage (GPU machine): python bench/profile_stages.py [--layers 12] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from e2e import MODEL  # noqa: E402


def profiled(name: str, fn, top: int):
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    prof.enable()
    out = fn()
    torch.cuda.synchronize()
    prof.disable()
    print(f"\n=== {name}: {time.perf_counter() - t0:.3f} s")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(top)
    return out


def main() -> None:
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from nvfp4cal.checkpoint.modelopt import MODELOPT
    from nvfp4cal.checkpoint.plan import write_checkpoint
    from nvfp4cal.cli.verify import verify
    from nvfp4cal.model.insert import insert_quantizers
    from nvfp4cal.model.quantizers import InputQuantizer
    from nvfp4cal.model.sweep import mse_sweep
    from nvfp4cal.numerics.comm import RunContext

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    with initialize_config_module(config_module="nvfp4cal.conf", version_base="1.3"):
        cfg = compose("calibrate", [*MODEL, f"model.config.num_hidden_layers={a.layers}", "+model.device=cuda"])
    model = instantiate(cfg.model, _convert_="all").model
    recipe = instantiate(cfg.recipe, _convert_="all")
    insert_quantizers(model, recipe)
    for m in model.modules():
        if isinstance(m, InputQuantizer):
            m.amax.fill_(1.0)
    ctx = RunContext.single("cuda")
    mse_sweep(model, ctx)  # compile
    profiled("sweep", lambda: mse_sweep(model, ctx), a.top)
    out = Path("/tmp/nvfp4cal-profile")
    shutil.rmtree(out, ignore_errors=True)
    profiled("export", lambda: write_checkpoint(model, out, MODELOPT, progress=False), a.top)
    profiled("verify", lambda: verify(out), a.top)


if __name__ == "__main__":
    main()
