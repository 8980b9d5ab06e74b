"""Every transformers MoE family: calibrated, no expert left behind, export reloads bit-exactly."""

import pytest
import torch
from hydra.utils import instantiate
from safetensors import safe_open

from helpers import MOE_FAMILIES, check_round_trip, compose, run_calibrate, tiny_model
from nvfp4cal.model.experts import QuantExpertsMixin, UnsupportedExpertsError
from nvfp4cal.model.insert import insert_quantizers
from nvfp4cal.model.quantizers import set_mode
from nvfp4cal.recipe import build_recipe

FAMILIES = MOE_FAMILIES
# what `save_pretrained` calls expert 0's first and down projections in layer L of each family
EXPORT_NAMES = {
    "tiny_qwen3_moe": ("mlp.experts.0.gate_proj.weight", "mlp.experts.0.down_proj.weight"),
    "tiny_qwen2_moe": ("mlp.experts.0.gate_proj.weight", "mlp.experts.0.down_proj.weight"),
    "tiny_mixtral": ("block_sparse_moe.experts.0.w1.weight", "block_sparse_moe.experts.0.w2.weight"),
    "tiny_deepseek_v3": ("mlp.experts.0.gate_proj.weight", "mlp.experts.0.down_proj.weight"),
    "tiny_gpt_oss": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
    "tiny_olmoe": ("mlp.experts.0.gate_proj.weight", "mlp.experts.0.down_proj.weight"),
    "tiny_qwen3_5_moe": ("mlp.experts.0.gate_proj.weight", "mlp.experts.0.down_proj.weight"),
}
FEW = ["data.num_samples=1", "data.seq_len=4", "data.batch_size=1", "data.eval_samples=1"]  # 8 routed slots, 8 experts


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_sees_every_expert_and_keeps_outputs(family):
    ref = tiny_model(family)
    ref.set_experts_implementation("eager")
    m = tiny_model(family)
    insert_quantizers(m, build_recipe("t", rules=["*.experts.*"]))
    set_mode(m, "calib")
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids, use_cache=False).logits, ref(input_ids=ids, use_cache=False).logits)
    experts = [x for x in m.modules() if isinstance(x, QuantExpertsMixin)]
    assert experts
    for x in experts:
        assert int(x.tokens.sum()) == 2 * 16 * ref.config.num_experts_per_tok
        seen = x.tokens > 0
        assert (x.gate_up_input.amax[seen] > 0).all() and (x.down_input.amax[seen] > 0).all()


@pytest.mark.parametrize(
    "recipe",
    [
        "nvfp4_experts_only_mse_fp8_cast_kv",
        "nvfp4_mlp_only_mse_fp8_cast_kv",
        "nvfp4_experts_only_hessian_mse_fp8_cast_kv",
    ],
)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_calibrate_export_reload(tmp_path, family, recipe):
    res = run_calibrate(tmp_path, [f"model={family}", f"recipe={recipe}", *FEW])
    dead = sum(len(e["experts"]) for e in res.report["experts"])
    assert dead > 0, "the test wants some experts without tokens"
    for x in res.model.modules():
        if isinstance(x, QuantExpertsMixin):
            for q in (x.gate_up_input, x.down_input):
                assert (q.amax > 0).all() and torch.isfinite(q.amax).all()
            for wq in (x.gate_up_weight, x.down_weight):
                assert wq is not None and (wq.global_amax > 0).all()
    layer = res.report["experts"][-1]["module"].rsplit(".", 2)[0]  # model.layers.L
    first, down = EXPORT_NAMES[family]
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for name in (first, down):
            assert f"{layer}.{name}" in keys
        for k in keys:
            if k.endswith("weight_scale"):
                assert ((f.get_tensor(k).view(torch.uint8) & 0x7F) != 0x7F).all(), k
            if k.endswith(("weight_scale_2", "input_scale")):
                t = f.get_tensor(k)
                assert torch.isfinite(t).all() and (t > 0).all(), k
        if first.endswith(".weight"):  # per-expert: gate and up share weight_scale_2
            gate, up = ("w1", "w3") if "w1" in first else ("gate_proj", "up_proj")
            base = f"{layer}.{first.rsplit('.', 3)[0]}"
            for e in range(8):
                g = f.get_tensor(f"{base}.{e}.{gate}.weight_scale_2")
                assert torch.equal(g, f.get_tensor(f"{base}.{e}.{up}.weight_scale_2"))
    check_round_trip(res, tmp_path / "ckpt")


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_recipes_cover_every_family(family):
    """Which modules each shipped recipe quantizes, per family."""
    expected_attn = {"tiny_deepseek_v3": "self_attn.q_a_proj", "tiny_qwen3_5_moe": "linear_attn.in_proj_qkv"}
    for recipe in (
        "nvfp4_experts_only_mse_fp8_cast_kv",
        "nvfp4_mlp_only_mse_fp8_cast_kv",
        "nvfp4_mse",
        "nvfp4_experts_only_hessian_mse_fp8_cast_kv",
        "nvfp4_hessian_mse",
    ):
        m = tiny_model(family)
        plan = insert_quantizers(m, instantiate(compose([f"recipe={recipe}"]).recipe, _convert_="all"))
        q = plan.quantized
        assert any(n.endswith(".experts.down_proj") for n in q)
        assert not any(n.endswith(("mlp.gate", "router", "shared_expert_gate", "lm_head")) for n in q)
        if "experts_only" in recipe:
            assert all(".experts." in n or ".shared_expert" in n for n in q)
        elif "mlp_only" in recipe:
            assert all(".mlp." in n for n in q)
        else:
            assert any(expected_attn.get(family, "self_attn.q_proj") in n for n in q)


def test_deepseek_mla_pair_shares_scale():
    m = tiny_model("tiny_deepseek_v3")
    insert_quantizers(m, build_recipe("t", rules=["*"]))
    attn = m.model.layers[1].self_attn
    assert torch.equal(attn.q_a_proj.weight_quantizer.global_amax, attn.kv_a_proj_with_mqa.weight_quantizer.global_amax)


def test_unknown_experts_layout_is_a_named_error():
    class OddExperts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w_in = torch.nn.Parameter(torch.randn(4, 32, 16))

    model = torch.nn.Module()
    model.experts = OddExperts()
    with pytest.raises(UnsupportedExpertsError, match="OddExperts has a layout nvfp4cal does not know"):
        insert_quantizers(model, build_recipe("t", rules=["*"]))
