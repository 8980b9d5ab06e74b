"""calibration=layerwise on one GPU: time against a whole-model run, and a model larger than the GPU.

1. ``--ratio``: the end-to-end workload of bench/e2e.py (a 30B-class Qwen3-MoE stack of LAYERS layers,
   128 x 512 calibration tokens, recipe nvfp4_experts_only_mse_fp8_cast_kv, weights drawn per parameter
   from seeds) calibrated whole (trainer=gpu) and layer by layer; wall times, GPU peaks, same tensors.
2. ``--big N``: the same shapes with N layers (bf16 weights larger than the GPU when N is large),
   layer by layer only: wall time, time per layer, GPU peak against the model's bf16 size, verify.

Usage (GPU machine): python bench/layerwise.py --ratio [--layers 12] | --big 125 [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from e2e import DATA, MODEL, RUN, calibrate

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ["recipe=nvfp4_experts_only_mse_fp8_cast_kv", "+model.init=per_param", "trainer=gpu"]


def summary(run_dir: Path) -> dict:
    r = json.loads((run_dir / "report.json").read_text())
    peak = max(v.get("gpu_peak_gib", 0.0) for v in r["stages"].values())
    layers = [x["seconds"] for x in r.get("layers", [])]
    return {
        "wall_s": r["wall_seconds"],
        "gpu_peak_gib": round(peak, 2),
        "stages": {k: v["seconds"] for k, v in r["stages"].items()},
        "per_layer_s": (round(sum(layers) / len(layers), 3), round(max(layers), 3)) if layers else None,
        "materialized_at_once": r.get("layers_materialized_at_once"),
    }


def bf16_gib(args: list[str]) -> float:
    """The model's size in bf16, from its structure on the meta device."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    with initialize_config_module(config_module="nvfp4cal.conf", version_base="1.3"):
        cfg = compose("calibrate", args)
    model = instantiate(cfg.model, _convert_="all", sharded=True).model
    return sum(p.numel() for p in model.parameters()) * 2 / 2**30


def run(out: Path, name: str, args: list[str]) -> dict:
    rc = calibrate([*args, f"export.dir={out}/{name}", f"hydra.run.dir={out}/run_{name}"], out / f"{name}.log")
    if rc:
        sys.exit(f"{name} failed (rc {rc}); see {out}/{name}.log")
    return summary(out / f"run_{name}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", action="store_true")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--big", type=int, default=0, help="layers of the larger-than-the-GPU model")
    ap.add_argument("--out", default="/tmp/nvfp4cal-layerwise")
    a = ap.parse_args()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    base = [*MODEL, *DATA, *RUN, *RECIPE]
    if a.ratio:
        args = [*base, f"model.config.num_hidden_layers={a.layers}"]
        run(out, "warm", [*args, "model.config.num_hidden_layers=1"])  # compile the kernels once
        whole = run(out, "whole", [*args, "+model.device=cuda"])
        lw = run(out, "layerwise", [*args, "calibration=layerwise"])
        print("whole    ", whole, flush=True)
        print("layerwise", lw, flush=True)
        print(f"layerwise / whole wall time: {lw['wall_s'] / whole['wall_s']:.2f}", flush=True)
        same = subprocess.run([sys.executable, str(ROOT / "bench/same_tensors.py"), f"{out}/whole", f"{out}/layerwise"],
                              capture_output=True, text=True)  # fmt: skip
        print("same tensors:", same.stdout.strip().splitlines()[-1], flush=True)
    if a.big:
        args = [*base, f"model.config.num_hidden_layers={a.big}", "calibration=layerwise", "export.max_shard_size_gb=5"]
        gib = bf16_gib(args)
        print(f"big: {a.big} layers, {gib:.1f} GiB of bf16 weights", flush=True)
        big = run(out, "big", args)
        print("big", big, f"GPU peak / bf16 size: {big['gpu_peak_gib'] / gib:.1%}", flush=True)
        v = subprocess.run([sys.executable, "-m", "nvfp4cal.cli.verify", f"{out}/big"], capture_output=True, text=True)
        print("verify:", v.stdout.strip().splitlines()[0], f"(rc {v.returncode})", flush=True)
        du = subprocess.run(["du", "-sh", f"{out}/big"], capture_output=True, text=True).stdout.split()[0]
        print("checkpoint size:", du, flush=True)


if __name__ == "__main__":
    main()
