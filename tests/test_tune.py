"""Layer-output tuning (method: tune): the tunable fake quant is the plain one at its start and freezes into
weights the export packs exactly; zero iterations is the start, byte for byte; the kept iterate is never
worse than the start on the held-out batches; the export reloads to the tuned forward; a stopped run resumes
to the same bytes; every MoE family tunes its experts."""

import pytest
import torch

from helpers import MOE_FAMILIES, check_round_trip, run_calibrate, same_tensors
from nvfp4cal.algorithms import AlgorithmError, build_algorithm
from nvfp4cal.numerics import nvfp4
from nvfp4cal.numerics.tune import fixed_ratio, frozen, offset_fake_quantize, tuned_fake_quantize

SMALL = ["data.num_samples=8", "data.seq_len=32", "data.batch_size=2", "data.eval_samples=2"]
# step_tokens=64: one batch of SMALL's a step, as before step_tokens (its own test below)
FEW_ITERATIONS = ["recipe.algorithm.iterations=20", "recipe.algorithm.eval_every=2", "recipe.algorithm.min_tokens=1",
                  "recipe.algorithm.step_tokens=64"]  # fmt: skip


def _weights(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 32, 64, generator=g) * torch.rand(3, 32, 64, generator=g).pow(4) * 5  # heavy tails
    w[0, 0, :16] = 0.0  # an all-zero block
    w = w.to(dtype)
    blk = nvfp4.block_amax(w)
    s2 = nvfp4.scale_2(blk.flatten(-2).amax(-1))[:, None, None]
    return w, blk, s2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_start_is_plain_fake_quant_and_the_frozen_weights_are_the_tuned_values(dtype):
    w, blk, s2 = _weights(dtype)
    zero, one = torch.zeros(w.shape), torch.ones(blk.shape)
    assert torch.equal(tuned_fake_quantize(w, blk, s2, zero, one), nvfp4.fake_quantize(w, blk, s2))
    g = torch.Generator().manual_seed(1)
    v = torch.rand(w.shape, generator=g) - 0.5
    alpha = 0.5 + torch.rand(blk.shape, generator=g)
    tuned = tuned_fake_quantize(w, blk, s2, v, alpha)
    assert not torch.equal(tuned, nvfp4.fake_quantize(w, blk, s2))
    w2, blk2 = frozen(w, blk, s2, v, alpha)
    assert torch.equal(nvfp4.fake_quantize(w2, blk2, s2), tuned)  # what the export packs is what was tuned
    assert torch.equal(nvfp4.fake_quantize(w2, blk2, s2), w2)  # on the grid


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offsets_alone_from_the_fixed_ratio_equal_the_full_tuned_forward(dtype):
    """scale = 0: ``w / step`` is computed once per layer (fixed_ratio); the forward and the offsets'
    gradient equal tuned_fake_quantize's at alpha = 1 bit for bit."""
    w, blk, s2 = _weights(dtype)
    v = (torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) - 0.5).requires_grad_(True)
    full = tuned_fake_quantize(w, blk, s2, v, torch.ones(blk.shape))
    (full.float() * torch.linspace(-1, 1, w.shape[-1])).sum().backward()
    g_full, v.grad = v.grad.clone(), None
    alone = offset_fake_quantize(*fixed_ratio(w, blk, s2), v, w.dtype)
    (alone.float() * torch.linspace(-1, 1, w.shape[-1])).sum().backward()
    assert torch.equal(alone, full) and torch.equal(v.grad, g_full) and g_full.abs().sum() > 0


def test_gradients_pass_both_roundings():
    w, blk, s2 = _weights(torch.float32)
    v = torch.zeros(w.shape, requires_grad=True)
    alpha = torch.ones(blk.shape, requires_grad=True)
    tuned_fake_quantize(w, blk, s2, v, alpha).square().sum().backward()
    assert v.grad.abs().sum() > 0 and alpha.grad.abs().sum() > 0


def test_bad_parameters_are_one_line():
    for spec, match in (
        ({"method": "tune", "start": "awq"}, "recipe.algorithm.start='awq' unknown"),
        ({"method": "tune", "iterations": -1}, "iterations must be >= 0"),
        ({"method": "tune", "scale": 1.5}, "scale and validation in"),
        ({"method": "tune", "lr": 0}, "lr must be > 0"),
        ({"method": "tune", "target": "logits"}, "recipe.algorithm.target='logits' unknown"),
        ({"method": "tune", "loss": "l1"}, "recipe.algorithm.loss='l1' unknown"),
        ({"method": "tune", "step_batches": 0}, "step_batches must be >= 1"),
    ):
        with pytest.raises(AlgorithmError, match=match):
            build_algorithm("r", spec)


def test_zero_iterations_is_the_start_byte_for_byte(tmp_path):
    layerwise = ["calibration=layerwise", "calibration.propagate=quantized"]
    run_calibrate(tmp_path / "start", ["model=tiny_llama", "recipe=nvfp4_hessian_mse", *SMALL, *layerwise])
    res = run_calibrate(tmp_path / "zero", ["model=tiny_llama", "recipe=nvfp4_tune", *SMALL,
                                            "recipe.algorithm.iterations=0"])  # fmt: skip
    assert all(r["kept_iteration"] == 0 for r in res.report["tune"]["layers"])
    assert same_tensors(tmp_path / "start" / "ckpt", tmp_path / "zero" / "ckpt")


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gemma3"])
def test_tuning_is_never_worse_than_the_start_on_validation_and_reloads_exactly(tmp_path, model):
    more = ["data.num_samples=16", "data.seq_len=64"]  # 7 training batches: enough that tuning generalises
    res = run_calibrate(tmp_path, [f"model={model}", "recipe=nvfp4_tune", *SMALL, *more, *FEW_ITERATIONS])
    layers = res.report["tune"]["layers"]
    assert len(layers) == res.model.config.num_hidden_layers
    for r in layers:
        assert r["validation_batches"] == 1 and r["train_batches"] == 7
        start, kept = r["validation_loss"]
        assert kept <= start
    assert any(r["kept_iteration"] > 0 for r in layers), "nothing was tuned"
    check_round_trip(res, tmp_path / "ckpt")  # the tuned model (made whole again) == the export's reader
    assert "tuned on each decoder layer's output" in (tmp_path / "run" / "report.md").read_text()


def test_own_targets_and_channel_relative_loss_keep_the_guard_and_need_no_reference_stream(tmp_path):
    """target=own: the unquantized layer on the same quantized inputs (no second activation stream kept);
    loss=channel_relative: each hidden channel's error over its mean square; scale=0.5: block-scale factors
    tuned too. The guard and the exact reload hold as for the default."""
    tune = build_algorithm("r", {"method": "tune", "target": "own"})
    assert not tune.needs.reference and build_algorithm("r", {"method": "tune"}).needs.reference
    more = [
        "data.num_samples=16",
        "data.seq_len=64",
        "recipe.algorithm.target=own",
        "recipe.algorithm.loss=channel_relative",
        "recipe.algorithm.scale=0.5",  # block-scale factors tuned too (off by default)
    ]
    res = run_calibrate(tmp_path, ["model=tiny_llama", "recipe=nvfp4_tune", *SMALL, *more, *FEW_ITERATIONS])
    layers = res.report["tune"]["layers"]
    assert all(r["validation_loss"][1] <= r["validation_loss"][0] for r in layers)
    assert any(r["kept_iteration"] > 0 for r in layers), "nothing was tuned"
    assert res.report["algorithm"]["target"] == "own"
    check_round_trip(res, tmp_path / "ckpt")


def test_only_tunes_the_weights_it_names(tmp_path):
    """recipe.algorithm.only=*.mlp.*: the three MLP weights of each layer are tuned, the four attention ones
    are left at their start (no offsets made for them)."""
    args = ["model=tiny_llama", "recipe=nvfp4_tune", *SMALL, *FEW_ITERATIONS, "recipe.algorithm.start=max"]
    res = run_calibrate(tmp_path, [*args, "recipe.algorithm.only=*.mlp.*"])  # fmt: skip
    layers = res.report["tune"]["layers"]
    assert all(r["weights"] == 3 for r in layers)
    assert any(r["kept_iteration"] > 0 for r in layers), "nothing was tuned"


def test_a_tuned_run_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    args = [
        "model=tiny_llama",
        "recipe=nvfp4_tune",
        "+model.init=per_param",
        *SMALL,
        *FEW_ITERATIONS,
        "calibration=layerwise",
        "calibration.propagate=quantized",
        "calibration.offload=disk",
    ]
    run_calibrate(tmp_path / "straight", args)
    monkeypatch.setenv("NVFP4CAL_FAIL_AFTER_LAYER", "0")
    with pytest.raises(RuntimeError, match="on purpose"):
        run_calibrate(tmp_path / "resumed", args)
    monkeypatch.delenv("NVFP4CAL_FAIL_AFTER_LAYER")
    run_calibrate(tmp_path / "resumed", [*args, "calibration.resume=true"])  # both streams replayed
    assert same_tensors(tmp_path / "straight" / "ckpt", tmp_path / "resumed" / "ckpt")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_moe_family_tunes_its_experts(tmp_path, family):
    res = run_calibrate(tmp_path, [f"model={family}", "recipe=nvfp4_experts_only_tune_fp8_cast_kv", *SMALL,
                                   *FEW_ITERATIONS, "recipe.algorithm.min_tokens=4"])  # fmt: skip
    layers = res.report["tune"]["layers"]
    assert layers and any(r["weights"] > 0 for r in layers)  # (DeepSeek-V3: a dense first layer)
    assert all(r["validation_loss"][1] <= r["validation_loss"][0] for r in layers if r["weights"])
    kept = [k for r in layers for k in r["kept_start"]]
    assert all(k.endswith("]") and ".experts." in k for k in kept)  # named per expert
    check_round_trip(res, tmp_path / "ckpt")


def test_scale_headroom_lets_the_largest_blocks_take_larger_scales(tmp_path):
    """recipe.algorithm.headroom=h multiplies each weight's global amax by h: weight_scale_2 is h times
    larger, the sweep may give the tensor's largest blocks scales up to h times their max-calibrated ones
    (codes above 448 / h), and the export still reloads exactly. headroom outside [1, 4] is one line."""
    args = ["model=tiny_llama", "recipe=nvfp4_hessian_mse", *SMALL]
    base = run_calibrate(tmp_path / "base", args)
    wide = run_calibrate(tmp_path / "wide", [*args, "recipe.algorithm.headroom=1.75"])
    from nvfp4cal.checkpoint.reload import read_tensors

    a, b = read_tensors(tmp_path / "base" / "ckpt"), read_tensors(tmp_path / "wide" / "ckpt")
    s2 = [k for k in a if k.endswith("weight_scale_2")]
    assert s2 and all(torch.allclose(b[k], a[k] * 1.75, rtol=1e-6) for k in s2)
    codes = torch.cat([b[k].float().flatten() for k in b if k.endswith(".weight_scale")])
    assert codes.max() <= 448 and (codes > 448 / 1.75).any()
    check_round_trip(wide, tmp_path / "wide" / "ckpt")
    assert base.report["weights"] and wide.report["weights"]
    with pytest.raises(AlgorithmError, match=r"headroom must be in \[1, 4\]"):
        build_algorithm("r", {"method": "hessian_mse", "headroom": 0.5})


def test_a_value_of_the_wrong_type_is_one_line():
    for spec, match in (
        ({"method": "tune", "iterations": "abc"}, r"recipe.algorithm.iterations='abc' must be an integer"),
        ({"method": "tune", "lr": "x"}, r"recipe.algorithm.lr='x' must be a number or null"),
        ({"method": "gptq", "act_order": 1}, r"recipe.algorithm.act_order=1 must be true or false"),
    ):
        with pytest.raises(AlgorithmError, match=match):
            build_algorithm("r", spec)
    assert build_algorithm("r", {"method": "tune", "lr": 1}).params.lr == 1  # an integer is a number


def test_step_batches_must_share_out_evenly_over_the_ranks():
    """A step's batches are dealt out equally: 3 over 2 ranks is one line before any layer is tuned."""
    from nvfp4cal.numerics.comm import Comm, RunContext

    class TwoRanks(Comm):
        rank, world = 0, 2

    ctx = RunContext(comm=TwoRanks())
    tune = build_algorithm("r", {"method": "tune", "step_batches": 3})
    with pytest.raises(AlgorithmError, match="step_batches=3 is not a multiple of the 2 ranks"):
        tune.before(None, ctx)
    build_algorithm("r", {"method": "tune", "step_batches": 4}).before(None, ctx)  # headroom 1: no unit read


def test_a_step_takes_the_fewest_batches_that_hold_step_tokens():
    """step_batches null: ceil(step_tokens / tokens per batch) batches a step, rounded up to a multiple of the
    ranks and at most every training batch; step_batches set: that many over all ranks."""
    from nvfp4cal.model.tuning import _per_rank_batches
    from nvfp4cal.numerics.comm import Comm, RunContext

    class Inputs:
        def __init__(self, rows, tokens):
            self.x = torch.zeros(rows, tokens, 8)

        def batch(self, b):
            return (self.x,), {"position_ids": None}

    class TwoRanks(Comm):
        rank, world = 0, 2

        def max_(self, t):  # the other rank holds the same facts
            return t

    one, two = RunContext.single(), RunContext(comm=TwoRanks())

    def k(spec, rows, tokens, n_train=100, ctx=one):
        return _per_rank_batches(
            Inputs(rows, tokens), build_algorithm("r", {"method": "tune", **spec}).params, ctx, n_train
        )

    assert k({}, 4, 512) == 1  # the GPU table's 4 x 512 rows: one batch a step, as before
    assert k({}, 4, 256) == 2 and k({}, 4, 255) == 3  # the CPU table's 4 x 256 rows: two
    assert k({}, 2, 32) == 32 and k({}, 2, 32, n_train=3) == 3  # never more than the training batches
    assert k({"step_tokens": 1}, 2, 32) == 1
    assert k({}, 4, 512, ctx=two) == 1 and k({}, 4, 256, ctx=two) == 1 and k({}, 2, 256, ctx=two) == 2
    assert k({"step_batches": 4}, 4, 256, ctx=two) == 2 and k({"step_batches": 3}, 4, 256) == 3
    with pytest.raises(AlgorithmError, match="step_tokens must be >= 1"):
        build_algorithm("r", {"method": "tune", "step_tokens": 0})
