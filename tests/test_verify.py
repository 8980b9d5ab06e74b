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


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify")
    run_calibrate(tmp, ["model=tiny_mixtral", "recipe=nvfp4_mse", *SMALL])
    return tmp / "ckpt"


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


def _mismatch(t):
    t[f"{L0}.1.w3.weight_scale_2"] = t[f"{L0}.1.w3.weight_scale_2"] * 2


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_nan_byte, f"{L0}.2.w1: 1 NaN E4M3 byte(s) in weight_scale"),
        (lambda t: t.pop(f"{L0}.0.w2.input_scale"), f"{L0}.0.w2: missing {L0}.0.w2.input_scale"),
        (_mismatch, f"{L0}.1: w1/w3 do not share weight_scale_2"),
        (_drop_expert, f"{L0}: expert(s) [5] missing"),
        (
            lambda t: t.update({"model.layers.0.self_attn.q_proj.input_scale": torch.tensor(0.0)}),
            "model.layers.0.self_attn.q_proj.input_scale is not finite float32 > 0",
        ),
    ],
)
def test_corruptions_are_named(export, tmp_path, corrupt, message):
    bad = _corrupt(export, tmp_path, corrupt)
    v = verify(bad)
    assert any(message in p for p in v.problems), v.problems
    r = subprocess.run([sys.executable, "-m", "nvfp4cal.verify", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1 and message in r.stdout


def test_unlisted_plain_linear_is_a_problem(export, tmp_path):
    import json

    bad = tmp_path / "bad"
    shutil.copytree(export, bad)
    cfg = json.loads((bad / "hf_quant_config.json").read_text())
    cfg["quantization"]["exclude_modules"].remove("model.layers.0.block_sparse_moe.gate")
    (bad / "hf_quant_config.json").write_text(json.dumps(cfg))
    assert any("block_sparse_moe.gate: unquantized weight not listed" in p for p in verify(bad).problems)
