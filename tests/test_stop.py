"""SIGTERM / SIGINT stop a run where it is: a non-zero exit, one line saying where and how to go on,
nothing at the export target and no temporary directory; a layerwise run keeps only its progress."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import SMALL, compose
from nvfp4cal.calibrate import run, stop_message, stop_on_signals
from nvfp4cal.numerics.errors import RunStopped

ARGS = ["model=tiny_qwen3_moe", "recipe=nvfp4_mse", *SMALL, "report.perplexity=false"]


def _stopped(tmp_path, args) -> RunStopped:
    cfg = compose([f"export.dir={tmp_path}/ckpt", "trainer.enable_progress_bar=false", *args])
    with pytest.raises(RunStopped) as info, stop_on_signals():
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "ckpt").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]  # no temporary directory
    msg = stop_message(info.value, cfg)
    assert "\n" not in msg and f"nothing was written to {tmp_path}/ckpt" in msg
    return info.value


def _signal_in(monkeypatch, owner, attr: str, after_calls: int = 0):
    """Make ``owner.attr`` send this process SIGTERM right after its ``after_calls``-th call (0: before the first)."""
    original, calls = getattr(owner, attr), []

    def wrapped(*a, **kw):
        if not after_calls:
            signal.raise_signal(signal.SIGTERM)
        out = original(*a, **kw)
        calls.append(1)
        if len(calls) == after_calls:
            signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(owner, attr, wrapped)


def test_stop_during_calibration(tmp_path, monkeypatch):
    from nvfp4cal.lightning.module import CalibrationModule

    _signal_in(monkeypatch, CalibrationModule, "validation_step", after_calls=1)
    err = _stopped(tmp_path, ARGS)
    assert err.signum == signal.SIGTERM and err.where == "calibration"


def test_stop_during_the_sweep(tmp_path, monkeypatch):
    from nvfp4cal.algorithms import fp8_sweep

    _signal_in(monkeypatch, fp8_sweep, "mse_sweep")
    assert _stopped(tmp_path, ARGS).where == "sweep"


def test_stop_during_the_export(tmp_path, monkeypatch):
    from nvfp4cal.checkpoint import plan

    _signal_in(monkeypatch, plan, "write_groups", after_calls=1)  # a shard is on disk
    assert _stopped(tmp_path, [*ARGS, "export.max_shard_size_gb=0.00001"]).where == "export"


def test_stop_during_a_layerwise_run_keeps_only_its_progress(tmp_path, monkeypatch):
    from nvfp4cal.schedule.layer_state import LayerState

    _signal_in(monkeypatch, LayerState, "save", after_calls=1)
    args = [*ARGS, "+model.init=per_param", "calibration=layerwise", "calibration.offload=disk"]
    err = _stopped(tmp_path, args)
    assert err.where == "calibration"
    state = tmp_path / "ckpt.layerwise"
    assert json.loads((state / "progress.json").read_text())["done"] == 1
    assert sorted(p.name for p in state.iterdir()) == ["layer_00000.pt", "progress.json"]  # activations gone
    assert "calibration.resume=true" in stop_message(err, compose([*args, f"export.dir={tmp_path}/ckpt"]))


@pytest.mark.xdist_group("subprocess")  # one CLI process: its own worker, beside the torchrun group
def test_sigterm_from_outside_exits_with_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "nvfp4cal.calibrate",
        *ARGS,
        f"export.dir={tmp_path}/ckpt",
        f"hydra.run.dir={tmp_path}/run",
    ]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:  # wait until the run has started its work
        if "calibrating on the" in line:
            break
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
    lines = [x for x in err.splitlines() if x.startswith("nvfp4cal: stopped by SIGTERM")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.glob(".ckpt*"))
