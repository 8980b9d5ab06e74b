"""More than one format per checkpoint: NVFP4 W4A4, NVFP4 weight-only (``nvfp4_w4a16``) and FP8 W8A8
(``fp8``), uniform or mixed by rules, in both layouts: verified, reloaded bit-exactly to the
fake-quant weights and logits, read by transformers + compressed-tensors."""

import json

import pytest
import torch

from helpers import check_round_trip, check_round_trip_divided, fake_quant_weights, run_calibrate
from nvfp4cal.checkpoint.reload import rebuild_model
from nvfp4cal.cli.verify import verify
from nvfp4cal.numerics import nvfp4
from nvfp4cal.numerics.errors import UserError

SMALL = ["data.num_samples=4", "data.seq_len=32", "data.batch_size=2", "data.eval_samples=2", "report.perplexity=false"]
ATTN_FP8_MLP_W4A16 = [  # a dense mix: attention FP8, MLP NVFP4 weight-only
    "recipe=nvfp4_mse",
    "recipe.rules=[{pattern: '*', enable: true, format: nvfp4_w4a16}, {pattern: '*self_attn*', format: fp8},"
    " {pattern: '*lm_head*', enable: false}]",
]


def _round_trip(res, ckpt, layout):
    """modelopt: bit-exact weights and logits; compressed-tensors: NVFP4 to the last fp32 bit (it
    divides by its global scales), FP8 weights exactly."""
    if layout == "modelopt":
        return check_round_trip(res, ckpt)
    check_round_trip_divided(res, ckpt)
    params = dict(rebuild_model(ckpt, dtype=torch.float32).named_parameters())
    fq = fake_quant_weights(res.model)
    for m in verify(ckpt).fp8:
        assert torch.equal(params[f"{m}.weight"], fq[f"{m}.weight"]), m


def _qc(ckpt):
    return json.loads((ckpt / "config.json").read_text())["quantization_config"]


def test_fp8_numerics():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 3
    s = nvfp4.fp8_scale(x.abs().amax())
    assert torch.equal(s, x.abs().amax() / 448)
    q = nvfp4.fp8_fake_quantize(x, s)
    assert torch.equal(nvfp4.fp8_fake_quantize(q, s), q)  # on the grid: idempotent
    assert (q.abs().amax() - x.abs().amax()).abs() <= 1e-6 * x.abs().amax()  # the amax is exact (448 * s)
    assert (q - x).abs().max() <= x.abs().amax() / 448 * 16  # E4M3 keeps 3 mantissa bits
    assert nvfp4.fp8_quantize(x, s).dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("layout", ["modelopt", "compressed_tensors"])
def test_experts_nvfp4_attention_fp8_mixed_checkpoint(tmp_path, layout):
    res = run_calibrate(tmp_path, ["model=tiny_qwen3_moe", "recipe=nvfp4_experts_fp8_attention_mse_fp8_cast_kv",
                                   f"export.format={layout}", *SMALL])  # fmt: skip
    ckpt = tmp_path / "ckpt"
    v = verify(ckpt)
    assert v.ok, v.problems
    assert v.fp8 and all("self_attn" in m for m in v.fp8) and all("experts" in m for m in v.quantized)
    qc = _qc(ckpt)
    if layout == "modelopt":
        hq = json.loads((ckpt / "hf_quant_config.json").read_text())["quantization"]
        assert hq["quant_algo"] == qc["quant_algo"] == "MIXED_PRECISION"
        layers = hq["quantized_layers"]
        assert qc["quantized_layers"] == layers and qc["kv_cache_scheme"]["num_bits"] == 8
        assert {e["quant_algo"] for m, e in layers.items() if "self_attn" in m} == {"FP8"}
        assert {e["quant_algo"] for m, e in layers.items() if "experts" in m} == {"NVFP4"}
        assert set(layers) == set(v.fp8) | set(v.quantized)
    else:
        assert qc["format"] == "mixed-precision" and len(qc["config_groups"]) == 2
        fmts = {g["format"] for g in qc["config_groups"].values()}
        assert fmts == {"float-quantized", "nvfp4-pack-quantized"}
    _round_trip(res, ckpt, layout)
    assert res.report["exports"][0]["formats"] == {"fp8": len(v.fp8), "nvfp4": len(v.quantized)}


@pytest.mark.parametrize("layout", ["modelopt", "compressed_tensors"])
def test_uniform_fp8_checkpoint(tmp_path, layout):
    """Only FP8 layers: a plain FP8 checkpoint (ModelOpt quant_algo FP8; one float-quantized group)."""
    rules = "[{pattern: '*', format: fp8}, {pattern: '*lm_head*', enable: false}]"
    res = run_calibrate(tmp_path, ["model=tiny_llama", "recipe=nvfp4_max", f"recipe.rules={rules}",
                                   f"export.format={layout}", *SMALL])  # fmt: skip
    ckpt = tmp_path / "ckpt"
    v = verify(ckpt)
    assert v.ok, v.problems
    assert v.fp8 and not v.quantized
    qc = _qc(ckpt)
    if layout == "modelopt":
        assert qc["quant_algo"] == "FP8"
        assert json.loads((ckpt / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "FP8"
    else:
        assert qc["format"] == "float-quantized" and qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    check_round_trip(res, ckpt)  # FP8 is the same in both layouts: bit-exact
    # q/k/v and gate/up share one FP8 weight scale (engines fuse them)
    from nvfp4cal.checkpoint.reload import read_tensors

    t = read_tensors(ckpt)
    p = "model.layers.0.self_attn"
    assert torch.equal(t[f"{p}.q_proj.weight_scale"], t[f"{p}.v_proj.weight_scale"])


def test_weight_only_nvfp4_and_mix_with_fp8(tmp_path):
    res = run_calibrate(tmp_path, ["model=tiny_llama", *ATTN_FP8_MLP_W4A16, "export.format=compressed_tensors",
                                   *SMALL])  # fmt: skip
    ckpt = tmp_path / "ckpt"
    v = verify(ckpt)
    assert v.ok, v.problems
    from nvfp4cal.checkpoint.reload import read_tensors

    t = read_tensors(ckpt)
    mlp = [m for m in v.quantized if ".mlp." in m]
    assert mlp and not any(f"{m}.input_global_scale" in t for m in mlp)  # weight-only: no input scale
    groups = {g["format"]: g for g in _qc(ckpt)["config_groups"].values()}
    assert groups["nvfp4-pack-quantized"]["input_activations"] is None
    _round_trip(res, ckpt, "compressed_tensors")


def test_transformers_reads_fp8_and_weight_only_nvfp4(tmp_path):
    """transformers + compressed-tensors load the mixed export on CPU and decompress every module to
    what our reader reads (FP8: ``byte * scale``; NVFP4A16: ``e2m1 * byte / global_scale``)."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from nvfp4cal.checkpoint.reload import rebuild_model

    run_calibrate(tmp_path, ["model=tiny_llama", "model.dtype=bfloat16", *ATTN_FP8_MLP_W4A16,
                             "export.format=compressed_tensors", *SMALL])  # fmt: skip
    ckpt = tmp_path / "ckpt"
    theirs = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ids = torch.randint(0, 250, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs(ids)  # decompresses on the first forward
    rebuilt = dict(rebuild_model(ckpt, dtype=torch.bfloat16).named_modules())
    mods = dict(theirs.named_modules())
    names = [n for n in rebuilt if n.endswith(("q_proj", "o_proj", "gate_proj", "down_proj"))]
    assert names
    for n in names:
        torch.testing.assert_close(mods[n].weight.float(), rebuilt[n].weight.float(), rtol=2**-7, atol=0, msg=n)


def test_weight_only_in_the_modelopt_layout(tmp_path):
    """ModelOpt's W4A16_NVFP4: uniform (quant_algo, no input scales) and per layer in a mix."""
    res = run_calibrate(tmp_path / "u", ["model=tiny_qwen3_moe", "recipe=nvfp4_w4a16_mse", *SMALL])
    ckpt = tmp_path / "u" / "ckpt"
    assert verify(ckpt).ok
    qc = _qc(ckpt)
    assert qc["quant_algo"] == "W4A16_NVFP4" and qc["config_groups"]["group_0"]["input_activations"] is None
    from nvfp4cal.checkpoint.reload import read_tensors

    assert not [k for k in read_tensors(ckpt) if k.endswith("input_scale")]
    check_round_trip(res, ckpt)
    res = run_calibrate(tmp_path / "m", ["model=tiny_llama", *ATTN_FP8_MLP_W4A16, *SMALL])
    ckpt = tmp_path / "m" / "ckpt"
    assert verify(ckpt).ok
    qc = _qc(ckpt)
    assert qc["quant_algo"] == "MIXED_PRECISION" and "quantization" not in qc  # flat: where vLLM reads it
    assert {e["quant_algo"] for e in qc["quantized_layers"].values()} == {"FP8", "W4A16_NVFP4"}
    check_round_trip(res, ckpt)


def test_a_fused_group_in_two_formats_is_an_error(tmp_path):
    rules = "[{pattern: '*'}, {pattern: '*q_proj', format: fp8}, {pattern: '*lm_head*', enable: false}]"
    with pytest.raises(UserError, match="q_proj/k_proj/v_proj are fused by engines.*different formats"):
        run_calibrate(tmp_path, ["model=tiny_llama", "recipe=nvfp4_max", f"recipe.rules={rules}", *SMALL])


def test_fp8_experts_are_refused(tmp_path):
    rules = "[{pattern: '*.experts.*', format: fp8}]"
    with pytest.raises(UserError, match="format fp8 is for Linear modules"):
        run_calibrate(tmp_path, ["model=tiny_qwen3_moe", "recipe=nvfp4_max", f"recipe.rules={rules}", *SMALL])


def test_verify_catches_a_format_the_config_does_not_say(tmp_path):
    run_calibrate(tmp_path, ["model=tiny_qwen3_moe", "recipe=nvfp4_experts_fp8_attention_mse_fp8_cast_kv", *SMALL])
    ckpt = tmp_path / "ckpt"
    for f in ("hf_quant_config.json",):
        hq = json.loads((ckpt / f).read_text())
        layer = next(m for m in hq["quantization"]["quantized_layers"] if "self_attn" in m)
        hq["quantization"]["quantized_layers"][layer] = {"quant_algo": "NVFP4", "group_size": 16}
        (ckpt / f).write_text(json.dumps(hq))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["quantized_layers"] = hq["quantization"]["quantized_layers"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    v = verify(ckpt)
    assert any(f"{layer}: FP8 tensors but the config says format nvfp4" in p for p in v.problems), v.problems
