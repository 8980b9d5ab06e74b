#!/usr/bin/env bash
# The pipeline on one GPU, plain and through trainer=ddp devices=1, on a random-weight Mixtral with the
# default model's shapes (hidden 576, 8 experts of 1536; LAYERS layers), recipe nvfp4_mse, bf16.
# Prints each run's stage times and checks the two checkpoints are byte-identical.
# Usage (GPU machine): bash bench/pipeline_gpu.sh [LAYERS] [OUT_DIR]
set -euo pipefail
layers=${1:-16}
out=${2:-/tmp/nvfp4cal-bench}
rm -rf "$out"
model=(model=tiny_mixtral model.dtype=bfloat16 model.config.hidden_size=576 model.config.intermediate_size=1536
       model.config.num_hidden_layers=$layers model.config.head_dim=64 model.config.num_attention_heads=9
       model.config.num_key_value_heads=3 recipe=nvfp4_mse data.num_samples=64 data.seq_len=256 data.batch_size=8
       trainer.enable_progress_bar=false)
python3 -m nvfp4cal.calibrate "${model[@]}" trainer=gpu export.dir="$out/gpu" hydra.run.dir="$out/run_gpu" > "$out.gpu.log" 2>&1
python3 -m nvfp4cal.calibrate "${model[@]}" trainer=ddp trainer.accelerator=gpu trainer.devices=1 \
    export.dir="$out/ddp" hydra.run.dir="$out/run_ddp" > "$out.ddp.log" 2>&1
for r in gpu ddp; do
  python3 - "$out/run_$r/report.json" "$r" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
st = r["stages"]
print(sys.argv[2], "stages:", ", ".join(f"{k} {v['seconds']:.2f}s" + (f" (GPU peak {v['gpu_peak_gib']:.2f} GiB)" if 'gpu_peak_gib' in v else "") for k, v in st.items()))
print(sys.argv[2], "perplexity:", r["perplexity"], "sweep:", r.get("sweep"))
PY
done
python3 bench/same_tensors.py "$out/gpu" "$out/ddp"  # the same tensors byte for byte (early-written shard files may differ)
