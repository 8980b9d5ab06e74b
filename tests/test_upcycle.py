"""Upcycling a dense Llama into a Mixtral-style MoE (how the embedded default model is built)."""

import pytest
import torch

from nvfp4cal.model.experts import QuantExpertsMixin
from nvfp4cal.model.insert import insert_quantizers
from nvfp4cal.model.loaders import build_tiny
from nvfp4cal.model.quantizers import set_mode
from nvfp4cal.model.upcycle import upcycle_llama_to_mixtral
from nvfp4cal.recipe import build_recipe

CFG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


@pytest.mark.parametrize("tie", [True, False])
def test_without_noise_the_moe_computes_the_dense_model(tie):
    dense = build_tiny("LlamaConfig", {**CFG, "tie_word_embeddings": tie}, seed=1)
    ids = torch.randint(0, 250, (2, 20))
    with torch.no_grad():
        want = dense.model(input_ids=ids).logits
    moe = upcycle_llama_to_mixtral(dense, num_experts=4, top_k=2, noise=0.0, dead_experts=0).model
    assert (moe.lm_head.weight is moe.model.embed_tokens.weight) == tie
    with torch.no_grad():
        got = moe(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_experts_differ_and_the_dead_expert_gets_no_tokens():
    dense = build_tiny("LlamaConfig", {**CFG, "tie_word_embeddings": True}, seed=2)
    moe = upcycle_llama_to_mixtral(dense, num_experts=8, top_k=2, noise=0.02, dead_experts=1).model
    ex = moe.model.layers[0].mlp.experts
    assert not torch.equal(ex.gate_up_proj[0], ex.gate_up_proj[1])
    insert_quantizers(moe, build_recipe("t", rules=["*.experts.*"]))
    set_mode(moe, "calib")
    from nvfp4cal.texts import pydoc_texts

    text = "\n".join(pydoc_texts()["text"][-20:])
    ids = dense.tokenizer(text, return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        moe(input_ids=ids, use_cache=False)
    tokens = [m.tokens for m in moe.modules() if isinstance(m, QuantExpertsMixin)]
    assert all(int(t[:7].min()) > 0 for t in tokens)  # the live experts are used
    assert sum(int(t[7]) for t in tokens) < 0.02 * sum(int(t.sum()) for t in tokens)  # the dead one (almost) never
