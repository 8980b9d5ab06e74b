"""Recipes: validation with named errors, rule order, and every shipped recipe composes with every tiny model."""

import pytest
from hydra.utils import instantiate

from helpers import DENSE_FAMILIES, RECIPES, TINY_MODELS, compose
from nvfp4cal.model.insert import insert_quantizers
from nvfp4cal.recipe import RecipeError, build_recipe


def test_later_rules_override_earlier():
    r = build_recipe("t", rules=[{"pattern": "*"}, {"pattern": "*lm_head", "enable": False}, {"pattern": "x.lm_head"}])
    assert r.quantizes("a.q_proj") and not r.quantizes("y.lm_head") and r.quantizes("x.lm_head")
    assert not build_recipe("t", rules=[{"pattern": "a*"}]).quantizes("b")


def test_unknown_keys_are_named():
    with pytest.raises(
        RecipeError, match=r"unknown key\(s\) \['enabled'\].*valid keys: \['pattern', 'enable', 'format'\]"
    ):
        build_recipe("t", rules=[{"pattern": "*", "enabled": True}])
    with pytest.raises(RecipeError, match=r"\['sweep'\]"):
        build_recipe("t", rules=["*"], algorithm={"method": "mse", "sweep": True})
    with pytest.raises(RecipeError, match=r"\['extra'\]"):
        build_recipe("t", rules=["*"], extra=1)
    with pytest.raises(RecipeError, match="unknown format"):
        build_recipe("t", rules=[{"pattern": "*", "format": "int4"}])
    with pytest.raises(RecipeError, match="method"):
        build_recipe("t", rules=["*"], algorithm={"method": "awq"})
    with pytest.raises(RecipeError, match="no rules"):
        build_recipe("t", rules=[])


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("model", TINY_MODELS)
def test_every_recipe_composes_with_every_tiny_model(model, recipe):
    cfg = compose([f"model={model}", f"recipe={recipe}"])
    r = instantiate(cfg.recipe, _convert_="all")
    assert r.name == recipe
    loaded = instantiate(cfg.model, _convert_="all")
    plan = insert_quantizers(loaded.model, r)
    is_moe = model not in DENSE_FAMILIES
    if "experts_only" in recipe:
        assert all(".experts." in n for n in plan.quantized)
        assert bool(plan.quantized) == is_moe
    elif "mlp_only" in recipe:
        assert plan.quantized and all(".mlp." in n for n in plan.quantized)
    else:
        assert any(".self_attn." in n for n in plan.quantized)
    assert not any("lm_head" in n or n.endswith("mlp.gate") for n in plan.quantized)
    has_kv_proj = model != "tiny_deepseek_v3"  # MLA: no k_proj/v_proj, the FP8 KV cache is skipped with a warning
    assert bool(plan.kv_cache) == (recipe.endswith("fp8_cast_kv") and has_kv_proj)


PLAIN_MSE_BASELINES = {"nvfp4_mse", "nvfp4_experts_only_mse_fp8_cast_kv"}


def test_plain_weight_mse_ships_only_in_its_baselines():
    """Plain weight MSE was no better than max calibration on MLP weights wherever measured (bench/RESULTS.md,
    session 14): only its two baseline recipes use it; every other sweep weighs by the calibration data."""
    for recipe in RECIPES:
        method = compose([f"recipe={recipe}"]).recipe.algorithm.method
        assert (method == "mse") == (recipe in PLAIN_MSE_BASELINES), recipe


def test_unmatched_pattern_warns(caplog):
    cfg = compose(["model=tiny_llama", "recipe=nvfp4_mse"])
    loaded = instantiate(cfg.model, _convert_="all")
    insert_quantizers(loaded.model, build_recipe("t", rules=["*mlp*", "*nothing_like_this*"]))
    assert "*nothing_like_this*" in caplog.text


def test_every_shipped_recipe_ends_with_the_common_exclusions():
    """One shared list (conf/exclusions/common.yaml), appended as disabled rules after a recipe's own."""
    from omegaconf import OmegaConf

    from helpers import CONF

    common = OmegaConf.load(CONF / "exclusions" / "common.yaml").exclude
    for name in RECIPES:
        r = instantiate(compose([f"recipe={name}"]).recipe, _convert_="all")
        assert [(x.pattern, x.enable) for x in r.rules[-len(common) :]] == [(p, False) for p in common], name
        assert not r.quantizes("model.lm_head") and not r.quantizes("model.layers.0.mlp.gate"), name
    r = build_recipe("t", rules=["*"], exclude=["*q_proj"])
    assert r.quantizes("a.k_proj") and not r.quantizes("a.q_proj")
    with pytest.raises(RecipeError, match="exclude must be a list"):
        build_recipe("t", rules=["*"], exclude="*q_proj")
