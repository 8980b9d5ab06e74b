"""Upcycle a dense Llama-style model into a Mixtral-style MoE (the embedded default model).

Same embeddings, attention and norms. Each expert starts as the dense MLP plus a small seeded
perturbation, ``W_e = W + noise * std(W) * N(0, 1)``, so experts differ. The router is seeded:
live experts get random rows; the last ``dead_experts`` rows point against the mean MLP input of
each layer (measured once on a few sequences of the embedded corpus), so those experts are
almost never routed to: the default run exercises the dead-expert path with a real model.
"""

from __future__ import annotations

import torch

from ..numerics.errors import UserError
from .loaders import LoadedModel
from .packaged import load_smollm2


@torch.no_grad()
def _mlp_input_means(dense, tokenizer, n_tokens: int = 2048) -> list[torch.Tensor]:
    from ..texts import pydoc_texts

    text = "\n\n".join(pydoc_texts()["text"][:200])
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n_tokens]
    means, hooks = [], []
    for layer in dense.model.layers:
        hooks.append(
            layer.post_attention_layernorm.register_forward_hook(
                lambda m, a, out: means.append(out.float().mean((0, 1)))
            )
        )
    try:
        dense(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return means


@torch.no_grad()
def upcycle_llama_to_mixtral(
    loaded: LoadedModel, num_experts: int = 8, top_k: int = 2, noise: float = 0.02, seed: int = 0, dead_experts: int = 1
) -> LoadedModel:
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.initialization import no_init_weights

    dense, c = loaded.model, loaded.model.config
    if not 0 <= dead_experts < num_experts - top_k + 1:
        raise UserError(f"model.dead_experts must be in [0, {num_experts - top_k}]")
    dtype = next(dense.parameters()).dtype
    dense.float()  # fp32 on CPU is ~10x faster than bf16 for the probe; copies back to bf16 are exact
    means = _mlp_input_means(dense, loaded.tokenizer) if dead_experts else []
    cfg = MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=c.rope_parameters,
        tie_word_embeddings=c.tie_word_embeddings,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        dtype=str(dtype).removeprefix("torch."),
    )
    with no_init_weights():  # every weight is copied below; skip the random init of ~0.7B parameters
        moe = MixtralForCausalLM(cfg)
    moe.tie_weights()  # no_init_weights skips the tying done at init
    moe = moe.to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    moe.model.embed_tokens.weight.copy_(dense.model.embed_tokens.weight)
    moe.model.norm.weight.copy_(dense.model.norm.weight)
    if c.tie_word_embeddings:
        assert moe.lm_head.weight is moe.model.embed_tokens.weight
    else:
        moe.lm_head.weight.copy_(dense.lm_head.weight)
    for i, (src, dst) in enumerate(zip(dense.model.layers, moe.model.layers, strict=True)):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(dst.self_attn, p).weight.copy_(getattr(src.self_attn, p).weight)
        dst.input_layernorm.weight.copy_(src.input_layernorm.weight)
        dst.post_attention_layernorm.weight.copy_(src.post_attention_layernorm.weight)
        gate_up = torch.cat([src.mlp.gate_proj.weight, src.mlp.up_proj.weight]).float()
        down = src.mlp.down_proj.weight.float()
        for e in range(num_experts):
            for dst_w, w in ((dst.mlp.experts.gate_up_proj, gate_up), (dst.mlp.experts.down_proj, down)):
                dst_w[e].copy_(w + noise * w.std() * torch.randn(w.shape, generator=gen))
        router = torch.randn(num_experts, c.hidden_size, generator=gen) / c.hidden_size**0.5
        if dead_experts:
            mu = means[i]
            away = -mu / mu.norm().clamp_min(1e-6) * 8 * router.norm(dim=1).max()
            router[num_experts - dead_experts :] = away
        dst.mlp.gate.weight.copy_(router)
    return LoadedModel(moe, loaded.tokenizer, f"{loaded.name}-moe{num_experts}")


def load_smollm2_moe(
    cache_dir: str = ".cache",
    dtype: str = "bfloat16",
    num_experts: int = 8,
    top_k: int = 2,
    noise: float = 0.02,
    seed: int = 0,
    dead_experts: int = 1,
) -> LoadedModel:
    """The embedded default: SmolLM2-135M upcycled into an 8-expert top-2 Mixtral-style MoE."""
    return upcycle_llama_to_mixtral(load_smollm2(cache_dir, dtype), num_experts, top_k, noise, seed, dead_experts)
