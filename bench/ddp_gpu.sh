#!/usr/bin/env bash
# Data-parallel calibration on N GPUs against one GPU, same samples (batch 1): stage times and byte-identity.
# A random-weight Qwen3-MoE stack with Qwen3-30B-A3B expert shapes (hidden 2048, 128 experts of 768, top-8).
# Usage (GPU machine with N GPUs): bash bench/ddp_gpu.sh [N] [LAYERS] [OUT_DIR]
set -euo pipefail
n=${1:-2}
layers=${2:-4}
out=${3:-/tmp/nvfp4cal-ddp}
rm -rf "$out" && mkdir -p "$out"
export NCCL_NVLS_ENABLE=0
args=(model=tiny_qwen3_moe model.dtype=bfloat16 model.config.hidden_size=2048 model.config.moe_intermediate_size=768
      model.config.num_experts=128 model.config.num_experts_per_tok=8 model.config.num_hidden_layers=$layers
      model.config.num_attention_heads=32 model.config.num_key_value_heads=4 model.config.head_dim=128
      recipe=nvfp4_experts_only_mse_fp8_cast_kv data.num_samples=64 data.seq_len=512 data.batch_size=1
      report.perplexity=false trainer.enable_progress_bar=false)
python3 -m nvfp4cal.calibrate "${args[@]}" trainer=gpu export.dir="$out/one" hydra.run.dir="$out/run_one" > "$out/one.log" 2>&1
torchrun --standalone --nproc-per-node "$n" -m nvfp4cal.calibrate "${args[@]}" trainer=ddp trainer.accelerator=gpu \
    trainer.devices="$n" export.dir="$out/ddp" hydra.run.dir="$out/run_ddp" > "$out/ddp.log" 2>&1
for r in one ddp; do
  python3 - "$out/run_$r/report.json" "$r" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(sys.argv[2], ", ".join(f"{k} {v['seconds']:.2f}s" + (f" ({v['gpu_peak_gib']:.1f} GiB)" if 'gpu_peak_gib' in v else "")
                              for k, v in r["stages"].items()), "| sweep:", r.get("sweep"))
PY
done
cmp "$out/one/model.safetensors" "$out/ddp/model.safetensors" && echo "1 GPU and $n-GPU ddp checkpoints: byte-identical"
