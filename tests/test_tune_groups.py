"""Layer-output tuning a group of experts at a time (recipe.algorithm.expert_group_gib): the rounds it plans,
a group's forward and gradients equal the whole weight's restricted to the group (eager and grouped experts
paths), and a grouped run keeps the guard and reloads exactly."""

import pytest
import torch

from helpers import check_round_trip, run_calibrate, tiny_model
from nvfp4cal.model.experts import QuantExpertsMixin
from nvfp4cal.model.insert import insert_quantizers
from nvfp4cal.model.quantizers import set_mode
from nvfp4cal.model.tuning import STATE_BYTES, Tunable, _Tuning, expert_groups
from nvfp4cal.model.view import weight_quantizers
from nvfp4cal.numerics.errors import UserError
from nvfp4cal.numerics.tune import fixed_ratio
from nvfp4cal.recipe import build_recipe


def _meta(*shape):
    return torch.empty(shape, device="meta")


def test_rounds_take_as_many_experts_as_fit():
    gate_up, down, attn = _meta(10, 64, 32), _meta(10, 32, 32), _meta(32, 32)
    per_expert = (64 * 32 + 32 * 32) * STATE_BYTES
    weights = [("q", None, attn), ("gu", None, gate_up), ("d", None, down)]
    assert expert_groups(weights, 1.0) == [None]  # everything fits: one round, as without groups
    gib = 3.5 * per_expert / 2**30  # three experts a round
    assert expert_groups(weights, gib) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert expert_groups(weights, 1e-12) == [(e, e + 1) for e in range(10)]  # at least one expert
    assert expert_groups([("q", None, attn)], 1e-12) == [None]  # no fused weight: nothing to split
    with pytest.raises(UserError, match="different expert counts"):
        expert_groups([("gu", None, gate_up), ("d", None, _meta(8, 32, 32))], 1e-12)


def _calibrated(family):
    torch.manual_seed(0)
    m = tiny_model(family)
    insert_quantizers(m, build_recipe("t", rules=["*.experts.*"]))
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    set_mode(m, "calib")
    with torch.no_grad():
        m(input_ids=ids, use_cache=False)
    for _, wq, w in weight_quantizers(m):
        wq.calibrate(w)
    set_mode(m, "off")
    return m, ids


def _tunables(m, span, v_of):
    items = []
    for name, wq, w in weight_quantizers(m):
        a, b = span if span is not None else (0, w.shape[0])
        s2 = wq.scale_2_bcast(w.device)
        part, blk = w[a:b], wq.block_amax[a:b]
        v = v_of(name)[a:b].clone().requires_grad_(True) if span else v_of(name).clone().requires_grad_(True)
        alpha = torch.ones(blk.shape)
        items.append(Tunable(name, wq, w, v, alpha, [], fixed_ratio(part, blk, s2[a:b]), span))
    return items


@pytest.mark.parametrize("impl", ["eager", "grouped"])
def test_a_group_forward_and_gradients_are_the_whole_weights_restricted_to_the_group(impl):
    m, ids = _calibrated("tiny_qwen3_moe")
    for x in m.modules():
        if isinstance(x, QuantExpertsMixin):
            x.grouped = impl
    a, b = 1, 3
    g = torch.Generator().manual_seed(2)
    offsets = {}
    for name, _, w in weight_quantizers(m):  # offsets inside the group only: outside it the start holds
        v = torch.zeros(w.shape)
        v[a:b] = torch.rand(w[a:b].shape, generator=g) - 0.5
        offsets[name] = v
    outs = []
    for span in (None, (a, b)):
        items = _tunables(m, span, offsets.__getitem__)
        with _Tuning(m, items):
            logits = m(input_ids=ids, use_cache=False).logits
            logits.float().pow(2).mean().backward()
        outs.append((logits.detach(), {t.name: t.v.grad for t in items}))
    (whole, g_whole), (group, g_group) = outs
    torch.testing.assert_close(group, whole, rtol=1e-5, atol=1e-6)
    for name, grad in g_group.items():
        torch.testing.assert_close(grad, g_whole[name][a:b], rtol=1e-4, atol=1e-7)


def test_a_layer_tuned_in_expert_groups_keeps_the_guard_and_reloads_exactly(tmp_path):
    args = ["model=tiny_qwen3_moe", "recipe=nvfp4_experts_only_tune_fp8_cast_kv", "data.num_samples=8",
            "data.seq_len=32", "data.batch_size=2", "data.eval_samples=2", "recipe.algorithm.iterations=10",
            "recipe.algorithm.eval_every=2", "recipe.algorithm.min_tokens=4", "recipe.algorithm.step_tokens=64",
            "recipe.algorithm.expert_group_gib=1e-5"]  # fmt: skip
    res = run_calibrate(tmp_path, args)
    layers = [r for r in res.report["tune"]["layers"] if r["weights"]]
    assert layers
    for r in layers:
        groups = r["expert_groups"]
        assert len(groups) >= 2 and groups[0]["experts"][0] == 0
        assert groups[-1]["experts"][1] == res.model.config.num_experts
        assert all(g["validation_loss"][1] <= g["validation_loss"][0] for g in groups)
        assert r["validation_loss"][1] <= r["validation_loss"][0]
        assert r["validation_loss"][0] == groups[0]["validation_loss"][0]
    assert any(r["kept_iteration"] > 0 for r in layers), "nothing was tuned"
    check_round_trip(res, tmp_path / "ckpt")
    with pytest.raises(Exception, match="expert_group_gib must be > 0"):
        run_calibrate(tmp_path / "bad", [*args, "recipe.algorithm.expert_group_gib=0"])


def test_grouped_tuning_resumes_to_the_same_bytes_with_weights_checked_an_expert_at_a_time(tmp_path, monkeypatch):
    """The layer state of a tuned fused weight is found changed, and saved as codes, one expert at a time
    (row_chunks: one row of dim 0 per chunk here); a stopped grouped run resumes to the same bytes."""
    from helpers import same_tensors
    from nvfp4cal.numerics import nvfp4

    monkeypatch.setattr(nvfp4, "row_chunks", lambda w, budget_bytes=0: [slice(i, i + 1) for i in range(w.shape[0])]
                        if w.dim() >= 2 else [slice(None)])  # fmt: skip
    args = ["model=tiny_qwen3_moe", "recipe=nvfp4_experts_only_tune_fp8_cast_kv", "+model.init=per_param",
            "data.num_samples=8", "data.seq_len=32", "data.batch_size=2", "data.eval_samples=2",
            "recipe.algorithm.iterations=6", "recipe.algorithm.eval_every=2", "recipe.algorithm.min_tokens=4",
            "recipe.algorithm.step_tokens=64", "recipe.algorithm.expert_group_gib=1e-5",
            "calibration=layerwise", "calibration.propagate=quantized", "calibration.offload=disk"]  # fmt: skip
    run_calibrate(tmp_path / "straight", args)
    monkeypatch.setenv("NVFP4CAL_FAIL_AFTER_LAYER", "0")
    with pytest.raises(RuntimeError, match="on purpose"):
        run_calibrate(tmp_path / "resumed", args)
    monkeypatch.delenv("NVFP4CAL_FAIL_AFTER_LAYER")
    run_calibrate(tmp_path / "resumed", [*args, "calibration.resume=true"])
    assert same_tensors(tmp_path / "straight" / "ckpt", tmp_path / "resumed" / "ckpt")
