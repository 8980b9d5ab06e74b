"""calibration=layerwise: one decoder layer at a time gives the whole-model checkpoint, byte for byte;
it resumes after a failure and refuses to resume with other settings."""

import json

import pytest
import torch

from helpers import DENSE_FAMILIES, MOE_FAMILIES, SMALL, WHOLE_MODEL_RECIPES, run_calibrate
from nvfp4cal.checkpoint.reload import read_tensors
from nvfp4cal.cli.verify import verify
from nvfp4cal.numerics.errors import UserError

# weights drawn per parameter from seeds, on the device the run computes on (trainer=auto), in both modes
DATA = ["+model.init=per_param", "data.num_samples=6", "data.seq_len=32", "data.batch_size=2", "data.eval_samples=2"]
DATA += ["+model.device=cuda"] if torch.cuda.is_available() else []


def _same(a, b):
    """Checkpoint ``b`` holds ``a``'s tensors byte for byte and the same config and tokenizer files (on a
    CPU every file is equal; a GPU whole-model run writes its unquantized tensors into shards of their own)."""
    if sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir()):  # one layout of files: all equal
        for p in a.iterdir():
            assert p.read_bytes() == (b / p.name).read_bytes(), p.name
        return
    ta, tb = read_tensors(a), read_tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k].reshape(-1).view(torch.uint8), tb[k].reshape(-1).view(torch.uint8)), k
    meta = lambda d: {p.name: p.read_bytes() for p in d.iterdir() if "safetensors" not in p.name}  # noqa: E731
    assert meta(a) == meta(b)


def _pair(tmp_path, model, recipe, *layerwise):
    base = [f"model={model}", f"recipe={recipe}", *DATA]
    whole = run_calibrate(tmp_path / "whole", base)
    lw = run_calibrate(tmp_path / "lw", [*base, "calibration=layerwise", *layerwise])
    return whole, lw


@pytest.mark.parametrize("model", [*DENSE_FAMILIES, *MOE_FAMILIES])
def test_every_family_matches_the_whole_model_run(tmp_path, model):
    whole, lw = _pair(tmp_path, model, "nvfp4_hessian_mse")
    _same(tmp_path / "whole" / "ckpt", tmp_path / "lw" / "ckpt")
    n_layers = lw.model.config.num_hidden_layers
    assert lw.report["layers_materialized_at_once"] == 1 and len(lw.report["layers"]) == n_layers
    assert lw.report["experts"] == whole.report["experts"]
    assert set(lw.report["weights"]) == set(whole.report["weights"])
    for name, errors in whole.report["weights"].items():  # (a GPU sums the squared errors in its own order)
        for key, e in errors.items():
            assert lw.report["weights"][name][key]["rel_mse"] == pytest.approx(e["rel_mse"], rel=1e-6), (name, key)
    assert not (tmp_path / "lw" / "ckpt.layerwise").exists()  # the progress goes once the checkpoint is written


def test_a_bf16_model_computed_in_fp32_matches_the_whole_model_run(tmp_path):
    """On a CPU both modes compute in fp32: each layer is drawn in bf16 (every time) and then upcast."""
    args = ["model=tiny_qwen3_moe", "recipe=nvfp4_mse", *DATA, "model.dtype=bfloat16"]
    run_calibrate(tmp_path / "whole", args)
    run_calibrate(tmp_path / "lw", [*args, "calibration=layerwise"])
    _same(tmp_path / "whole" / "ckpt", tmp_path / "lw" / "ckpt")


@pytest.mark.parametrize("recipe", [r for r in WHOLE_MODEL_RECIPES if r != "nvfp4_hessian_mse"])
def test_every_recipe_matches_the_whole_model_run(tmp_path, recipe):
    _pair(tmp_path, "tiny_qwen3_moe", recipe)
    _same(tmp_path / "whole" / "ckpt", tmp_path / "lw" / "ckpt")


def test_each_offload_matches_the_whole_model_run(tmp_path):
    run_calibrate(tmp_path / "whole", ["model=tiny_mixtral", "recipe=nvfp4_mse", *DATA])
    for where in ("auto", "cpu", "disk"):  # (gpu: the device's memory, on a CPU run the same as cpu)
        out = tmp_path / where
        r = run_calibrate(
            out,
            ["model=tiny_mixtral", "recipe=nvfp4_mse", *DATA, "calibration=layerwise", f"calibration.offload={where}"],
        )
        _same(tmp_path / "whole" / "ckpt", out / "ckpt")
        assert r.report["layers_materialized_at_once"] == 1


def test_a_failed_run_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    args = ["model=tiny_qwen3_moe", "recipe=nvfp4_experts_only_mse_fp8_cast_kv", *DATA, "calibration=layerwise"]
    run_calibrate(tmp_path / "whole", args[:2] + DATA)
    monkeypatch.setenv("NVFP4CAL_FAIL_AFTER_LAYER", "0")
    with pytest.raises(RuntimeError, match="stopping after layer 0 on purpose"):
        run_calibrate(tmp_path / "lw", args)
    state = tmp_path / "lw" / "ckpt.layerwise"
    assert json.loads((state / "progress.json").read_text())["done"] == 1
    assert not (tmp_path / "lw" / "ckpt").exists()  # nothing at the target
    monkeypatch.delenv("NVFP4CAL_FAIL_AFTER_LAYER")
    with pytest.raises(UserError, match="calibration.resume=true"):
        run_calibrate(tmp_path / "lw", args)  # an earlier run's progress is never overwritten
    other = ["model=tiny_qwen3_moe", "recipe=nvfp4_mse", *DATA, "calibration=layerwise", "calibration.resume=true"]
    with pytest.raises(UserError, match="made with another recipe"):
        run_calibrate(tmp_path / "lw", other)
    r = run_calibrate(tmp_path / "lw", [*args, "calibration.resume=true"])
    _same(tmp_path / "whole" / "ckpt", tmp_path / "lw" / "ckpt")
    assert [x["resumed"] for x in r.report["layers"]] == [True, False]  # only the unfinished layer ran again
    assert not state.exists()


def test_quantized_propagation_feeds_the_next_layer_w4a4_outputs(tmp_path):
    args = ["model=tiny_llama", "recipe=nvfp4_mse", *DATA, "calibration=layerwise"]
    run_calibrate(tmp_path / "plain", args)
    run_calibrate(tmp_path / "quant", [*args, "calibration.propagate=quantized"])
    a, b = read_tensors(tmp_path / "plain" / "ckpt"), read_tensors(tmp_path / "quant" / "ckpt")
    first = "model.layers.0.self_attn.q_proj.input_scale"
    second = "model.layers.1.self_attn.q_proj.input_scale"
    assert torch.equal(a[first], b[first])  # the first layer sees the same (embedding) inputs
    assert not torch.equal(a[second], b[second])  # the second one sees the first one's W4A4 outputs
    assert verify(tmp_path / "quant" / "ckpt").ok


def test_a_model_held_in_memory_runs_layer_by_layer(tmp_path):
    """A model that cannot be built on the meta device (here: a tiny model with transformers' init) is read
    layer by layer from memory: the same checkpoint as the whole-model run, and the model whole again."""
    args = ["model=tiny_llama", "recipe=nvfp4_mse", *SMALL]
    whole = run_calibrate(tmp_path / "whole", args)
    lw = run_calibrate(tmp_path / "lw", [*args, "calibration=layerwise"])
    _same(tmp_path / "whole" / "ckpt", tmp_path / "lw" / "ckpt")
    assert not any(p.is_meta for p in lw.model.parameters())
    wq = dict(whole.model.named_buffers())
    for n, t in lw.model.named_buffers():
        assert torch.equal(t, wq[n]), n


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen3_moe"])
def test_layerwise_runs_report_the_perplexity_the_whole_model_does(tmp_path, model):
    """Streamed layer by layer, the held-out perplexities of the original and the quantized model are the
    whole-model run's (unquantized propagation: the same checkpoint)."""
    args = [f"model={model}", "recipe=nvfp4_mse", *SMALL, "+model.init=per_param"]
    whole = run_calibrate(tmp_path / "whole", args).report["perplexity"]
    lw = run_calibrate(tmp_path / "lw", [*args, "calibration=layerwise"]).report["perplexity"]
    assert set(lw) == {"original", "quantized"}
    for k in lw:
        assert lw[k] == pytest.approx(whole[k], rel=1e-5), k
