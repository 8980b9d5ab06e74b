"""Data-parallel calibration with torchrun on CPU (gloo): same checkpoint bytes as one process."""

import json

import pytest

from helpers import one_process, torchrun
from nvfp4cal.numerics.comm import RunContext

# the torchrun tests share one pytest-xdist worker: two at once would run 4-6 ranks on 2 cores
pytestmark = pytest.mark.xdist_group("torchrun")

COMMON = [
    "model=tiny_qwen3_moe",
    "recipe=nvfp4_mlp_only_mse_fp8_cast_kv",
    "data.num_samples=4",
    "data.seq_len=16",
    "data.batch_size=1",
    "data.eval_samples=1",
    "trainer.enable_progress_bar=false",
]


def test_ddp_export_is_byte_identical_to_one_process(tmp_path):
    one = one_process(tmp_path, COMMON, "one")
    two = torchrun(tmp_path, [*COMMON, f"export.dir={tmp_path}/two"])
    assert two.returncode == 0, two.stderr[-3000:]
    for f in ("model.safetensors", "hf_quant_config.json", "config.json"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    # every rank used one run directory (named for the launch, not the clock)
    runs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1 and (runs[0] / "report.json").is_file(), runs
    assert two.stdout.count("nvfp4cal: tiny_qwen3_moe") == 1  # only rank 0 summarizes
    # the evaluation sets are scored once (rank 0), to one process's figures
    ev = json.loads((runs[0] / "report.json").read_text())["evaluation"]
    assert set(ev) == set(one.report["evaluation"]) == {"corpus", "code"}
    for name, e in one.report["evaluation"].items():
        for key in ("kl_mean", "top1_agreement"):
            assert ev[name][key] == pytest.approx(e[key], rel=1e-4, abs=1e-7), (name, key)
        assert ev[name]["perplexity"]["quantized"] == pytest.approx(e["perplexity"]["quantized"], rel=1e-5)


def test_a_failing_rank_fails_the_run(tmp_path):
    """ddp; under fsdp, test_sharded.py::test_fsdp_names_a_nan_weight_in_one_line fails rank 1 alone."""
    trainer = "ddp"
    r = torchrun(tmp_path, [*COMMON, f"export.dir={tmp_path}/x"], trainer, NVFP4CAL_FAIL_ON_RANK="1")
    assert r.returncode != 0
    assert "rank 1 fails on purpose" in r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "var, value, want",
    [
        ("TORCHELASTIC_RUN_ID", "abc", "run-abc"),
        ("SLURM_JOB_ID", "77", "slurm-77-0"),
    ],
)
def test_launch_id(monkeypatch, var, value, want):
    from nvfp4cal.calibrate import launch_id

    for v in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "SLURM_JOB_ID", "SLURM_STEP_ID"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, value)
    assert launch_id() == want


def test_sweep_work_is_balanced_by_blocks():
    class World:
        def __init__(self, n):
            self.rank, self.world = 0, n

    def balance(sizes, n):
        return RunContext(comm=World(n)).split(sizes)

    # the experts-only layout: gate_up (2x) and down (1x) alternate - round robin gave one rank 2/3
    sizes = [2, 1] * 48
    owner = balance(sizes, 2)
    loads = [sum(s for s, r in zip(sizes, owner, strict=True) if r == k) for k in range(2)]
    assert loads == [72, 72]
    assert balance(sizes, 2) == owner  # the same answer on every rank
    assert sorted(set(balance([5, 3, 3, 1], 3))) == [0, 1, 2]
    assert balance([4, 4], 1) == [0, 0]


def test_ddp_gptq_sums_the_hessians_of_both_ranks(tmp_path):
    """GPTQ on Hessian-swept scales under ddp: each rank's Hessians summed before the rounding, so the
    checkpoint is the one process's up to the order of the fp32 sums (a rank rounding with its own
    half of the tokens would change far more codes)."""
    import torch

    from nvfp4cal.checkpoint.reload import read_tensors

    args = [*COMMON, "+model.init=per_param", "recipe=nvfp4_experts_only_gptq_fp8_cast_kv", "calibration=layerwise",
            "calibration.propagate=quantized", "recipe.algorithm.min_tokens=1"]  # fmt: skip
    one = one_process(tmp_path, args, "one")
    two = torchrun(tmp_path, [*args, f"export.dir={tmp_path}/two"])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_tensors(tmp_path / "one"), read_tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    packed = [k for k in a if a[k].dtype == torch.uint8 and k.endswith(".weight")]
    differ = sum(int((a[k] != b[k]).sum()) for k in packed)
    total = sum(a[k].numel() for k in packed)
    assert packed and differ <= total // 100, (differ, total)
    assert one.report["gptq"]["weights"] > 0


def test_ddp_layerwise_tuning_is_byte_identical_to_one_process(tmp_path):
    """calibration=layerwise under ddp (each rank its own samples' activations, statistics reduced per layer)
    with layer-output tuning of the experts and recipe.algorithm.step_batches=2: each rank takes one of its
    own batches a step, which hold the rows of one process's two batches, and the gradients are summed across
    ranks. With one row per batch the ranks' batches are one process's batches, summed in the same order:
    the same checkpoint bytes (batches of several rows: the same up to the order of fp32 sums). One process
    with one batch a step (the control) moves 31% of the codes."""
    import torch

    from nvfp4cal.checkpoint.reload import read_tensors

    args = [*COMMON, "+model.init=per_param", "recipe=nvfp4_experts_only_tune_fp8_cast_kv",
            "recipe.algorithm.iterations=20", "recipe.algorithm.eval_every=2", "recipe.algorithm.validation=0.5",
            "recipe.algorithm.min_tokens=1", "recipe.algorithm.step_batches=2"]  # fmt: skip
    one_process(tmp_path, args, "one")
    single = one_process(tmp_path, [*args, "recipe.algorithm.step_batches=1"], "single")
    two = torchrun(tmp_path, [*args, f"export.dir={tmp_path}/two"])
    assert two.returncode == 0, two.stderr[-3000:]
    for f in ("model.safetensors", "hf_quant_config.json", "config.json"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    assert not (tmp_path / "two.layerwise").exists()
    a, c = read_tensors(tmp_path / "one"), read_tensors(tmp_path / "single")
    packed = [k for k in a if a[k].dtype == torch.uint8 and k.endswith(".weight")]
    total = sum(a[k].numel() for k in packed)
    assert single.report["tune"]["layers"] and sum(int((a[k] != c[k]).sum()) for k in packed) > total // 10
