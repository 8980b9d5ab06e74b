"""The Python API runs what the CLI runs: the same checkpoint bytes for the same inputs."""

import json

import pytest
import torch

import nvfp4cal
from helpers import CONF, SMALL, run_calibrate, tiny_config
from nvfp4cal.model.loaders import build_tiny
from nvfp4cal.numerics.errors import UserError
from nvfp4cal.recipe import build_recipe
from nvfp4cal.texts import pydoc_texts

TEXTS = list(pydoc_texts()["text"][:40])
SIZES = {"num_samples": 6, "seq_len": 32, "batch_size": 2}
QUIET = ["trainer.enable_progress_bar=false", "data.eval_samples=2"]


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _tiny():
    loaded = build_tiny("LlamaConfig", tiny_config("tiny_llama"), seed=0, name="tiny_llama")
    return loaded.model, loaded.tokenizer


def test_api_and_cli_write_the_same_checkpoint(tmp_path):
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    run_calibrate(
        tmp_path / "cli", ["model=tiny_llama", "recipe=nvfp4_mse", "data=text", f"data.source.path={data}", *SMALL]
    )
    model, tok = _tiny()
    res = nvfp4cal.quantize(model, tok, "nvfp4_mse", TEXTS, **SIZES, export_dir=tmp_path / "api", overrides=QUIET)
    assert _files(tmp_path / "cli" / "ckpt") == _files(tmp_path / "api")
    assert res.report["perplexity"]["quantized"] > 1 and res.report["given"] == ["model", "data.source"]
    assert nvfp4cal.verify(tmp_path / "api").ok


def test_export_later_equals_export_during_the_run(tmp_path):
    model, tok = _tiny()
    res = nvfp4cal.quantize(model, tok, "nvfp4_max", TEXTS, **SIZES, export_dir=tmp_path / "during", overrides=QUIET)
    later = nvfp4cal.export(res.model, tmp_path / "later", format="both", tokenizer=tok)
    assert [e["format"] for e in later] == ["modelopt", "compressed_tensors"]
    assert _files(tmp_path / "during") == _files(tmp_path / "later" / "modelopt")
    nvfp4cal.set_mode(res.model, "quant")  # the calibrated model computes what the export computes
    ids = torch.randint(0, 200, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(res.model(ids).logits).all()


def test_recipes_as_names_files_and_objects_and_data_as_datasets(tmp_path):
    import datasets

    model, tok = _tiny()
    ds = datasets.Dataset.from_dict({"text": TEXTS})
    a = nvfp4cal.quantize(model, tok, CONF / "recipe" / "nvfp4_mse.yaml", ds, **SIZES, export_dir=tmp_path / "a",
                          overrides=QUIET)  # fmt: skip
    model, tok = _tiny()
    recipe = build_recipe("mine", rules=["*", {"pattern": "*lm_head*", "enable": False}], algorithm={"method": "mse"})
    b = nvfp4cal.quantize(model, tok, recipe, TEXTS, **SIZES, export_dir=tmp_path / "b", overrides=QUIET)
    assert a.report["recipe"] == "nvfp4_mse" and b.report["recipe"] == "mine"
    st = lambda d: {k: v for k, v in _files(d).items() if k.endswith(".safetensors")}  # noqa: E731
    assert st(tmp_path / "a") == st(tmp_path / "b")  # the same rules, the same tensors
    model, tok = _tiny()
    none = nvfp4cal.quantize(model, tok, "nvfp4_max", TEXTS, **SIZES, run_dir=tmp_path / "run", overrides=QUIET)
    assert none.report["exports"] == [] and (tmp_path / "run" / "report.json").is_file()


def test_api_mistakes_are_named():
    model, tok = _tiny()
    with pytest.raises(UserError, match="tokenizer"):
        nvfp4cal.quantize(model)
    with pytest.raises(UserError, match="list must hold strings"):
        nvfp4cal.quantize(model, tok, data=[1, 2])
    with pytest.raises(UserError, match="is not a file"):
        nvfp4cal.quantize(model, tok, recipe="/no/such/recipe.yaml")


def test_a_mixed_format_recipe_object_from_python(tmp_path):
    """Formats per rule through the API: attention FP8, the rest NVFP4; both layouts verify."""
    model, tok = _tiny()
    recipe = build_recipe("mix", rules=[{"pattern": "*"}, {"pattern": "*self_attn*", "format": "fp8"},
                                        {"pattern": "*lm_head*", "enable": False}])  # fmt: skip
    res = nvfp4cal.quantize(model, tok, recipe=recipe, data=TEXTS, export_dir=tmp_path / "mo", **SIZES, overrides=QUIET)
    nvfp4cal.export(res, tmp_path / "ct", format="compressed_tensors")  # a RunResult: its tokenizer and dtypes
    assert (tmp_path / "ct" / "tokenizer_config.json").is_file()
    for d in ("mo", "ct"):
        v = nvfp4cal.verify(tmp_path / d)
        assert v.ok and len(v.fp8) == 4 * tiny_config("tiny_llama")["num_hidden_layers"] and v.quantized, v.problems


def test_gptq_from_python_runs_layer_by_layer_on_the_model_given(tmp_path):
    """recipe=nvfp4_gptq on a model object: read layer by layer from memory, and whole again afterwards."""
    model, tok = _tiny()
    res = nvfp4cal.quantize(model, tok, recipe="nvfp4_gptq", data=TEXTS, export_dir=tmp_path / "ckpt", **SIZES,
                            overrides=[*QUIET, "recipe.algorithm.min_tokens=1"])  # fmt: skip
    assert res.report["gptq"]["weights"] > 0 and nvfp4cal.verify(tmp_path / "ckpt").ok
    assert not any(p.is_meta for p in res.model.parameters())
    nvfp4cal.set_mode(res.model, "quant")
    out = res.model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(out).all()


def test_a_loaded_model_keeps_its_name_and_tokenizer(tmp_path, capsys):
    """What a loader returns goes to quantize as it is: the summary names the model as the command does."""
    from hydra.utils import instantiate

    from helpers import compose

    loaded = instantiate(compose(["model=tiny_qwen3_moe"]).model, _convert_="all")
    res = nvfp4cal.quantize(loaded, recipe="nvfp4_experts_only_imatrix_mse_fp8_cast_kv", data=TEXTS, **SIZES,
                            overrides=QUIET)  # fmt: skip
    assert res.report["model"] == "tiny_qwen3_moe" and res.report["sweep"]["method"] == "imatrix_mse"
    out = capsys.readouterr()
    assert "tiny_qwen3_moe with nvfp4_experts_only_imatrix_mse_fp8_cast_kv" in out.out
    assert "GPU available" not in out.out + out.err and "litlogger" not in out.out + out.err
