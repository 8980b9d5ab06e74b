"""The embedded default model end to end (slow: minutes on 2 cores; `make test-all` or `pytest -m slow`)."""

import math

import pytest

from helpers import run_calibrate
from nvfp4cal.cli.verify import verify

pytestmark = pytest.mark.slow


def test_default_model_calibrates_and_exports(tmp_path):
    res = run_calibrate(tmp_path, ["data.num_samples=4", "data.seq_len=64", "data.eval_samples=2"])
    ppl = res.report["perplexity"]
    assert ppl["original"] < 100, ppl  # a real model: SmolLM2-135M on English/Python text
    assert math.isfinite(ppl["quantized"]) and ppl["quantized"] < 3 * ppl["original"]
    layers = res.model.config.num_hidden_layers
    assert res.report["quantized"] == 2 * layers  # the experts' gate_up and down in every layer
    assert verify(tmp_path / "ckpt").ok
