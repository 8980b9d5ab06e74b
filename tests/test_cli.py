"""The command line: a user's mistake is one line on stderr and exit code 2, never a traceback."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT


def _cli(tmp_path, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "nvfp4cal.calibrate", f"hydra.run.dir={tmp_path}/run", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (["model=hf", "model.path=/no/such/dir"], "model.path /no/such/dir is not a directory"),
        (["model=hf"], "missing value for model.path"),
        (["model=tiny_llama", "recipe=nvfp4_max", "data=text", "data.path=/no/such/*.txt"], "matches no file"),
        (["model=tiny_llama", "recipe=nvfp4_max", "data.num_samples=0"], "data.num_samples must be >= 1"),
        (["model=tiny_llama", "recipe.algorithm.method=awq"], "algorithm.method 'awq' unknown"),
        (["model=tiny_llama", "+recipe.rules.0.enabled=true"], "unknown key(s) ['enabled']"),
        (["model=tiny_llama", "export.format=gguf"], "export.format='gguf' unknown"),
        (["model=tiny_llama", "trainer.devices=abc"], "`devices` selected with `CPUAccelerator` should be an int"),
        (
            ["model=tiny_gpt_oss", "recipe=nvfp4_max", "export.format=both"],
            "experts saved fused (GPT-OSS) have no compressed_tensors layout",
        ),
    ],
)
def test_user_errors_are_one_line(tmp_path, args, message):
    r = _cli(tmp_path, *args)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("nvfp4cal: error:")]
    assert len(err) == 1 and message in err[0], r.stderr[-2000:]


def test_existing_export_is_never_overwritten(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("earlier result")
    small = ["model=tiny_llama", "recipe=nvfp4_max", "data.num_samples=2", "data.seq_len=16", f"export.dir={out}"]
    r = _cli(tmp_path, *small)
    assert r.returncode == 2 and "already exists" in r.stderr and "export.overwrite=true" in r.stderr
    assert (out / "keep.txt").read_text() == "earlier result"
    r = _cli(tmp_path, *small, "export.overwrite=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert "checkpoint :" in r.stdout and "dead experts" in r.stdout and "stage times" in r.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.")]  # no temp dirs left
