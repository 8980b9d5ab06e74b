"""`python -m nvfp4cal.cli.verify`: passes our exports, names every kind of corruption."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run_calibrate
from nvfp4cal.cli.verify import verify

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
    r = subprocess.run([sys.executable, "-m", "nvfp4cal.cli.verify", str(export)], capture_output=True, text=True)
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
    r = subprocess.run([sys.executable, "-m", "nvfp4cal.cli.verify", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1 and message in r.stdout


def _edit_json(ckpt, name, fn):
    path = ckpt / name
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


def test_unlisted_plain_linear_is_a_problem(export, fmt, tmp_path):
    """Exclusions are checked where the engines read them: config.json's ``ignore`` in both layouts."""
    bad = tmp_path / "bad"
    shutil.copytree(export, bad)
    _edit_json(bad, "config.json", lambda c: c["quantization_config"]["ignore"].remove(f"{L0[:-8]}.gate"))
    problems = verify(bad).problems
    assert any("block_sparse_moe.gate: unquantized weight not listed" in p for p in problems), problems


def test_modelopt_config_json_is_what_engines_read(exports, tmp_path):
    ckpt = exports["modelopt"]
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    hq = json.loads((ckpt / "hf_quant_config.json").read_text())["quantization"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "NVFP4"
    assert qc["ignore"] == hq["exclude_modules"] and "lm_head" in qc["ignore"]
    assert qc["config_groups"]["group_0"]["input_activations"]["num_bits"] == 4  # W4A4, not weight-only

    # the form every earlier export had: exclusions only as exclude_modules, which vLLM does not read there
    old = tmp_path / "old"
    shutil.copytree(ckpt, old)

    def old_form(c):
        q = c["quantization_config"]
        c["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4", "exclude_modules": q["ignore"]}

    _edit_json(old, "config.json", old_form)
    problems = verify(old).problems
    assert any("has no 'ignore'" in p for p in problems), problems
    assert any("lm_head: unquantized weight not listed" in p for p in problems), problems

    # hf_quant_config.json (TensorRT-LLM) must list the same modules
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    _edit_json(other, "hf_quant_config.json", lambda c: c["quantization"]["exclude_modules"].remove("lm_head"))
    assert any("exclude_modules and config.json ignore" in p for p in verify(other).problems)

    # an FP8 KV cache announced in the legacy key only: vLLM would run the cache unquantized
    kv = tmp_path / "kv"
    shutil.copytree(ckpt, kv)
    _edit_json(kv, "config.json", lambda c: c["quantization_config"].update(kv_cache_quant_algo="FP8"))
    assert any("no FP8 kv_cache_scheme" in p for p in verify(kv).problems)


def test_architectures_are_checked(export, tmp_path):
    assert json.loads((export / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    for value, message in ((None, "no architectures list"), (["MixtralModel"], "name no causal-LM class")):
        bad = tmp_path / f"bad{value}"
        shutil.copytree(export, bad)
        _edit_json(bad, "config.json", lambda c, value=value: c.update(architectures=value))
        assert any(message in p for p in verify(bad).problems)


def test_compressed_tensors_config_is_checked(exports, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(exports["compressed_tensors"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["format"] = "float-quantized"
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 32
    (bad / "config.json").write_text(json.dumps(cfg))
    problems = verify(bad).problems
    assert any("format is 'float-quantized' but its config groups" in p for p in problems), problems
    assert any("group_0: weights are neither FP4 with group_size 16 nor FP8" in p for p in problems), problems
