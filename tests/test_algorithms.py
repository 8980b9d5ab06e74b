"""Algorithms as objects: built from a recipe's keys, and whatever one changes persists in every schedule."""

from dataclasses import dataclass

import pytest
import torch

from helpers import SMALL, run_calibrate, same_tensors
from nvfp4cal.algorithms import METHODS, Algorithm, build_algorithm
from nvfp4cal.model.view import weight_quantizers
from nvfp4cal.recipe import RecipeError


@dataclass(frozen=True)
class ToyParams:
    kernel: str = "auto"
    factor: float = 0.75


class ToyShrink(Algorithm):
    """A toy weight-changing algorithm (tests only): every NVFP4 weight scaled by ``factor`` (off its grid:
    kept as tensors) and every norm weight shifted, after calibration."""

    method = "toy_shrink"
    Params = ToyParams
    changes_weights = True

    def after(self, unit, inputs, run):
        assert len(inputs) > 0 and all(isinstance(a, tuple) for a, _ in inputs)  # the unit's own inputs
        with torch.no_grad():
            for _, wq, w in weight_quantizers(unit.module):
                w.mul_(self.params.factor)
                wq.clear_cache()
            for name, p in unit.module.named_parameters():
                if "norm" in name and ".layers." in name:  # decoder layers only (the units of both schedules)
                    p.add_(0.125)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(METHODS, ToyShrink.method, ToyShrink)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen3_moe"])
def test_a_weight_changing_algorithm_persists_in_both_schedules(tmp_path, toy, model):
    args = [f"model={model}", "recipe=nvfp4_max", *SMALL, "report.perplexity=false", "+model.init=per_param"]
    toy_args = [*args, "recipe.algorithm.method=toy_shrink"]
    run_calibrate(tmp_path / "max", args)
    run_calibrate(tmp_path / "whole", toy_args)
    lw = run_calibrate(tmp_path / "lw", [*toy_args, "calibration=layerwise"])
    assert not same_tensors(tmp_path / "max" / "ckpt", tmp_path / "whole" / "ckpt")  # the toy changed the checkpoint
    assert same_tensors(tmp_path / "whole" / "ckpt", tmp_path / "lw" / "ckpt")  # and the layer state kept every change
    assert lw.report["algorithm"] == {"method": "toy_shrink", "kernel": "auto", "factor": 0.75}


def test_algorithm_keys_belong_to_their_method():
    assert build_algorithm("r", {"method": "gptq", "scales": "max"}).params.scales == "max"
    with pytest.raises(
        RecipeError, match=r"unknown key\(s\) \['scales'\].*method mse.*valid keys: \['method', 'kernel', 'headroom'\]"
    ):
        build_algorithm("r", {"method": "mse", "scales": "max"})
    with pytest.raises(
        RecipeError,
        match=r"method='awq' unknown; valid: \['max', 'mse', 'imatrix_mse', 'hessian_mse', 'gptq', 'tune'\]",
    ):
        build_algorithm("r", {"method": "awq"})
    # a sweep recipe's keys switched to max: the max row of the quality benchmark
    assert build_algorithm("r", {"method": "max", "kernel": "auto", "headroom": 1.0}).params.headroom == 1.0
    with pytest.raises(RecipeError, match=r"headroom must be in \[1, "):
        build_algorithm("r", {"method": "max", "headroom": 0.5})


def test_each_algorithm_says_what_it_needs():
    gptq = build_algorithm("r", {"method": "gptq"})
    assert gptq.needs.layerwise and gptq.needs.propagate == "quantized" and gptq.changes_weights
    assert gptq.hessian == "full" and build_algorithm("r", {"method": "hessian_mse"}).hessian == "block"
    plain = build_algorithm("r", {"method": "mse"})
    assert not plain.needs.layerwise and not plain.changes_weights and plain.hessian is None and plain.refines
    assert not build_algorithm("r", None).refines  # max
    tune = build_algorithm("r", {"method": "tune"})
    assert tune.needs.layerwise and tune.needs.reference and tune.changes_weights and tune.hessian == "block"
    assert build_algorithm("r", {"method": "tune", "start": "gptq"}).hessian == "full"
