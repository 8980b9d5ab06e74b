"""Shared fixtures: offline mode, a writable datasets cache, composing the real Hydra config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run under the interpreter on CPU. It must be on before anything imports triton
# (knobs are read once); NVFP4CAL_GPU_TESTS=1 runs the kernels compiled on a GPU instead.
if os.environ.get("NVFP4CAL_GPU_TESTS") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
RECIPES = sorted(p.stem for p in (CONF / "recipe").glob("*.yaml"))
TINY_MODELS = sorted(p.stem for p in (CONF / "model").glob("tiny_*.yaml"))


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "hf_datasets_cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("NVFP4CAL_CACHE", str(tmp_path_factory.getbasetemp() / "nvfp4cal_cache"))


def compose(overrides: list[str]):
    """The real config (conf/calibrate.yaml) with overrides, as the CLI would build it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="calibrate", overrides=overrides)


def run_calibrate(tmp_path: Path, overrides: list[str]):
    """Run the pipeline in-process on the composed config; returns its RunResult."""
    from nvfp4cal.calibrate import run

    out = tmp_path / "ckpt"
    cfg = compose([f"export.dir={out}", "trainer.enable_progress_bar=false", *overrides])
    return run(cfg, tmp_path / "run")
