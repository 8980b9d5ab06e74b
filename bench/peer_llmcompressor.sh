#!/usr/bin/env bash
# llm-compressor's NVFP4 RTN / MSE-observer / GPTQ on the dense default model, judged by our reader
# beside our own recipes (same calibration and held-out tokens):   bash bench/peer_llmcompressor.sh [OUT]
# llm-compressor goes into its own venv (.cache/peers/llmcompressor), never the project's.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-/tmp/nvfp4cal-peers}"
VENV=.cache/peers/llmcompressor
if [ ! -f "$VENV/.ready" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "torch==2.13.0+cpu"   # the CPU wheel first: no CUDA build pulled in
  "$VENV/bin/python" -m pip install -q "llmcompressor==0.14.0.1"
  touch "$VENV/.ready"
fi
mkdir -p "$OUT"
.venv/bin/python bench/quality.py --dump-tokens "$OUT/tokens.safetensors"
MODEL=$(.venv/bin/python -c "from nvfp4cal.model.packaged import smollm2_dir; print(smollm2_dir('.cache'))")
"$VENV/bin/python" bench/peer_llmcompressor.py "$MODEL" "$OUT/tokens.safetensors" "$OUT/llmcompressor"
.venv/bin/python bench/quality.py --keep "$OUT/nvfp4cal" --out "$OUT/ours.md"
.venv/bin/python bench/quality.py --out "$OUT/judged.md" --judge "$OUT"/nvfp4cal/* "$OUT"/llmcompressor/*/
