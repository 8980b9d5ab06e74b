"""`python -m nvfp4cal.verify`: passes our exports, names every kind of corruption."""

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_calibrate
from nvfp4cal.verify import verify

SMALL = ["data.num_samples=4", "data.seq_len=32", "data.batch_size=2", "data.eval_samples=2", "report.perplexity=false"]
L0 = "model.layers.0.block_sparse_moe.experts"


# tensor-name suffixes of the two layouts: (global scale, input scale)
NAMES = {
    "modelopt": ("weight_scale_2", "input_scale"),
    "compressed_tensors": ("weight_global_scale", "input_global_scale"),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify")
    run_calibrate(tmp, ["model=tiny_mixtral", "recipe=nvfp4_mse", "export.format=both", *SMALL])
    return {fmt: tmp / "ckpt" / fmt for fmt in NAMES}


@pytest.fixture(params=list(NAMES))
def fmt(request):
    return request.param


@pytest.fixture
def export(exports, fmt):
    return exports[fmt]


def _corrupt(export, tmp_path, fn):
    out = tmp_path / "bad"
    shutil.copytree(export, out)
    tensors = load_file(str(out / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(out / "model.safetensors"))
    return out


def test_our_export_passes(export):
    v = verify(export)
    assert v.ok, v.problems
    assert v.experts == {L0: 8, "model.layers.1.block_sparse_moe.experts": 8}
    r = subprocess.run([sys.executable, "-m", "nvfp4cal.verify", str(export)], capture_output=True, text=True)
    assert r.returncode == 0 and "OK" in r.stdout and "problems               0" in r.stdout


def _nan_byte(t):
    b = t[f"{L0}.2.w1.weight_scale"].view(torch.uint8).clone()
    b[0, 0] = 0x7F
    t[f"{L0}.2.w1.weight_scale"] = b.view(torch.float8_e4m3fn)


def _drop_expert(t):
    for k in [k for k in t if k.startswith(f"{L0}.5.")]:
        del t[k]


def _mismatch(t, g):
    t[f"{L0}.1.w3.{g}"] = t[f"{L0}.1.w3.{g}"] * 2


def _zero_input(t, i):
    k = f"model.layers.0.self_attn.q_proj.{i}"
    t[k] = torch.zeros_like(t[k])


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda t, g, i: _nan_byte(t), f"{L0}.2.w1: 1 NaN E4M3 byte(s) in weight_scale"),
        (lambda t, g, i: t.pop(f"{L0}.0.w2.{i}"), f"{L0}.0.w2: missing {L0}.0.w2.{{i}}"),
        (lambda t, g, i: _mismatch(t, g), f"{L0}.1: w1/w3 do not share {{g}}"),
        (lambda t, g, i: _drop_expert(t), f"{L0}: expert(s) [5] missing"),
        (lambda t, g, i: _zero_input(t, i), "model.layers.0.self_attn.q_proj.{i} is not finite float32 > 0"),
    ],
)
def test_corruptions_are_named(export, fmt, tmp_path, corrupt, message):
    g, i = NAMES[fmt]
    message = message.format(g=g, i=i)
    bad = _corrupt(export, tmp_path, lambda t: corrupt(t, g, i))
    v = verify(bad)
    assert any(message in p for p in v.problems), v.problems
    r = subprocess.run([sys.executable, "-m", "nvfp4cal.verify", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1 and message in r.stdout


def test_unlisted_plain_linear_is_a_problem(export, fmt, tmp_path):
    import json

    bad = tmp_path / "bad"
    shutil.copytree(export, bad)
    if fmt == "modelopt":
        cfg = json.loads((bad / "hf_quant_config.json").read_text())
        cfg["quantization"]["exclude_modules"].remove("model.layers.0.block_sparse_moe.gate")
        (bad / "hf_quant_config.json").write_text(json.dumps(cfg))
    else:
        cfg = json.loads((bad / "config.json").read_text())
        cfg["quantization_config"]["ignore"].remove("model.layers.0.block_sparse_moe.gate")
        (bad / "config.json").write_text(json.dumps(cfg))
    assert any("block_sparse_moe.gate: unquantized weight not listed" in p for p in verify(bad).problems)


def test_compressed_tensors_config_is_checked(exports, tmp_path):
    import json

    bad = tmp_path / "bad"
    shutil.copytree(exports["compressed_tensors"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["format"] = "float-quantized"
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 32
    (bad / "config.json").write_text(json.dumps(cfg))
    problems = verify(bad).problems
    assert any("format is 'float-quantized'" in p for p in problems), problems
    assert any("group_0: weights are not FP4 with group_size 16" in p for p in problems), problems
