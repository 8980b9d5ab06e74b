"""The Hessian-weighted FP8-scale sweep: reference vs fp64 brute force, the identity case, why it
cannot prune like the plain sweep, and the pipeline (never worse than max by its own objective)."""

import os

import pytest
import torch

from helpers import calibrated
from nvfp4cal.model.experts import QuantExpertsMixin
from nvfp4cal.model.quantizers import QuantLinear
from nvfp4cal.model.sweep import mse_sweep
from nvfp4cal.model.view import weight_inputs, weight_quantizers
from nvfp4cal.numerics import hessian, mse, nvfp4
from nvfp4cal.numerics.comm import RunContext


def _weight(kind: str, out: int = 48, inp: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(out, inp, generator=g)
    if kind == "heavy":
        return torch.distributions.StudentT(2.5).sample((out, inp))
    raise ValueError(kind)


def _correlated_hessian(inp: int, seed: int = 0, tokens: int = 300) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(inp) + 0.5 * torch.randn(inp, inp, generator=g)
    x = torch.randn(tokens, inp, generator=g) @ mix * torch.rand(inp, generator=g).mul(4).exp()
    return hessian.block_hessian(x)


@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_reference_is_the_fp64_optimum(kind):
    """Every choice is the fp64 brute force's optimum up to the fp32 evaluation of the objective."""
    w = _weight(kind)
    g, h = w.abs().max(), _correlated_hessian(w.shape[1])
    chosen = hessian.hessian_amax_reference(w, g, h, chunk=256)
    _, err = hessian.brute_force_fp64(w, g, h)
    amax_k, _ = mse.candidate_scales(g)
    k = torch.searchsorted(amax_k, chosen)
    assert torch.equal(amax_k[k], chosen)
    got, best = err.gather(1, k.unsqueeze(-1)).squeeze(-1), err.min(-1).values
    assert (got <= best * (1 + 1e-5) + 1e-30).all()
    assert (chosen != mse.mse_amax_reference(w, g)).any()  # the weighting changes choices


def test_identity_hessian_gives_the_plain_sweep():
    w = torch.cat([_weight("normal"), _weight("heavy", seed=1)])
    g = w.abs().max()
    h = 4 * torch.eye(16).expand(w.shape[1] // 16, 16, 16)  # a power of two: exact scaling
    assert torch.equal(hessian.hessian_amax_reference(w, g, h, chunk=100), mse.mse_amax_reference(w, g))


def test_zero_hessian_blocks_keep_the_plain_choice():
    w, g = _weight("normal"), torch.tensor(4.0)
    h = _correlated_hessian(w.shape[1])
    h[1] = 0  # input channels 16..31 never fired
    got = hessian.hessian_amax_reference(w, g, h).reshape(w.shape[0], -1)
    assert torch.equal(got[:, 1], mse.mse_amax_reference(w, g).reshape(w.shape[0], -1)[:, 1])
    assert (hessian.hessian_amax_reference(w, torch.tensor(0.0), h) == 0).all()


def test_the_plain_pruning_facts_do_not_hold_under_a_hessian():
    """Half-scale dominance (mse.py fact 1) fails: with correlated inputs a candidate whose every
    element error is no larger can have the larger weighted error."""
    w = _weight("normal", out=256)
    g, h = w.abs().max(), _correlated_hessian(w.shape[1], seed=3)
    _, s_k = mse.candidate_scales(g)
    xb = w.reshape(w.shape[0], -1, 16).transpose(0, 1)
    weighted = hessian.weighted_errors(xb, s_k, h.float())  # [nb, rows, 126]
    plain = mse.block_errors(w.reshape(-1, 16).abs(), s_k.expand(w.numel() // 16, -1))
    plain = plain.reshape(w.shape[0], -1, 126).transpose(0, 1)
    a = xb.abs().amax(-1, keepdim=True)
    ks = torch.arange(15, 126)
    dominated = (a * nvfp4.rdiv(1.0, s_k[ks]) <= 3.0) & (plain[..., ks - 8] <= plain[..., ks])
    violated = dominated & (weighted[..., ks - 8] > weighted[..., ks])
    assert violated.any()


def test_block_hessian():
    x = torch.randn(5, 7, 32)
    h = hessian.block_hessian(x)
    xb = x.reshape(-1, 2, 16)
    assert torch.allclose(h[1], xb[:, 1].T @ xb[:, 1], rtol=1e-5, atol=1e-5)


def _weighted_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    d = (w.detach().double() - q.detach().double()).reshape(w.shape[0], -1, 16)
    return float(torch.einsum("rbi,bij,rbj->", d, h.double(), d))


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_qwen3_moe"])
def test_sweep_is_never_worse_than_max_by_its_objective(model_name):
    """Per weight and expert, the swept fake-quant weight's Hessian-weighted error is at most max
    calibration's (max's scale byte is one of the 126 candidates); dead experts are listed."""
    model = calibrated(model_name, "nvfp4_hessian_mse")
    inputs = weight_inputs(model)
    hs = {n: (inputs[n].hessian.clone(), inputs[n].seen.clone()) for n, _, _ in weight_quantizers(model)}
    before = {n: wq.fake_quant(w).clone() for n, wq, w in weight_quantizers(model)}
    out = mse_sweep(model, RunContext.single(), "reference", hessian=True)
    assert out["method"] == "hessian_mse" and out["kernel"] == ["hessian_reference"]
    dead, checked, better = [], 0, 0
    for n, wq, w in weight_quantizers(model):
        assert inputs[n].hessian is None  # freed after the sweep
        h, seen = hs[n]
        after = wq.fake_quant(w)
        flat = lambda t: t.reshape(-1, *t.shape[-2:])  # noqa: E731
        for e in range(flat(w).shape[0]):
            if int(seen[e]) == 0:
                dead.append(f"{n}[{e}]")
                continue
            ew, em = (
                _weighted_error(flat(w)[e], flat(after)[e], h[e]),
                _weighted_error(flat(w)[e], flat(before[n])[e], h[e]),
            )
            assert ew <= em * (1 + 1e-6), (n, e, ew, em)
            checked, better = checked + 1, better + (ew < em)
    assert out["fallback"] == (dead if any(isinstance(m, QuantExpertsMixin) for m in model.modules()) else [])
    assert checked > 0 and better > 0


def test_identity_hessians_in_the_pipeline_equal_the_plain_sweep():
    model = calibrated("tiny_qwen3_moe", "nvfp4_mse")
    mse_sweep(model, RunContext.single(), "reference")
    plain = {n: wq.block_amax.clone() for n, wq, _ in weight_quantizers(model)}
    for _, wq, w in weight_quantizers(model):  # back to max calibration, then identity Hessians
        wq.calibrate(w)
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.weight_quantizer is not None:
            m.input_quantizer.hessian = (
                2 * torch.eye(16, dtype=torch.float64).expand(1, m.in_features // 16, 16, 16).clone()
            )
        elif isinstance(m, QuantExpertsMixin):
            for q, p in ((m.gate_up_input, m.first_proj), (m.down_input, "down_proj")):
                n, inp = m.tokens.numel(), m.logical_weight(p).shape[-1]
                q.hessian = 2 * torch.eye(16, dtype=torch.float64).expand(n, inp // 16, 16, 16).clone()
    from nvfp4cal.model.insert import share_global_amax

    share_global_amax(model)
    mse_sweep(model, RunContext.single(), "reference", hessian=True)
    for n, wq, _ in weight_quantizers(model):
        assert torch.equal(wq.block_amax, plain[n]), n


def _near_tie_or_equal(w, g, h, got, want):
    """Choices equal, or (where the backends' fp32 dot products round differently) equally good in fp64."""
    diff = (got.reshape(-1) != want.reshape(-1)).nonzero().squeeze(-1)
    if diff.numel():
        _, err = hessian.brute_force_fp64(w, g, h)
        amax_k, _ = mse.candidate_scales(g)
        a, b = (torch.searchsorted(amax_k, t.reshape(-1)[diff]) for t in (got, want))
        assert ((err[diff, a] - err[diff, b]).abs() <= 1e-5 * err[diff, b] + 1e-30).all()
    return diff.numel()


def test_triton_kernel_matches_the_reference():
    """The kernel's choices equal the reference's, all experts in one launch (the interpreter on CPU; the
    compiled kernel on CUDA tensors with NVFP4CAL_GPU_TESTS=1)."""
    from nvfp4cal.numerics.kernels.hessian_sweep import hessian_amax_triton

    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    w = torch.stack([_weight("normal", 32, 32), _weight("heavy", 32, 32, seed=2)])
    g = w.abs().flatten(1).amax(-1)
    g[1] *= 3  # experts with different global amaxes
    h = torch.stack([_correlated_hessian(32, seed=5), _correlated_hessian(32, seed=6)])
    got = hessian_amax_triton(w.to(dev), g.to(dev), h.to(dev)).cpu()
    for e in range(2):
        want = hessian.hessian_amax_reference(w[e], g[e], h[e]).reshape(32, -1)
        assert _near_tie_or_equal(w[e], g[e], h[e], got[e], want) <= 1
    assert (hessian_amax_triton(w.to(dev), torch.zeros(2, device=dev), h.to(dev)) == 0).all()


def _hard_hessian(kind: str, inp: int = 32, seed: int = 0) -> torch.Tensor:
    """Block Hessians that stress the bound: heavy-tailed activations, channels whose scales span
    e^12 with near-collinear pairs, a rank-deficient one (fewer tokens than 16), a silent channel."""
    g = torch.Generator().manual_seed(seed)
    if kind == "heavy":
        x = torch.distributions.StudentT(torch.tensor(1.5)).sample((400, inp))
    elif kind == "ill":
        x = torch.randn(400, inp, generator=g)
        x[:, 1::4] = x[:, 0::4] + 3e-2 * torch.randn(400, inp // 4, generator=g)  # correlation ~1 - 5e-4
        x = x * torch.rand(inp, generator=g).mul(12).exp()
    elif kind == "singular":
        x = torch.randn(8, inp, generator=g)
    elif kind == "silent":
        x = torch.randn(400, inp, generator=g) @ (torch.eye(inp) + 0.4 * torch.randn(inp, inp, generator=g))
        x[:, 3] = 0
    else:
        raise ValueError(kind)
    return hessian.block_hessian(x)


def _hard_weight(out: int = 32, inp: int = 32) -> torch.Tensor:
    """Normal and heavy-tailed rows, an all-zero row, and rows far below the global amax (their K_top
    is near the subnormal floor, where the walk up has no half-scale rule for its first candidates)."""
    w = torch.cat([_weight("normal", out // 2, inp), _weight("heavy", out // 2, inp, seed=4)])
    w[3] = 0
    w[5] *= 1e-4
    w[6, :16] *= 1e-6
    return w


@pytest.mark.parametrize("kind", ["heavy", "ill", "singular", "silent"])
def test_the_bound_holds_on_hard_hessians(kind):
    """err_k >= f E_k for every block and candidate, in the fp32 arithmetic the kernel compares (and with
    margin 2^-12 against fp64); the factor is 0 exactly where the correlation matrix is (near) singular."""
    w, h = _hard_weight(), _hard_hessian(kind)
    hdiag, f = hessian.pruning_factors(h)
    _, s_k = mse.candidate_scales(w.abs().max())
    xb = w.reshape(w.shape[0], -1, 16).transpose(0, 1)  # [nb, rows, 16]
    err = hessian.weighted_errors(xb, s_k, h)  # fp32 [nb, rows, 126]
    sc = s_k.view(1, 1, -1, 1)
    q = nvfp4.e2m1_round(xb.abs().unsqueeze(2) * nvfp4.rdiv(1.0, sc)) * sc
    d = xb.unsqueeze(2) - torch.where(xb.unsqueeze(2) < 0, -q, q)
    e32 = mse.tree_sum((d * d) * hdiag[:, None, None, :])
    assert (err >= f[:, None, None] * e32).all()
    d64 = d.double()
    err64 = torch.einsum("bnki,bij,bnkj->bnk", d64, h.double(), d64)
    assert (err64 >= f.double()[:, None, None] * e32.double() * (1 + 2.0**-12)).all()
    if kind == "singular":
        assert (f == 0).all()
    else:
        assert (f > 0).all() and (f < 1).all()


def test_non_finite_hessian_blocks_get_no_bound():
    h = _hard_hessian("heavy")
    h[0, 2, 5] = float("nan")
    h[1, 0, 0] = float("inf")
    assert (hessian.pruning_factors(h)[1] == 0).all()


def test_pruned_kernel_equals_the_exhaustive_kernel():
    """The pruned kernel skips candidates by the bound and keeps every choice of the kernel that evaluates
    all 126 (same fp32 arithmetic: equal bytes), which is the reference's up to near ties. One column
    block per kind of Hessian, 16 rows (one tile) with a zero row and rows near the subnormal floor."""
    from nvfp4cal.numerics.kernels.hessian_sweep import hessian_amax_baseline, hessian_amax_triton

    dev = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    kinds = ["heavy", "ill", "singular", "silent"]
    h = torch.cat([_hard_hessian(k, inp=16, seed=i) for i, k in enumerate(kinds)])  # [4, 16, 16]
    w = _hard_weight(16, 64)
    g = w.abs().max()
    got = hessian_amax_triton(w.to(dev), g.to(dev), h.to(dev), block_r=16)
    assert torch.equal(got, hessian_amax_baseline(w.to(dev), g.to(dev), h.to(dev), block_r=16))
    got = got.cpu()
    assert _near_tie_or_equal(w, g, h, got, hessian.hessian_amax_reference(w, g, h).reshape(got.shape)) <= 1


@pytest.mark.parametrize("down", [1, hessian.DOWN])
@pytest.mark.parametrize("kind", ["heavy", "ill", "singular", "silent"])
def test_pruned_reference_equals_the_exhaustive_one(kind, down, monkeypatch):
    """The torch reference evaluates only the candidates the bound leaves open and keeps every choice
    of the sweep over all 126 (rows of every kind, several column blocks; a chunk that splits them;
    a first window of one candidate below K_top, so the walk down decides)."""
    monkeypatch.setattr(hessian, "DOWN", down)
    w = torch.cat([_hard_weight(32, 64), _weight("heavy", 32, 64, seed=7) * 1e3])
    h = torch.cat([_hard_hessian(kind, 32, seed=0), _hard_hessian(kind, 32, seed=1)])
    g = w.abs().max()
    assert torch.equal(hessian.hessian_amax_reference(w, g, h, chunk=16), hessian.hessian_amax_exhaustive(w, g, h))
