"""Every run writes report.json/md and plots; a multirun sweeps configs and tabulates."""

import json
import math
import os
import platform
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, run_calibrate
from nvfp4cal.cli.tabulate import main as tabulate

SMALL = ["data.num_samples=4", "data.seq_len=32", "data.batch_size=2", "data.eval_samples=2"]


def test_report_fields_and_plots(tmp_path):
    res = run_calibrate(
        tmp_path,
        [
            "model=tiny_qwen3_moe",
            "recipe=nvfp4_mse",
            "data.seq_len=8",
            "data.num_samples=1",
            "data.batch_size=1",
            "data.eval_samples=2",
        ],
    )
    run = tmp_path / "run"
    r = json.loads((run / "report.json").read_text())
    ppl = r["perplexity"]
    assert set(ppl) == {"original", "max_calibrated", "quantized"}
    assert all(math.isfinite(v) and v > 1 for v in ppl.values())
    assert r["objective"] == {"name": "quantized_ppl", "value": ppl["quantized"]}
    assert set(r["stages"]) == {
        "load",
        "insert",
        "plan",
        "data",
        "calibration",
        "bootstrap",
        "measure",
        "perplexity_max",
        "sweep",
        "measure_mse",
        "export",
        "evaluate",
    }
    for s in r["stages"].values():
        assert s["seconds"] >= 0 and s["cpu_peak_rss_gib"] > 0
    assert len(r["weights"]) == r["quantized"]
    for w in r["weights"].values():
        assert math.isfinite(w["max"]["sqnr_db"]) and math.isfinite(w["mse"]["sqnr_db"])
        assert w["mse"]["rel_mse"] <= w["max"]["rel_mse"] + 1e-12  # the sweep never loses to max
    assert any(e["experts"] for e in r["experts"]) and all(len(e["tokens"]) == 8 for e in r["experts"])
    for e in r["experts"]:  # per-expert input amaxes as calibrated: zero exactly for the dead experts
        amax = e["input_amax"]["gate_up_proj"]
        assert len(amax) == 8 and all((a == 0) == (i in e["experts"]) for i, a in enumerate(amax))
    assert r["versions"]["python"] == platform.python_version()  # the embedded texts come from it
    assert r["versions"]["torch"] and r["config"]["recipe"]["name"] == "nvfp4_mse"
    md = (run / "report.md").read_text()
    assert "perplexity, quantized" in md and "Worst 10 weights" in md and "Experts without calibration tokens" in md
    import matplotlib.image

    for png in ("sqnr_per_layer.png", "expert_tokens.png"):
        img = matplotlib.image.imread(run / png)
        assert img.shape[0] > 100 and img.shape[1] > 100
    assert res.report["plots"] == ["sqnr_per_layer.png", "expert_tokens.png"]


def test_max_recipe_without_perplexity(tmp_path):
    res = run_calibrate(
        tmp_path,
        ["model=tiny_llama", "recipe=nvfp4_max", "report.perplexity=false", "report.objective=total_seconds", *SMALL],
    )
    assert res.report["perplexity"] == {} and "evaluate" not in res.report["stages"]
    assert res.report["objective"]["value"] > 0
    assert res.report["plots"] == ["sqnr_per_layer.png"]  # dense: no expert heatmap


@pytest.mark.xdist_group("subprocess")  # one CLI process: its own worker, beside the torchrun group
def test_multirun_and_tabulate(tmp_path, capsys):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "nvfp4cal.calibrate",
        "-m",
        "model=tiny_llama",
        "recipe=nvfp4_max,nvfp4_mse",
        f"hydra.sweep.dir={tmp_path}/multi",
        "trainer.enable_progress_bar=false",
        *SMALL,
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "multi").iterdir() if p.is_dir()) == ["0", "1"]
    assert tabulate([str(tmp_path / "multi")]) == 0
    out = capsys.readouterr().out
    assert "nvfp4_max" in out and "nvfp4_mse" in out and out.count("\n") == 4  # header, rule, two runs
    assert (tmp_path / "multi" / "summary.md").read_text() == out


def test_weight_errors_leave_the_weights_alone():
    """The SQNR pass reads fp32 weights through views: it must never write into them."""
    from hydra.utils import instantiate

    from helpers import compose, tiny_config
    from nvfp4cal.evaluation.metrics import weight_errors
    from nvfp4cal.model.insert import insert_quantizers
    from nvfp4cal.numerics.comm import RunContext
    from nvfp4cal.recipe import build_recipe

    m = instantiate(compose(["model=tiny_llama"]).model, _convert_="all").model
    insert_quantizers(m, build_recipe("t", rules=["*"]))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for keep in (False, True):
        errors = weight_errors(m, RunContext.single(), keep=keep)
    layers = tiny_config("tiny_llama")["num_hidden_layers"]
    assert len(errors) == 7 * layers + 1 and all(
        e["sqnr_db"] > 10 for e in errors.values()
    )  # 7 Linear a layer, lm_head
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
