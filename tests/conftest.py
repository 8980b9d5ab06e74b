"""Test environment: offline mode, Triton's interpreter on CPU, writable caches (shared helpers: helpers.py)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# under pytest-xdist (make test: one worker per core) each worker computes on one thread
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Triton kernels run under the interpreter on CPU. It must be on before anything imports triton
# (knobs are read once); NVFP4CAL_GPU_TESTS=1 runs the kernels compiled on a GPU instead.
if os.environ.get("NVFP4CAL_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "hf_datasets_cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("NVFP4CAL_CACHE", str(tmp_path_factory.getbasetemp() / "nvfp4cal_cache"))
