"""Tiny models through the whole pipeline; the export reloads bit-exactly and runs like the fake-quant model."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import nvfp4cal
from helpers import (
    RECIPES,
    SMALL,
    WHOLE_MODEL_RECIPES,
    check_round_trip,
    compose,
    run_calibrate,
)
from nvfp4cal.model.experts import QuantExpertsMixin
from nvfp4cal.model.quantizers import QuantLinear, set_mode
from nvfp4cal.numerics import nvfp4
from nvfp4cal.numerics.errors import UserError


@pytest.mark.parametrize("recipe", WHOLE_MODEL_RECIPES)
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen3_moe"])
def test_calibrate_export_reload(tmp_path, model, recipe):
    if model == "tiny_llama" and recipe.startswith("nvfp4_experts_only"):
        with pytest.raises(UserError, match="matches no quantizable module"):
            run_calibrate(tmp_path, [f"model={model}", f"recipe={recipe}", *SMALL])
        return
    res = run_calibrate(tmp_path, [f"model={model}", f"recipe={recipe}", *SMALL])
    ckpt = tmp_path / "ckpt"
    assert (tmp_path / "run" / "report.json").is_file()
    assert res.report["quantized"] > 0
    cfg = json.loads((ckpt / "config.json").read_text())
    hq = json.loads((ckpt / "hf_quant_config.json").read_text())
    formats = sorted(res.report["exports"][0]["formats"])
    algos = {"nvfp4": "NVFP4", "nvfp4_w4a16": "W4A16_NVFP4", "fp8": "FP8"}
    want = "MIXED_PRECISION" if len(formats) > 1 else algos[formats[0]]
    assert cfg["quantization_config"]["quant_method"] == "modelopt"
    assert hq["quantization"]["quant_algo"] == cfg["quantization_config"]["quant_algo"] == want
    assert "NVFP4" not in want or hq["quantization"]["group_size"] == 16
    assert "lm_head" in hq["quantization"]["exclude_modules"]
    assert (hq["quantization"]["kv_cache_quant_algo"] == "FP8") == recipe.endswith("fp8_cast_kv")
    check_round_trip(res, ckpt)


def test_export_tensors_layout(tmp_path):
    run_calibrate(tmp_path, ["model=tiny_mixtral", "recipe=nvfp4_mse", *SMALL])
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        p = "model.layers.0.block_sparse_moe.experts.3"
        w1, s1 = f.get_tensor(f"{p}.w1.weight"), f.get_tensor(f"{p}.w1.weight_scale")
        assert w1.dtype == torch.uint8 and w1.shape == (32, 32)  # [I, H/2]
        assert s1.dtype == torch.float8_e4m3fn and s1.shape == (32, 4)  # [I, H/16]
        for leaf in ("weight_scale_2", "input_scale"):
            t = f.get_tensor(f"{p}.w1.{leaf}")
            assert t.dtype == torch.float32 and t.shape == () and torch.isfinite(t) and t > 0
        # gate (w1) and up (w3) share weight_scale_2; q/k/v share theirs
        assert torch.equal(f.get_tensor(f"{p}.w1.weight_scale_2"), f.get_tensor(f"{p}.w3.weight_scale_2"))
        q = "model.layers.1.self_attn"
        s2 = [f.get_tensor(f"{q}.{x}_proj.weight_scale_2") for x in "qkv"]
        assert torch.equal(s2[0], s2[1]) and torch.equal(s2[1], s2[2])
        assert f.get_tensor("model.layers.0.block_sparse_moe.gate.weight").dtype == torch.float32
        assert "lm_head.weight" in keys and f.get_tensor("lm_head.weight").dtype == torch.float32
        for k in keys:
            if k.endswith("weight_scale"):
                assert ((f.get_tensor(k).view(torch.uint8) & 0x7F) != 0x7F).all()


def test_fp8_kv_scales_written(tmp_path):
    run_calibrate(tmp_path, ["model=tiny_qwen3_moe", "recipe=nvfp4_experts_only_mse_fp8_cast_kv", *SMALL])
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.k_proj.k_scale").item() == 1.0
        assert f.get_tensor("model.layers.0.self_attn.v_proj.v_scale").item() == 1.0
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.float32  # attention not NVFP4


def test_calibration_does_not_change_outputs(tmp_path):
    """During max calibration (mode calib) the model computes exactly the unquantized logits."""
    from hydra.utils import instantiate

    from nvfp4cal.model.insert import insert_quantizers

    cfg = compose(["model=tiny_qwen3_moe", "recipe=nvfp4_mse"])
    ref = instantiate(cfg.model, _convert_="all").model
    ref.set_experts_implementation("eager")
    m = instantiate(cfg.model, _convert_="all").model
    insert_quantizers(m, instantiate(cfg.recipe, _convert_="all"))
    set_mode(m, "calib")
    ids = torch.randint(0, 200, (2, 24))
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert all(float(mod.gate_up_input.amax.max()) > 0 for mod in m.modules() if isinstance(mod, QuantExpertsMixin))


def test_dead_experts_are_bootstrapped(tmp_path):
    """More experts than routed token slots: every expert still ends calibrated."""
    over = [
        "model=tiny_qwen3_moe",
        "model.config.num_experts=32",
        "recipe=nvfp4_mlp_only_mse_fp8_cast_kv",
        "data.num_samples=1",
        "data.seq_len=8",
        "data.batch_size=1",
        "data.eval_samples=1",
    ]
    res = run_calibrate(tmp_path, over)
    dead = [e for layer in res.report["experts"] for e in layer["experts"]]
    assert len(dead) >= 16  # 8 tokens x top-2 reach at most 16 of 32 experts per layer
    for m in res.model.modules():
        if isinstance(m, QuantExpertsMixin):
            for q in (m.gate_up_input, m.down_input):
                assert (q.amax > 0).all() and torch.isfinite(q.amax).all()
            for wq in (m.gate_up_weight, m.down_weight):
                assert (wq.global_amax > 0).all() and (wq.block_amax > 0).any(-1).all()
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        for layer in res.report["experts"]:
            base = layer["module"]
            for e in layer["experts"]:
                g = f.get_tensor(f"{base}.{e}.gate_proj.weight_scale_2")
                assert torch.equal(g, f.get_tensor(f"{base}.{e}.up_proj.weight_scale_2"))
                for p in ("gate_proj", "up_proj", "down_proj"):
                    s = f.get_tensor(f"{base}.{e}.{p}.input_scale")
                    assert torch.isfinite(s) and s > 0
    check_round_trip(res, tmp_path / "ckpt")


def test_mse_sweep_lowers_weight_error(tmp_path):
    res_max = run_calibrate(tmp_path / "a", ["model=tiny_llama", "recipe=nvfp4_max", *SMALL])
    res_mse = run_calibrate(tmp_path / "b", ["model=tiny_llama", "recipe=nvfp4_mse", *SMALL])

    def err(model):
        tot = 0.0
        for m in model.modules():
            if isinstance(m, QuantLinear) and m.weight_quantizer is not None:
                tot += (m.weight_quantizer.fake_quant(m.weight) - m.weight).pow(2).sum().item()
        return tot

    assert err(res_mse.model) < err(res_max.model)
    assert res_mse.report["sweep"]["kernel"] == ["reference"]


def test_odd_in_features_stay_unquantized(tmp_path):
    res = run_calibrate(tmp_path, ["model=tiny_llama", "model.config.intermediate_size=72", "recipe=nvfp4_max", *SMALL])
    assert res.report["excluded_shape"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    hq = json.loads((tmp_path / "ckpt" / "hf_quant_config.json").read_text())
    assert "model.layers.0.mlp.down_proj" in hq["quantization"]["exclude_modules"]
    check_round_trip(res, tmp_path / "ckpt")


def test_scale_bytes_match_fake_quant(tmp_path):
    res = run_calibrate(tmp_path, ["model=tiny_llama", "recipe=nvfp4_mse", *SMALL])
    m = res.model.model.layers[0].mlp.down_proj
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        sc = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
        s2 = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale_2")
    want = nvfp4.block_scales(m.weight_quantizer.block_amax, m.weight_quantizer.scale_2())
    assert torch.equal(sc.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(s2, m.weight_quantizer.scale_2())


def test_default_trainer_uses_what_the_machine_has(tmp_path, caplog):
    """trainer=auto (the default): the GPU when CUDA is available, else the CPU, and the log says which."""
    import logging

    assert compose([]).trainer.accelerator == "auto"
    with caplog.at_level(logging.INFO, logger="nvfp4cal"):
        res = run_calibrate(tmp_path, ["model=tiny_llama", "recipe=nvfp4_max", *SMALL])
    where = "GPU" if torch.cuda.is_available() else "CPU"
    assert any(f"calibrating on the {where}" in r.getMessage() and "auto" in r.getMessage() for r in caplog.records)
    assert res.report["quantized"] > 0


def test_environment_that_changes_a_run_is_in_its_report(tmp_path, monkeypatch):
    monkeypatch.setenv("NVFP4CAL_KERNEL", "reference")
    res = run_calibrate(tmp_path, ["model=tiny_llama", "recipe=nvfp4_mse", "recipe.algorithm.kernel=triton", *SMALL])
    assert res.report["environment"]["NVFP4CAL_KERNEL"] == "reference"
    assert res.report["sweep"]["kernel"] == ["reference"]  # the variable won over the recipe, and says so


def test_progress_bars_follow_the_trainer(tmp_path, capsys):
    """``trainer.enable_progress_bar`` governs every bar of the run, the sweep's and the export's too."""
    run_calibrate(tmp_path / "quiet", ["model=tiny_llama", "recipe=nvfp4_mse", *SMALL])  # bars off
    err = capsys.readouterr().err
    assert "MSE sweep" not in err and "export:" not in err
    run_calibrate(
        tmp_path / "shown", ["model=tiny_llama", "recipe=nvfp4_mse", *SMALL, "trainer.enable_progress_bar=true"]
    )
    err = capsys.readouterr().err
    assert "MSE sweep" in err and "export:" in err


def test_mixed_chat_and_prose_sources_from_the_command_line(tmp_path, monkeypatch):
    """data=mix: a chat file rendered with the template and the embedded prose, by weight; the report says
    how much came from where."""
    rows = [{"messages": [{"role": "user", "content": f"hello {i} " * 30}]} for i in range(20)]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sources = (
        f"[{{name: chat, weight: 1, source: {{_target_: nvfp4cal.texts.local_texts, path: '{chat}', messages: true}}}},"
        " {name: prose, weight: 1, source: {_target_: nvfp4cal.texts.pydoc_texts}}]"
    )
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    from nvfp4cal.model import loaders as models

    tok = models.byte_tokenizer()
    tok.chat_template = template
    monkeypatch.setattr(models, "byte_tokenizer", lambda bos=False: tok)  # the tiny models' tokenizer, with a template
    res = run_calibrate(
        tmp_path, ["model=tiny_llama", "recipe=nvfp4_max", "data=mix", f"data.sources={sources}",
                   "data.chat_template=true", *SMALL],
    )  # fmt: skip
    st = res.report["data"]["sources"]
    assert (st["chat"]["calibration"], st["prose"]["calibration"]) == (3, 3)
    assert st["chat"]["texts"] == 20 and st["prose"]["texts"] > 0


@pytest.mark.parametrize("recipe", RECIPES)
def test_gemma3_every_recipe_both_layouts(tmp_path, recipe):
    """Gemma 3 (1 KV head, q/k norms, sliding and global attention, tied embeddings, rows led by BOS)
    through every shipped recipe, in whichever schedule the recipe needs: both layouts written and verified,
    the ModelOpt one reloaded bit-exactly. Experts-only recipes have nothing to quantize in a dense model."""
    args = ["model=tiny_gemma3", f"recipe={recipe}", "export.format=both", *SMALL]
    if "tune" in recipe:  # the layouts are tested here, not the tuning (tests/test_tune.py)
        args.append("recipe.algorithm.iterations=20")
    if "experts_only" in recipe:
        with pytest.raises(UserError, match="matches no quantizable module"):
            run_calibrate(tmp_path, args)
        return
    res = run_calibrate(tmp_path, args)
    assert res.report["data"]["sources"]["data"]["bos"] and (res.data.calib[:, 0] == res.tokenizer.bos_token_id).all()
    assert [e["format"] for e in res.report["exports"]] == ["modelopt", "compressed_tensors"]
    for e in res.report["exports"]:
        v = nvfp4cal.verify(e["dir"])
        assert v.ok and (v.quantized or v.fp8), v.problems
    check_round_trip(res, Path(res.report["exports"][0]["dir"]))


def test_a_chat_evaluation_set_is_rendered_with_the_chat_template(tmp_path, monkeypatch):
    """eval.sets.NAME from chat data (a messages column) is judged as the model reads chat: rendered with the
    tokenizer's template; without a template it is one line naming the set."""
    rows = [{"messages": [{"role": "user", "content": f"question {i} " * 20}, {"role": "assistant",
                                                                              "content": "answer " * 20}]}
            for i in range(10)]  # fmt: skip
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = f"{{source: {{_target_: nvfp4cal.texts.local_texts, path: '{chat}', messages: true}}, rows: 2, seq_len: 32}}"
    args = ["model=tiny_llama", "recipe=nvfp4_max", *SMALL, f"+eval.sets.chat={spec}"]
    with pytest.raises(UserError, match="eval.sets.chat holds chat messages but the tokenizer has no chat template"):
        run_calibrate(tmp_path / "plain", args)
    from nvfp4cal.model import loaders as models

    tok = models.byte_tokenizer()
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    monkeypatch.setattr(models, "byte_tokenizer", lambda bos=False: tok)
    res = run_calibrate(tmp_path / "chat", args)
    assert res.report["evaluation"]["chat"]["tokens"] == 2 * 31
