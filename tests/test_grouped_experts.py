"""The grouped experts forward (two torch._grouped_mm calls per layer) against the eager per-expert loop."""

import pytest
import torch

from helpers import MOE_FAMILIES as FAMILIES
from helpers import tiny_model
from nvfp4cal.model.experts import QuantExpertsMixin
from nvfp4cal.model.insert import enable_hessians, insert_quantizers
from nvfp4cal.model.quantizers import set_mode
from nvfp4cal.recipe import build_recipe


def _experts(m):
    return [x for x in m.modules() if isinstance(x, QuantExpertsMixin)]


def _run(m, impl, mode, ids):
    for x in _experts(m):
        x.grouped = impl
    set_mode(m, mode)
    with torch.no_grad():
        return m(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_matches_eager(family):
    eager, grouped = tiny_model(family), tiny_model(family)
    for m in (eager, grouped):
        insert_quantizers(m, build_recipe("t", rules=["*.experts.*"]))
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    a, b = _run(eager, "eager", "calib", ids), _run(grouped, "grouped", "calib", ids)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for x, y in zip(_experts(eager), _experts(grouped), strict=True):
        assert torch.equal(x.tokens, y.tokens)
        assert torch.equal(x.gate_up_input.seen, y.gate_up_input.seen)
        assert torch.equal(x.down_input.seen, y.down_input.seen)
        # the first projection's input is a gather of the hidden states: exact in the first layer
        torch.testing.assert_close(x.gate_up_input.amax, y.gate_up_input.amax, rtol=1e-4, atol=0)
        torch.testing.assert_close(x.down_input.amax, y.down_input.amax, rtol=1e-4, atol=0)
    first = _experts(eager)[0], _experts(grouped)[0]
    assert torch.equal(first[0].gate_up_input.amax, first[1].gate_up_input.amax)
    # W4A4: the same fake-quant weights and activation scales, the same outputs up to summation order
    for x, y in zip(_experts(eager), _experts(grouped), strict=True):
        y.gate_up_input.amax.copy_(x.gate_up_input.amax)
        y.down_input.amax.copy_(x.down_input.amax)
    a, b = _run(eager, "eager", "quant", ids), _run(grouped, "grouped", "quant", ids)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_grouped_ignores_pairs_of_other_ranks():
    """Expert ids outside [0, E) (expert parallelism) get no tokens, no amax and no output."""
    m = tiny_model("tiny_qwen3_moe")
    insert_quantizers(m, build_recipe("t", rules=["*.experts.*"]))
    x = _experts(m)[0]
    set_mode(m, "calib")
    h = torch.randn(5, m.config.hidden_size)
    idx = torch.tensor([[0, 1], [1, 99], [-1, 2], [3, 0], [99, -1]])
    w = torch.rand(5, 2)
    outs = {}
    for impl in ("eager", "grouped"):
        x.tokens.zero_(), x.gate_up_input.amax.zero_(), x.down_input.amax.zero_(), x.gate_up_input.seen.zero_()
        x.grouped = impl
        with torch.no_grad():
            outs[impl] = x(h, idx, w)
        outs[impl + "_state"] = (x.tokens.clone(), x.gate_up_input.amax.clone(), x.gate_up_input.seen.clone())
    assert outs["grouped"][4].abs().max() == 0
    torch.testing.assert_close(outs["eager"], outs["grouped"], rtol=1e-5, atol=1e-6)
    for a, b in zip(outs["eager_state"], outs["grouped_state"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["tiny_qwen3_moe", "tiny_gpt_oss"])
def test_grouped_and_eager_collect_the_same_hessians(family):
    """Per-expert input Hessians (Hessian-weighted sweep) from the grouped forward equal the eager loop's."""
    eager, grouped = tiny_model(family), tiny_model(family)
    for m in (eager, grouped):
        insert_quantizers(m, build_recipe("t", rules=["*.experts.*"], algorithm={"method": "hessian_mse"}))
        enable_hessians(m)  # what the calibration loop does for method hessian_mse
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    _run(eager, "eager", "calib", ids), _run(grouped, "grouped", "calib", ids)
    for x, y in zip(_experts(eager), _experts(grouped), strict=True):
        for qa, qb in ((x.gate_up_input, y.gate_up_input), (x.down_input, y.down_input)):
            assert qa.hessian is not None and qa.hessian.abs().sum() > 0
            torch.testing.assert_close(qa.hessian, qb.hessian, rtol=1e-4, atol=1e-6)
    dead = [(x, e) for x in _experts(eager) for e in (x.tokens == 0).nonzero().flatten().tolist()]
    assert all((x.gate_up_input.hessian[e] == 0).all() for x, e in dead)
