"""The command line: a user's mistake is one line on stderr and exit code 2, never a traceback.

The messages are checked in-process (``helpers.user_message``: the line the entry point prints); one
subprocess keeps the exit-code contract of the real command.
"""

import os
import subprocess
import sys

import pytest

from helpers import run_calibrate, user_message


def _cli(tmp_path, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "nvfp4cal.calibrate", f"hydra.run.dir={tmp_path}/run", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (["model=hf", "model.path=/no/such/dir"], "model.path /no/such/dir is not a directory"),
        (["model=hf"], "missing value for model.path"),
        (["model=tiny_llama", "recipe=nvfp4_max", "data=text", "data.source.path=/no/such/*.txt"], "matches no file"),
        (["model=tiny_llama", "recipe=nvfp4_max", "data.num_samples=0"], "data.num_samples must be >= 1"),
        (["model=tiny_llama", "recipe.algorithm.method=awq"], "recipe.algorithm.method='awq' unknown"),
        (["model=tiny_llama", "+recipe.rules.0.enabled=true"], "unknown key(s) ['enabled']"),
        (["model=tiny_llama", "export.format=gguf"], "export.format='gguf' unknown"),
        (["model=tiny_llama", "+recipe.algorithm.fp8_scale_sweep=false"], "algorithm.fp8_scale_sweep is gone"),
        (["model=tiny_llama", "+export.shard_size=1"], "export: "),
        (["model=tiny_llama", "data=text"], "missing value for data.source.path"),
        (
            ["model=tiny_llama", "model._target_=nvfp4cal.models.build_tiny"],
            "model._target_: cannot import nvfp4cal.models.build_tiny",
        ),
        (["model=tiny_llama", "trainer.devices=abc"], "`devices` selected with `CPUAccelerator` should be an int"),
        (
            ["model=tiny_gpt_oss", "recipe=nvfp4_max", "export.format=both"],
            "experts saved fused (GPT-OSS) have no compressed_tensors layout",
        ),
    ],
)
def test_user_errors_are_one_line(tmp_path, args, message):
    assert message in user_message(tmp_path, args)


@pytest.mark.xdist_group("subprocess")  # one CLI process: its own worker, beside the torchrun group
def test_exit_code_and_one_line_and_nothing_overwritten(tmp_path, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("earlier result")
    small = ["model=tiny_llama", "recipe=nvfp4_max", "data.num_samples=2", "data.seq_len=16", f"export.dir={out}"]
    r = _cli(tmp_path, *small)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("nvfp4cal: error:")]
    assert len(err) == 1 and "already exists" in err[0] and "export.overwrite=true" in err[0], r.stderr[-2000:]
    assert (out / "keep.txt").read_text() == "earlier result"
    run_calibrate(tmp_path, [*small, "export.overwrite=true"])
    printed = capsys.readouterr().out
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert "checkpoint :" in printed and "dead experts" in printed and "stage times" in printed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.")]  # no temp dirs left


@pytest.mark.parametrize(
    "args, message",
    [
        (["recipe=nvfp4_nonexistent"], "recipe=nvfp4_nonexistent: no such option; nearest: nvfp4_mse"),
        (["recipe.algorithm.methd=mse"], "recipe.algorithm.methd=mse: no such key; nearest: recipe.algorithm.method"),
        (["data.path=/x"], "data.path=/x: no such key; keys of data: source,"),
        (["trainer=gpux"], "trainer=gpux: no such option; nearest: gpu"),
    ],
)
def test_unknown_options_and_keys_name_the_nearest(args, message):
    from nvfp4cal.calibrate import check_overrides

    msg = check_overrides(args)
    assert msg is not None and message in msg and "\n" not in msg
    assert check_overrides(["recipe=nvfp4_mse", "data.num_samples=8"]) is None
    assert check_overrides(["-m", "recipe=nvfp4_mse,nvfp4_max"]) is None  # multirun: Hydra's own


def test_data_is_checked_before_the_model_loads(tmp_path):
    """A bad data setting fails before any model is read (here the model path does not exist either:
    the data error comes first)."""
    bad_model = ["model=hf", "model.path=/no/such/model"]
    assert "data.num_samples must be >= 1" in user_message(tmp_path, [*bad_model, "data.num_samples=0"])
    missing = ["data=text", "data.source.path=/no/such/file.txt"]
    assert "matches no file" in user_message(tmp_path, [*bad_model, *missing])


@pytest.mark.xdist_group("subprocess")
def test_hydra_errors_exit_2_in_one_line_and_leave_no_folder(tmp_path):
    for args in (["recipe=nvfp4_nonexistent"], ["model=tiny_llama", "data.num_samples=0"]):
        r = _cli(tmp_path, *args)
        assert r.returncode == 2, r.stderr[-2000:]
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("nvfp4cal: error:"), r.stderr[-2000:]
        assert not (tmp_path / "run").exists()  # Hydra's run directory held only .hydra: removed
