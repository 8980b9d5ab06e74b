"""GPTQ for NVFP4: the rounding against its definition, and the pipeline layer by layer on quantized inputs."""

import logging

import pytest
import torch

from helpers import run_calibrate, same_tensors, tiny_model
from nvfp4cal.checkpoint.reload import read_tensors, rebuild_model
from nvfp4cal.cli.verify import verify
from nvfp4cal.numerics import nvfp4
from nvfp4cal.numerics.errors import UserError
from nvfp4cal.numerics.gptq import gptq_round, hessian_error
from nvfp4cal.numerics.nvfp4 import round_to_step


def _case(seed, out_f=24, in_f=64, tokens=256, heavy=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    if heavy:
        w = w * torch.randn(out_f, in_f, generator=g).abs().pow(3)
    x = torch.randn(tokens, in_f, generator=g) * torch.linspace(0.2, 3.0, in_f)  # channels of unequal scale
    x[:, : in_f // 4] += x[:, in_f // 4 : in_f // 2]  # correlated channels: where error feedback helps
    h = x.t() @ x
    g_amax = w.abs().amax()
    steps = nvfp4.block_steps(nvfp4.block_amax(w), nvfp4.scale_2(g_amax))
    return w, h, steps


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("heavy", [False, True])
def test_gptq_lowers_the_hessian_error_and_stays_on_the_grid(seed, heavy):
    w, h, steps = _case(seed, heavy=heavy)
    rtn = round_to_step(w, steps.repeat_interleave(16, 1))
    for act_order in (False, True):
        q = gptq_round(w, h, steps, block_columns=16, act_order=act_order)
        assert hessian_error(w, q, h) < hessian_error(w, rtn, h)
        # every value is a code of its block's fixed step: packing gives the codes back exactly
        step = steps.repeat_interleave(16, 1)
        assert torch.equal(round_to_step(q, step), q)


def test_lazy_batches_compute_what_one_batch_computes():
    w, h, steps = _case(7)
    a = gptq_round(w, h, steps, block_columns=16)
    b = gptq_round(w, h, steps, block_columns=64)  # every column in one group: no lazy update
    assert (a != b).float().mean() < 0.01  # the same up to fp32 rounding of the update order
    assert abs(hessian_error(w, a, h) - hessian_error(w, b, h)) < 1e-3 * hessian_error(w, b, h)


def test_no_correlation_means_plain_rounding():
    """With H = I every column's error stays where it is: GPTQ is round-to-nearest."""
    w, _, steps = _case(3)
    q = gptq_round(w, torch.eye(w.shape[1]), steps)
    assert torch.equal(q, round_to_step(w, steps.repeat_interleave(16, 1)))


def test_dead_channels_are_rounded_plainly():
    w, h, steps = _case(5)
    h[:, :16] = 0
    h[:16, :] = 0  # the first block of channels never saw input
    q = gptq_round(w, h, steps)
    assert torch.equal(q[:, :16], round_to_step(w[:, :16], steps[:, :1].repeat_interleave(16, 1)))


ARGS = ["+model.init=per_param", "data.num_samples=8", "data.seq_len=32", "data.batch_size=2", "data.eval_samples=2",
        "calibration=layerwise", "calibration.propagate=quantized"]  # fmt: skip


@pytest.mark.parametrize(
    "model, recipe", [("tiny_llama", "nvfp4_gptq"), ("tiny_qwen3_moe", "nvfp4_experts_only_gptq_fp8_cast_kv")]
)
def test_gptq_pipeline_writes_a_checkpoint_of_its_codes(tmp_path, model, recipe):
    res = run_calibrate(tmp_path, [f"model={model}", f"recipe={recipe}", *ARGS])
    ckpt = tmp_path / "ckpt"
    assert verify(ckpt).ok
    g = res.report["gptq"]
    assert g["weights"] == res.report["quantized"]
    ratios = [e["gptq"]["hessian_error_vs_rtn"] for e in res.report["weights"].values()]
    assert ratios and all(r <= 1.0 + 1e-6 for r in ratios) and min(ratios) < 1.0
    # reading the export back gives weights on the grid of the exported scales (what an engine computes)
    rebuilt = rebuild_model(ckpt)
    assert sum(p.numel() for p in rebuilt.parameters()) > 0
    plain = run_calibrate(tmp_path / "mse", [f"model={model}", f"recipe={recipe.replace('gptq', 'mse')}", *ARGS])
    a, b = read_tensors(ckpt), read_tensors(tmp_path / "mse" / "ckpt")
    packed = [k for k in a if k.endswith(".weight") and a[k].dtype == torch.uint8]
    assert any(not torch.equal(a[k], b[k]) for k in packed)  # GPTQ changed codes
    assert plain.report["weights"]


@pytest.mark.parametrize(
    "contradiction",
    [["calibration=whole"], ["calibration=layerwise", "calibration.propagate=unquantized"]],
    ids=["whole", "unquantized"],
)
def test_gptq_against_an_explicit_schedule_is_one_line(tmp_path, contradiction):
    with pytest.raises(UserError, match="needs calibration=layerwise calibration.propagate=quantized: remove") as err:
        run_calibrate(tmp_path, ["model=tiny_llama", "recipe=nvfp4_gptq", *contradiction])
    assert "\n" not in str(err.value)


def test_gptq_chooses_the_schedule_it_needs(tmp_path, caplog):
    """recipe=nvfp4_gptq with no other override runs layer by layer on quantized inputs (a model held in
    memory, read layer by layer from there) and says so; the same bytes as the explicit schedule."""
    caplog.set_level(logging.INFO, logger="nvfp4cal")
    small = ["data.num_samples=6", "data.seq_len=32", "data.batch_size=2", "recipe.algorithm.min_tokens=1"]
    chosen = run_calibrate(tmp_path / "chosen", ["model=tiny_llama", "recipe=nvfp4_gptq", *small])
    assert "needs calibration=layerwise calibration.propagate=quantized: chosen" in caplog.text
    assert chosen.report["config"]["calibration"]["propagate"] == "quantized"
    assert chosen.report["gptq"]["weights"] == 14
    explicit = run_calibrate(tmp_path / "explicit", ["model=tiny_llama", "recipe=nvfp4_gptq", *small,
                                                     "calibration=layerwise", "calibration.propagate=quantized"])  # fmt: skip
    assert same_tensors(tmp_path / "chosen" / "ckpt", tmp_path / "explicit" / "ckpt")
    assert explicit.report["gptq"] == chosen.report["gptq"]


def test_a_gptq_run_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    args = ["model=tiny_llama", "recipe=nvfp4_gptq", *ARGS]
    run_calibrate(tmp_path / "straight", args)
    monkeypatch.setenv("NVFP4CAL_FAIL_AFTER_LAYER", "0")
    with pytest.raises(RuntimeError, match="on purpose"):
        run_calibrate(tmp_path / "resumed", args)
    monkeypatch.delenv("NVFP4CAL_FAIL_AFTER_LAYER")
    run_calibrate(tmp_path / "resumed", [*args, "calibration.resume=true"])  # layer 0 replayed from its codes
    a, b = tmp_path / "straight" / "ckpt", tmp_path / "resumed" / "ckpt"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_a_full_hessian_gives_the_block_hessians_of_its_diagonal():
    from nvfp4cal.model.quantizers import InputQuantizer
    from nvfp4cal.numerics.hessian import block_hessian

    x = torch.randn(3, 40, 48, generator=torch.Generator().manual_seed(0))
    full, blocks = InputQuantizer(), InputQuantizer()
    full.enable_hessian(48, full=True)
    blocks.enable_hessian(48)
    full.observe(x)
    blocks.observe(x)
    assert torch.allclose(full.block_hessians([0]), blocks.block_hessians([0]), rtol=1e-5, atol=1e-4)
    assert torch.allclose(full.block_hessians([0])[0], block_hessian(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("scales, sweep", [("max", None), ("hessian_mse", "hessian_mse")])
def test_gptq_on_max_or_hessian_swept_scales(tmp_path, scales, sweep):
    res = run_calibrate(tmp_path, ["model=tiny_llama", "recipe=nvfp4_gptq", f"recipe.algorithm.scales={scales}", *ARGS])
    assert verify(tmp_path / "ckpt").ok
    rep = res.report
    assert rep["gptq"]["weights"] == rep["quantized"]
    assert (rep.get("sweep") or {}).get("method") == sweep
    ratios = [e["gptq"]["hessian_error_vs_rtn"] for e in rep["weights"].values()]
    assert ratios and all(r <= 1.0 + 1e-6 for r in ratios)


@pytest.mark.parametrize("act_order", [False, True])
def test_experts_rounded_together_get_what_each_gets_alone(act_order):
    cases = [_case(s) for s in (11, 12, 13)]
    cases[1][1][:16, :] = cases[1][1][:, :16] = 0  # one expert with a dead block of channels
    w, h, steps = (torch.stack(t) for t in zip(*cases, strict=True))
    together = gptq_round(w, h, steps, block_columns=32, act_order=act_order)
    for e, (we, he, se) in enumerate(cases):
        alone = gptq_round(we, he, se, block_columns=32, act_order=act_order)
        assert (together[e] != alone).float().mean() < 0.01
        assert abs(hessian_error(we, together[e], he) - hessian_error(we, alone, he)) < 1e-4 * hessian_error(
            we, alone, he
        )


def test_rows_stacked_under_one_hessian_round_as_each_alone():
    """q/k/v (and gate/up) read one input: one Hessian, one pass over their stacked rows, each weight's codes
    as it gets them alone (GPTQ treats rows independently; equal here, at worst the matmuls' order)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g) * torch.linspace(0.1, 3.0, 64)
    h = x.t() @ x
    parts = [torch.randn(rows, 64, generator=g) for rows in (32, 16, 16)]
    steps = [nvfp4.block_steps(nvfp4.block_amax(w), nvfp4.scale_2(w.abs().amax())) for w in parts]
    alone = [gptq_round(w, h, s, act_order=True) for w, s in zip(parts, steps, strict=True)]
    stacked = gptq_round(torch.cat(parts), h, torch.cat(steps), act_order=True)
    assert torch.equal(stacked, torch.cat(alone))


def test_siblings_keep_one_full_hessian():
    from nvfp4cal.model.insert import enable_hessians, insert_quantizers
    from nvfp4cal.recipe import build_recipe

    m = tiny_model("tiny_llama")
    insert_quantizers(m, build_recipe("t", rules=["*"]))
    enable_hessians(m, kind="full")
    attn, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
    q = attn.q_proj.input_quantizer
    assert q.hessian is not None and attn.k_proj.input_quantizer.hessian is None
    assert attn.k_proj.input_quantizer.hessian_holder() is q and attn.v_proj.input_quantizer.hessian_holder() is q
    assert mlp.up_proj.input_quantizer.hessian_holder() is mlp.gate_proj.input_quantizer
    assert attn.o_proj.input_quantizer.hessian_holder() is attn.o_proj.input_quantizer
    assert "hessian_of" not in dict(q.named_children())  # the holder is not a submodule of its siblings
    assert not any("hessian_of" in k for k in m.state_dict())
