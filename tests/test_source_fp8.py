"""Block-scaled FP8 source checkpoints (DeepSeek-V3 / Kimi-K2 style) are read as bf16 the way transformers
reads them: whole, row by row (fsdp, layerwise), and calibrated from."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run_calibrate, tiny_config
from nvfp4cal.cli.verify import verify
from nvfp4cal.model.loaders import CheckpointRows, build_tiny, load_hf
from nvfp4cal.numerics.comm import rows
from nvfp4cal.numerics.errors import UserError

BLOCK = [16, 16]


def _write_fp8(src_dir, out_dir):
    """Our tiny bf16 checkpoint rewritten in the FP8 format: Linear weights E4M3 with per-block
    ``weight_scale_inv`` (amax / 448), everything else as it was."""
    out_dir.mkdir()
    tensors = load_file(str(src_dir / "model.safetensors"))
    for k in list(tensors):
        w = tensors[k]
        if not (k.endswith("proj.weight") and w.dim() == 2):
            continue
        r, c = (w.shape[0] + BLOCK[0] - 1) // BLOCK[0], (w.shape[1] + BLOCK[1] - 1) // BLOCK[1]
        wf = torch.zeros(r * BLOCK[0], c * BLOCK[1])
        wf[: w.shape[0], : w.shape[1]] = w.float()
        amax = wf.reshape(r, BLOCK[0], c, BLOCK[1]).abs().amax(dim=(1, 3))
        scale = (amax / 448).clamp_min(1e-12)
        q = (wf / scale.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1))[: w.shape[0], : w.shape[1]]
        tensors[k] = q.to(torch.float8_e4m3fn)
        tensors[k + "_scale_inv"] = scale
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for f in src_dir.iterdir():
        if f.name != "model.safetensors":
            (out_dir / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": BLOCK}  # fmt: skip
    (out_dir / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp8")
    src = build_tiny("Qwen3MoeConfig", {**tiny_config("tiny_qwen3_moe"), "intermediate_size": 48}, dtype="bfloat16")
    src.model.save_pretrained(tmp / "bf16")
    src.tokenizer.save_pretrained(tmp / "bf16")
    _write_fp8(tmp / "bf16", tmp / "fp8")
    return tmp / "fp8"


def test_read_as_transformers_reads_it(fp8_dir):
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(fp8_dir).state_dict()  # on CPU: dequantized to bf16
    ours = load_hf(str(fp8_dir)).model.state_dict()
    assert set(theirs) == set(ours)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k
    # row by row (fsdp ranks, layer-by-layer reads): the same values for any split
    meta = load_hf(str(fp8_dir), sharded=True)
    assert isinstance(meta.fill, CheckpointRows)
    for name, p in meta.model.named_parameters():
        n = p.shape[0]
        for rank in range(3):
            a, b = rows(n, rank, 3)
            out = torch.empty((b - a, *p.shape[1:]), dtype=p.dtype)
            meta.fill(name, out, a, b, n)
            assert torch.equal(out, theirs[name][a:b]), (name, rank)


def test_calibrated_from_fp8_whole_and_layer_by_layer(tmp_path, fp8_dir):
    args = ["model=hf", f"model.path={fp8_dir}", "recipe=nvfp4_mse", "data.num_samples=4", "data.seq_len=32",
            "data.batch_size=2", "data.eval_samples=1"]  # fmt: skip
    run_calibrate(tmp_path / "whole", args)
    run_calibrate(tmp_path / "lw", [*args, "calibration=layerwise"])
    a, b = tmp_path / "whole" / "ckpt", tmp_path / "lw" / "ckpt"
    assert verify(a).ok
    for f in ("model.safetensors", "config.json", "hf_quant_config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    qc = json.loads((a / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "modelopt"  # the source's fp8 config is replaced, and named:
    assert qc["producer"]["source_quantization"] == {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": BLOCK}


def test_an_unknown_source_quantization_is_named(tmp_path, fp8_dir):
    other = tmp_path / "awq"
    other.mkdir()
    for f in fp8_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((other / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq"}
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="quant_method='awq' is not a source format"):
        load_hf(str(other))
