"""Our modelopt-layout exports, checked by code nvfp4cal did not write: compressed-tensors' ModelOpt
NVFP4 converter (the path vLLM users take to convert ModelOpt checkpoints) must accept them."""

import json

import pytest
import torch

from helpers import run_calibrate
from nvfp4cal.checkpoint.reload import read_tensors

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402

SMALL = ["data.num_samples=4", "data.seq_len=32", "data.batch_size=2", "data.eval_samples=2", "report.perplexity=false"]


@pytest.mark.parametrize(
    "model, recipe",
    [("tiny_llama", "nvfp4_mse"), ("tiny_qwen3_moe", "nvfp4_mlp_only_mse_fp8_cast_kv"), ("tiny_mixtral", "nvfp4_max")],
)
def test_compressed_tensors_modelopt_converter_accepts_our_export(tmp_path, model, recipe):
    run_calibrate(tmp_path, [f"model={model}", f"recipe={recipe}", *SMALL])
    ckpt = tmp_path / "ckpt"
    qc = json.loads((ckpt / "hf_quant_config.json").read_text())["quantization"]
    tensors = read_tensors(ckpt)
    # The converter expects the scalar scales as shape [1]; engines read our 0-d scalars, so the
    # reshape happens here in the test, not in the product.
    tensors = {k: (v.reshape(1) if v.dim() == 0 else v) for k, v in tensors.items()}
    kv = (
        QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False)
        if qc["kv_cache_quant_algo"]
        else None
    )
    conv = ModelOptNvfp4Converter(ignore=qc["exclude_modules"], targets=["Linear"], kv_cache_scheme=kv)
    out = conv.validate(dict(tensors))  # raises on orphan qparams, wrong dtypes, missing scales
    packed = [k for k in out if k.endswith(".weight_packed")]
    assert len(packed) == sum(1 for k, v in tensors.items() if k.endswith(".weight") and v.dtype == torch.uint8)
    for k in packed:
        m = k.removesuffix(".weight_packed")
        assert torch.equal(out[f"{m}.weight_global_scale"], 1 / tensors[f"{m}.weight_scale_2"])
        assert torch.equal(out[f"{m}.input_global_scale"], 1 / tensors[f"{m}.input_scale"])
