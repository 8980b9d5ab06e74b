"""End-to-end speed on one GPU: calibrate and export a 30B-class MoE layer stack (issue: 10x ModelOpt).

Workload: a random bf16 Qwen3-MoE with the Qwen3-30B-A3B shapes but LAYERS layers (hidden 2048, 32
heads, 4 KV heads, head_dim 128, 128 experts top-8, expert size 768, vocab 151936), 128 calibration
samples of 512 tokens in batches of 8, recipe nvfp4_experts_only_mse_fp8_cast_kv, export to local disk.

1. The baseline: a bf16 forward over the same batches (transformers' default experts implementation).
2. The pipeline as a user runs it (``python -m nvfp4cal.calibrate ...``): each stage's time and peak
   GPU / CPU memory from its report.json; "whole run" = every stage after the model load.
3. ``--check``: the same family on a smaller config, calibrated on the GPU (Triton sweep) and on the
   CPU (torch reference): packed weights and block scales must be byte-identical.

Usage (GPU machine): python bench/e2e.py [--layers 12] [--out /tmp/nvfp4cal-e2e] [--check]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = [
    "model=tiny_qwen3_moe",
    "model.dtype=bfloat16",
    "+model.config.vocab_size=151936",
    "model.config.hidden_size=2048",
    "model.config.moe_intermediate_size=768",
    "model.config.intermediate_size=6144",
    "model.config.num_experts=128",
    "model.config.num_experts_per_tok=8",
    "model.config.num_attention_heads=32",
    "model.config.num_key_value_heads=4",
    "model.config.head_dim=128",
]
DATA = ["data.num_samples=128", "data.seq_len=512", "data.batch_size=8"]
RUN = ["report.perplexity=false", "trainer.enable_progress_bar=false"]


def calibrate(args: list[str], log: Path) -> int:
    cmd = [sys.executable, "-m", "nvfp4cal.calibrate", *args]
    with open(log, "w") as fh:
        return subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT).returncode


def baseline_forward(layers: int) -> dict:
    """bf16 forward over the calibration batches, no quantizers: the yardstick for calibration."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from nvfp4cal.calibrate import calibration_data

    with initialize_config_module(config_module="nvfp4cal.conf", version_base="1.3"):
        cfg = compose("calibrate", [*MODEL, *DATA, f"model.config.num_hidden_layers={layers}", "+model.device=cuda"])
    loaded = instantiate(cfg.model, _convert_="all")
    data = calibration_data(cfg, loaded.tokenizer)
    data.setup("validate")
    batches = [b["input_ids"].cuda() for b in data.val_dataloader()]
    model = loaded.model
    out = {"params_b": sum(p.numel() for p in model.parameters()) / 1e9, "impl": model.config._experts_implementation}
    with torch.no_grad():
        for kw, key in (({"logits_to_keep": 1}, "forward_s"), ({}, "forward_full_logits_s")):
            model(input_ids=batches[0], use_cache=False, **kw)  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for ids in batches:
                model(input_ids=ids, use_cache=False, **kw)
            torch.cuda.synchronize()
            out[key] = round(time.perf_counter() - t0, 3)
    out["model_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    del model, loaded
    gc.collect()
    torch.cuda.empty_cache()
    return out


def report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def check_bytes(out: Path) -> str:
    """GPU (Triton) and CPU (reference) runs of a smaller config: packed weights and block scales equal?"""
    from safetensors import safe_open

    small = [*MODEL, "model.config.num_hidden_layers=2", "model.config.num_experts=16", "model.config.vocab_size=4096"]
    small += ["data.num_samples=16", "data.seq_len=128", "data.batch_size=4", *RUN]
    small += ["recipe=nvfp4_experts_only_mse_fp8_cast_kv"]  # the plain sweep: bit-exact across devices
    for name, extra in (("gpu", ["trainer=gpu"]), ("cpu", ["trainer=cpu", "recipe.algorithm.kernel=reference"])):
        rc = calibrate(
            [*small, *extra, f"export.dir={out}/check_{name}", f"hydra.run.dir={out}/run_check_{name}"],
            out / f"check_{name}.log",
        )
        if rc:
            return f"check run {name} failed (rc {rc}); see {out}/check_{name}.log"

    def tensors(d):
        res = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():
                    if k.endswith((".weight_scale",)) or (k.endswith(".weight") and f"{k}_scale" in fh.keys()):
                        res[k] = fh.get_tensor(k).view(torch.uint8)
        return res

    a, b = tensors(out / "check_gpu"), tensors(out / "check_cpu")
    diff = [k for k in a if k not in b or not torch.equal(a[k], b[k])]
    return f"{len(a)} packed/scale tensors, {len(diff)} differ" + (f": {diff[:3]}" if diff else " (byte-identical)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--out", default="/tmp/nvfp4cal-e2e")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="pipeline runs (the first one compiles the kernels)")
    ap.add_argument("--recipe", default="nvfp4_experts_only_mse_fp8_cast_kv")
    ap.add_argument("--layerwise", action="store_true", help="calibration=layerwise (GPTQ needs it)")
    ap.add_argument("extra", nargs="*", help="more Hydra overrides for the pipeline runs")
    a = ap.parse_args()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    if not a.skip_baseline:
        print("baseline:", json.dumps(baseline_forward(a.layers)), flush=True)
    args = [*MODEL, *DATA, *RUN, f"recipe={a.recipe}", f"model.config.num_hidden_layers={a.layers}"]
    if a.layerwise:  # layer by layer (each layer's weights drawn on the GPU as it is reached)
        args += ["calibration=layerwise", "+model.init=per_param", "trainer=gpu"]
    else:
        args += ["+model.device=cuda", "trainer=gpu"]
    for i in range(a.repeat):  # run 1 on a fresh machine pays Triton's JIT; later runs hit its disk cache
        ckpt, run = out / f"ckpt{i}", out / f"run{i}"
        rc = calibrate([*args, *a.extra, f"export.dir={ckpt}", f"hydra.run.dir={run}"], out / f"run{i}.log")
        if rc:
            print(f"pipeline failed (rc {rc}):\n" + (out / f"run{i}.log").read_text()[-3000:])
            sys.exit(1)
        r = report(run)
        st = r["stages"]
        print(f"run {i + 1}:")
        for k, v in st.items():
            gpu = f", GPU peak {v['gpu_peak_gib']:.2f} GiB" if "gpu_peak_gib" in v else ""
            print(f"  {k:<12} {v['seconds']:8.2f} s{gpu}, CPU peak RSS {v['cpu_peak_rss_gib']:.2f} GiB")
        # as the speed issue defined it; "plan" (export plan check) and "data" (tokenization) were
        # untimed then and are reported beside it
        whole = sum(v["seconds"] for k, v in st.items() if k not in ("load", "plan", "data"))
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**30
        print(f"  whole run (all stages after load): {whole:.2f} s; checkpoint {size:.2f} GiB; sweep {r.get('sweep')}")
        extra = sum(st[k]["seconds"] for k in ("plan", "data") if k in st)
        print(f"  + plan and data: {extra:.2f} s; run() wall {r.get('wall_seconds')} s")
        print(f"  dead experts: {sum(len(e['experts']) for e in r.get('experts', []))}", flush=True)
        print(f"  export parts (s): {[e.get('seconds') for e in r.get('exports', [])]}", flush=True)
        if r.get("gptq"):
            print(f"  gptq: {json.dumps(r['gptq'])[:400]}", flush=True)
    if a.check:
        print("byte check:", check_bytes(out), flush=True)
    os.sync()


if __name__ == "__main__":
    main()
