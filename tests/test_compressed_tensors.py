"""The compressed-tensors layout, proven by compressed-tensors itself (a pinned test dependency).

* Dense: transformers + compressed-tensors load our export and decompress it on the first forward.
  Its weights and W4A16 logits equal, bit for bit, those of our own reload of the export (the
  layout dequantizes ``e2m1 * (byte / global_scale)``; our fake quant ``e2m1 * (byte * scale_2)``
  is the same up to one bf16 ulp), and its W4A4 logits are close to our fake-quant model's: compressed-tensors' activation emulation computes the block
  amax / 6 in the activation's dtype (bf16) before the FP8 rounding, we (like the engines'
  kernels) in fp32, so about 1-2% of activation blocks get a neighbouring FP8 scale. On fp32
  inputs the two activation quantizations agree to the ulp.
* MoE: transformers mis-scales per-expert NVFP4 weights on load (huggingface/transformers#48371),
  so every module is decompressed with the ``nvfp4-pack-quantized`` compressor directly.
* ``export.format=both``: the two layouts hold the same nibbles and block-scale bytes, and
  compressed-tensors' own ModelOpt converter turns our modelopt export into our compressed-tensors
  export, tensor for tensor.
"""

import json
import shutil

import pytest
import torch

from helpers import run_calibrate, tiny_config
from nvfp4cal.checkpoint.reload import dequantized, read_tensors, rebuild_model
from nvfp4cal.cli.verify import verify
from nvfp4cal.model.quantizers import QuantLinear, set_mode
from nvfp4cal.model.view import model_tensors, quant_sources, saved_layout, take
from nvfp4cal.numerics import nvfp4

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import forward_quantize  # noqa: E402

SMALL = ["data.num_samples=4", "data.seq_len=32", "data.batch_size=2", "data.eval_samples=2", "report.perplexity=false"]


def _bf16_params(model):
    """The calibrated model back in its bf16 weights (the run computes in fp32 on CPU); the
    quantizers' statistics are buffers and stay fp32."""
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ct_dense")
    r = run_calibrate(
        tmp, ["model=tiny_llama", "model.dtype=bfloat16", "recipe=nvfp4_mse", "export.format=both", *SMALL]
    )
    return tmp / "ckpt", _bf16_params(r.model)


def test_both_layouts_hold_the_same_quantized_bytes(dense):
    ckpt, _ = dense
    mo, ctt = read_tensors(ckpt / "modelopt"), read_tensors(ckpt / "compressed_tensors")
    packed = [k.removesuffix(".weight_packed") for k in ctt if k.endswith(".weight_packed")]
    assert len(packed) == 7 * tiny_config("tiny_llama")["num_hidden_layers"]  # q, k, v, o, gate, up, down
    for m in packed:
        assert torch.equal(ctt[f"{m}.weight_packed"], mo[f"{m}.weight"])
        assert torch.equal(ctt[f"{m}.weight_scale"].view(torch.uint8), mo[f"{m}.weight_scale"].view(torch.uint8))
        assert ctt[f"{m}.weight_global_scale"].shape == (1,) and ctt[f"{m}.input_global_scale"].shape == (1,)
        assert torch.equal(ctt[f"{m}.weight_global_scale"], 1 / mo[f"{m}.weight_scale_2"].reshape(1))
        assert torch.equal(ctt[f"{m}.input_global_scale"], 1 / mo[f"{m}.input_scale"].reshape(1))
    qc = json.loads((ckpt / "compressed_tensors" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "nvfp4-pack-quantized" and qc["quantization_status"] == "compressed"
    assert qc["config_groups"]["group_0"]["input_activations"]["dynamic"] == "local"
    assert qc["ignore"] == ["lm_head"] and qc["kv_cache_scheme"] is None
    assert verify(ckpt / "compressed_tensors").ok


def test_transformers_loads_the_dense_export(dense):
    from transformers import AutoModelForCausalLM

    ckpt, ours = dense
    theirs = AutoModelForCausalLM.from_pretrained(ckpt / "compressed_tensors").eval()
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    set_mode(ours, "quant")
    with torch.no_grad():
        w4a4_ours, w4a4_theirs = ours(ids).logits, theirs(ids).logits  # decompresses on first forward
    set_mode(ours, "off")
    with torch.no_grad():
        original = ours(ids).logits
    set_mode(ours, "quant")
    theirs_mods = dict(theirs.named_modules())
    rebuilt = rebuild_model(ckpt / "compressed_tensors", dtype=torch.bfloat16)
    rebuilt_mods = dict(rebuilt.named_modules())
    lin = [(n, m) for n, m in ours.named_modules() if isinstance(m, QuantLinear) and m.weight_quantizer is not None]
    assert len(lin) == 7 * tiny_config("tiny_llama")["num_hidden_layers"]
    acts = {}
    hooks = [m.register_forward_pre_hook(lambda _, a, n=n: acts.__setitem__(n, a[0])) for n, m in lin]
    with torch.no_grad():
        ours(ids)
    for h in hooks:
        h.remove()
    for n, m in lin:
        t = theirs_mods[n]
        assert t.weight.dtype == torch.bfloat16
        assert torch.equal(t.weight, rebuilt_mods[n].weight), n  # the layout's own dequantization
        # our in-memory fake quant: the same up to one bf16 ulp (byte * s2 vs byte / gs before the cast)
        torch.testing.assert_close(t.weight, m.weight_quantizer.fake_quant(m.weight), rtol=2**-7, atol=0)
        # on fp32 inputs the activation quantization picks the same codes and FP8 scales (a different
        # code or scale byte is >= 6% off); values differ by a few ulps (byte / gs vs byte * s2)
        x = acts[n].float()
        ref = nvfp4.fake_quantize_dynamic(x, m.input_quantizer.input_scale())
        got = forward_quantize(t, x, "input", t.quantization_scheme.input_activations)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=0, msg=n)
    # W4A4: closer to ours than ours is to the unquantized model (measured: 0.50x the quantization
    # error; the bf16 scale rounding moves ~1.5% of activation blocks to a neighbouring FP8 scale,
    # and a 2-layer random model passes that on). A wrong global scale would be many times off.
    err, qerr = (w4a4_ours - w4a4_theirs).float().norm(), (w4a4_ours - original).float().norm()
    assert err < 0.75 * qerr, (err, qerr)
    # W4A16: bit for bit against our reload of the export, close to our in-memory model
    for n, _ in lin:
        rebuilt_mods[n].input_quantizer.mode = "off"
        theirs_mods[n].quantization_scheme = QuantizationScheme(
            targets=["Linear"], weights=theirs_mods[n].quantization_scheme.weights
        )
        dict(ours.named_modules())[n].input_quantizer.mode = "off"
    with torch.no_grad():
        w4a16 = theirs(ids).logits
        assert torch.equal(rebuilt(ids).logits, w4a16)
        torch.testing.assert_close(ours(ids).logits, w4a16, rtol=0.02, atol=0.02)


def test_modelopt_converter_gives_our_compressed_tensors_export(dense, tmp_path):
    from compressed_tensors.entrypoints.convert.convert_checkpoint import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter

    ckpt, _ = dense
    src = tmp_path / "modelopt_1d"
    shutil.copytree(ckpt / "modelopt", src)
    # The converter wants the scalar scales as shape [1]; engines read our 0-d scalars, so the
    # reshape happens here in the test, not in the product.
    t = {k: (v.reshape(1) if v.dim() == 0 else v) for k, v in read_tensors(src).items()}
    from safetensors.torch import save_file

    save_file(t, str(src / "model.safetensors"))
    excluded = json.loads((src / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    conv = ModelOptNvfp4Converter(ignore=excluded, targets=["Linear"])
    convert_checkpoint(src, tmp_path / "converted", conv, max_workers=1, device="cpu")
    theirs, ours = read_tensors(tmp_path / "converted"), read_tensors(ckpt / "compressed_tensors")
    assert set(theirs) == set(ours)
    for k in ours:
        assert torch.equal(theirs[k].view(torch.uint8), ours[k].view(torch.uint8)), k


def test_moe_experts_decompress_to_our_weights(tmp_path):
    r = run_calibrate(
        tmp_path,
        ["model=tiny_qwen3_moe", "model.dtype=bfloat16", "recipe=nvfp4_mlp_only_mse_fp8_cast_kv", *SMALL]
        + ["export.format=compressed_tensors"],
    )
    ckpt = tmp_path / "ckpt"
    assert verify(ckpt).ok
    tensors = read_tensors(ckpt)
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(**qc["config_groups"]["group_0"])
    compressor = BaseCompressor.get_value_from_registry("nvfp4-pack-quantized")
    model = _bf16_params(r.model)
    quant, _ = quant_sources(model)
    dequant, _, _ = dequantized(tensors)
    n = 0
    for out_name, sl in saved_layout(model, model_tensors(model)).items():
        if sl.param not in quant:
            continue
        src, w = quant[sl.param], model.get_parameter(sl.param)
        ours = take(src.weight.fake_quant(w.transpose(-1, -2) if src.transposed else w), sl)
        prefix = out_name.removesuffix(".weight")
        state = {k.removeprefix(prefix + "."): v for k, v in tensors.items() if k.startswith(prefix + ".")}
        assert set(state) == {"weight_packed", "weight_scale", "weight_global_scale", "input_global_scale"}
        theirs = compressor.decompress(state, scheme)["weight"]
        assert torch.equal(theirs, dequant[out_name].to(theirs.dtype)), prefix  # the layout's dequantization
        torch.testing.assert_close(theirs, ours, rtol=2**-7, atol=0)  # in-memory: up to one bf16 ulp
        n += 1
    assert n == 2 * 3 * 8  # layers x (gate, up, down) x experts
    assert {k.rsplit(".", 1)[-1] for k in tensors if k.endswith(("k_scale", "v_scale"))} == {"k_scale", "v_scale"}
    assert all(".self_attn." in k for k in tensors if k.endswith(("k_scale", "v_scale")))
    assert qc["kv_cache_scheme"]["num_bits"] == 8
