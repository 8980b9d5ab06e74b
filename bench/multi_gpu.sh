#!/usr/bin/env bash
# Calibration on several GPUs (GPU machine with N GPUs). Two modes:
#   bash bench/multi_gpu.sh ddp  N LAYERS EXPERTS EXPERT_SIZE [OUT]   1 GPU vs torchrun N x trainer=ddp, batch 1:
#        stage times of both, byte-identity of the two checkpoints (same samples; max is order-independent)
#   bash bench/multi_gpu.sh fsdp N LAYERS EXPERTS EXPERT_SIZE [OUT]   torchrun N x trainer=fsdp, batch 8, then verify:
#        stage times, what each rank holds, GPU peak per rank
# Model: a random bf16 Qwen3-MoE (hidden 2048, 32 heads / 4 KV heads of 128, top-8) built on the GPU;
# EXPERTS=8 EXPERT_SIZE=1536 with hidden 576 would be the default model's shapes - see MODEL_ARGS below.
set -euo pipefail
mode=$1; n=$2; layers=$3; experts=$4; isize=$5
out=${6:-/tmp/nvfp4cal-$mode}
rm -rf "$out" && mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TOKENIZERS_PARALLELISM=false
hidden=${HIDDEN:-2048}; heads=${HEADS:-32}; kv=${KV_HEADS:-4}; hd=${HEAD_DIM:-128}; topk=${TOP_K:-8}
args=(model=tiny_qwen3_moe model.dtype=bfloat16 +model.device=cuda model.config.hidden_size=$hidden
      model.config.moe_intermediate_size=$isize model.config.num_experts=$experts model.config.num_experts_per_tok=$topk
      model.config.num_hidden_layers=$layers model.config.num_attention_heads=$heads model.config.num_key_value_heads=$kv
      model.config.head_dim=$hd recipe=nvfp4_experts_only_mse_fp8_cast_kv data.num_samples=64 data.seq_len=512
      report.perplexity=false trainer.enable_progress_bar=false ${EXTRA:-})
summary() {
  python3 - "$1" "$2" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
st = r["stages"]
print(sys.argv[2], "|", ", ".join(f"{k} {v['seconds']:.2f}s" for k, v in st.items()))
print(sys.argv[2], "| sweep", r.get("sweep"), "| GPU peak per rank (GiB)", r.get("gpu_peak_gib_per_rank"),
      "| rank-0 peaks", {k: v.get("gpu_peak_gib") for k, v in st.items()})
if "sharding" in r:
    sh = r["sharding"]
    print(sys.argv[2], "| parameters held per rank (GiB)", [round(b / 2**30, 2) for b in sh["param_bytes_per_rank"]],
          "of", round(sh["param_bytes"] / 2**30, 2))
print(sys.argv[2], "| export", {k: v for k, v in r["exports"][0]["seconds"].items()}, "files", len(r["exports"][0]["files"]))
PY
}
if [ "$mode" = ddp ]; then
  t0=$(date +%s.%N)
  python3 -m nvfp4cal.calibrate "${args[@]}" data.batch_size=1 trainer=gpu export.dir="$out/one" \
      hydra.run.dir="$out/run_one" > "$out/one.log" 2>&1 || { tail -30 "$out/one.log"; exit 1; }
  t1=$(date +%s.%N)
  torchrun --standalone --nproc-per-node "$n" -m nvfp4cal.calibrate "${args[@]}" data.batch_size=1 trainer=ddp \
      trainer.accelerator=gpu trainer.devices="$n" export.dir="$out/ddp" hydra.run.dir="$out/run_ddp" \
      > "$out/ddp.log" 2>&1 || { tail -30 "$out/ddp.log"; exit 1; }
  t2=$(date +%s.%N)
  python3 -c "print(f\"wall: 1 GPU {$t1 - $t0:.1f} s, $n GPUs {$t2 - $t1:.1f} s (process start to exit)\")"
  summary "$out/run_one/report.json" "1 GPU"
  summary "$out/run_ddp/report.json" "$n GPUs ddp"
  same=1
  for f in "$out"/one/*.safetensors "$out"/one/*.json; do
    cmp -s "$f" "$out/ddp/$(basename "$f")" || { echo "DIFFERS: $(basename "$f")"; same=0; }
  done
  [ $same = 1 ] && echo "1 GPU and $n-GPU ddp checkpoints: byte-identical ($(ls "$out"/one | wc -l) files, $(du -sh "$out/one" | cut -f1))"
  rm -rf "$out/one" "$out/ddp"
else
  t0=$(date +%s.%N)
  torchrun --standalone --nproc-per-node "$n" -m nvfp4cal.calibrate "${args[@]}" +model.init=per_param \
      data.batch_size=8 trainer=fsdp trainer.accelerator=gpu trainer.devices="$n" export.dir="$out/fsdp" \
      hydra.run.dir="$out/run_fsdp" > "$out/fsdp.log" 2>&1 || { tail -40 "$out/fsdp.log"; exit 1; }
  t1=$(date +%s.%N)
  python3 -c "print(f\"wall: $n GPUs fsdp {$t1 - $t0:.1f} s (process start to exit)\")"
  summary "$out/run_fsdp/report.json" "$n GPUs fsdp"
  python3 -m nvfp4cal.cli.verify "$out/fsdp" | tail -3
  du -sh "$out/fsdp"
  rm -rf "$out/fsdp"
fi
