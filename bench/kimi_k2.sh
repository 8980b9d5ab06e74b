#!/usr/bin/env bash
# Kimi-K2's dimensions on the DeepSeek-V3 architecture (hidden 7168, MLA, 384 routed experts of 2048,
# top-8, one shared expert, first layer dense, vocab 163840), random bf16 weights drawn per parameter,
# calibrated layer by layer (calibration=layerwise) and exported (NVFP4 experts, FP8 KV cache).
# Usage (GPU machine): bash bench/kimi_k2.sh [LAYERS] [OUT_DIR] [more overrides, e.g. trainer=ddp trainer.devices=8]
# RECIPE=nvfp4_experts_only_tune_fp8_cast_kv: the experts tuned on each layer's output, a group of experts at a time;
# EXPERTS=96: fewer routed experts than Kimi-K2's 384 (a layer that fits a smaller GPU)
# (launch multi-GPU runs with torchrun --nproc-per-node N -m nvfp4cal.calibrate instead of python3 -m)
set -euo pipefail
layers=${1:-3}
out=${2:-/tmp/nvfp4cal-k2}
shift 2 || true
rm -rf "$out"
python3 -m nvfp4cal.calibrate model=tiny_deepseek_v3 model.dtype=bfloat16 +model.init=per_param \
  +model.config.vocab_size=163840 model.config.hidden_size=7168 model.config.intermediate_size=18432 \
  model.config.moe_intermediate_size=2048 model.config.num_hidden_layers="$layers" \
  model.config.num_attention_heads=64 model.config.num_key_value_heads=64 model.config.n_routed_experts="${EXPERTS:-384}" \
  model.config.num_experts_per_tok=8 model.config.n_shared_experts=1 model.config.first_k_dense_replace=1 \
  model.config.q_lora_rank=1536 model.config.kv_lora_rank=512 model.config.qk_rope_head_dim=64 \
  model.config.qk_nope_head_dim=128 model.config.v_head_dim=128 \
  recipe="${RECIPE:-nvfp4_experts_only_mse_fp8_cast_kv}" calibration=layerwise trainer=gpu \
  data.num_samples=128 data.seq_len=512 data.batch_size=8 report.perplexity=false trainer.enable_progress_bar=false \
  export.dir="$out/ckpt" hydra.run.dir="$out/run" "$@" > "$out.log" 2>&1 || { tail -20 "$out.log"; exit 1; }
python3 - "$out/run/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
st = r["stages"]
print("stages:", ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in st.items()))
print("GPU peak GiB:", round(max(v.get("gpu_peak_gib", 0) for v in st.values()), 2),
      "CPU peak RSS GiB:", round(max(v.get("cpu_peak_rss_gib", 0) for v in st.values()), 2))
print("per layer s:", [x["seconds"] for x in r["layers"]])
for t in r.get("tune", {}).get("layers", []):
    print("tune", t["layer"], "groups", len(t.get("expert_groups", [None])), "kept", t["kept_iteration"], "of",
          t["iterations"], "validation loss", t["validation_loss"], "step batches", t.get("step_batches"))
e = r["exports"][0]
print("export:", e["seconds"], "files", len(e["files"]))
PY
du -sh "$out/ckpt"
python3 -m nvfp4cal.cli.verify "$out/ckpt" | head -3
