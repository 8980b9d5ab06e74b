"""The MSE sweep reference: exact against the unpruned definition, near-optimal against fp64."""

import pytest
import torch

from nvfp4cal.numerics import mse, nvfp4


def _blocks(kind: str, n: int = 4096, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(n, 16, generator=g)
    if kind == "heavy":
        return torch.distributions.StudentT(3.0).sample((n, 16))
    if kind == "tiny_beside_outlier":  # subnormal-range scales: blocks far below the global amax
        x = torch.randn(n, 16, generator=g) * torch.logspace(-6, 0, n).unsqueeze(-1)
        x[0, 0] = 50.0
        return x
    if kind == "special":
        x = torch.randn(n, 16, generator=g)
        x[:64] = 0.0  # all-zero blocks
        x[64:128] = 1.5  # constant blocks
        x[128:192] = 0.0
        x[128:192, 3] = 7.0  # single outlier
        x[192:256] = torch.tensor([0.5, 1, 1.5, 2, 3, 4, 6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 0, 6]) * 0.37
        return x
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["normal", "heavy", "tiny_beside_outlier", "special"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_equals_brute_force(kind, dtype):
    x = _blocks(kind).to(dtype)
    g = x.float().abs().max()
    assert torch.equal(mse.mse_amax_reference(x, g, chunk=1000), mse.brute_force_amax(x, g))


def test_reference_near_fp64_optimum():
    """fp64 over all 126 candidates: the chosen error is the optimum up to fp32 summation noise."""
    x = torch.cat([_blocks("normal", 2048), _blocks("heavy", 2048, 1)]).double()
    g = x.abs().max()
    c = nvfp4.fp8_candidates().double() * g
    s = (c / 6).view(1, -1, 1)
    ax = x.abs().unsqueeze(1)
    err = ((ax - nvfp4.e2m1_round((ax / s).float()).double() * s) ** 2).sum(-1)  # [n, 126], exact divide
    chosen = mse.mse_amax_reference(x.float(), g.float()).double()
    k = (chosen.unsqueeze(-1) - c.float().double()).abs().argmin(-1)
    got = err.gather(1, k.unsqueeze(-1)).squeeze(-1)
    best = err.min(-1).values
    assert (got <= best * (1 + 1e-5) + 1e-30).all()


def test_zero_global_amax_and_zero_blocks():
    assert (mse.mse_amax_reference(torch.zeros(4, 16), torch.tensor(0.0)) == 0).all()
    x = torch.zeros(3, 16)
    x[1, 0] = 1.0
    out = mse.mse_amax_reference(x, torch.tensor(1.0))
    assert out[0] == out[2] == nvfp4.fp8_candidates()[0]  # all-zero block: ties -> smallest candidate


def test_tree_sum_order():
    x = torch.tensor([[1e8, 1.0, -1e8, 1.0] + [0.0] * 12])
    e = x[0]
    assert mse.tree_sum(x)[0] == ((e[0] + e[1]) + (e[2] + e[3]))  # 0 in fp32
    assert mse.tree_sum(x)[0] != ((e[0] + e[1]) + e[2]) + e[3]  # a left-to-right sum gives 1


def test_fact_dominance_from_above():
    """If fl(a*r_k) <= 3 and k >= 15, candidate k-8 (half the scale) has an error no larger."""
    x = torch.cat([_blocks("normal", 512), _blocks("heavy", 512, 2)]).abs()
    amax_k, s_k = mse.candidate_scales(x.max())
    err = mse.block_errors(x, s_k.expand(x.shape[0], -1))
    a = x.amax(-1, keepdim=True)
    covered = (a * (1.0 / s_k) <= 3.0) & (torch.arange(126) >= 15)
    half = err.roll(8, dims=1)  # err[:, k - 8]
    assert covered.any()
    assert (half[covered] <= err[covered]).all()


def test_fact_clip_bound_from_below():
    x = _blocks("heavy", 1024, 3).abs()
    _, s_k = mse.candidate_scales(x.max())
    err = mse.block_errors(x, s_k.expand(x.shape[0], -1))
    lb = torch.stack([mse.clip_bound(x, s_k[k].expand(x.shape[0])) for k in range(126)], -1)
    assert (lb <= err).all()
    assert (lb[:, :-1] >= lb[:, 1:]).all()  # grows as the scale shrinks


@pytest.mark.parametrize("g", [1.0, 3e-3, 1344.0, 1e-30, 7.3e12])
def test_k_tops_equal_the_direct_count(g):
    """K_top by binary search over exact fp32 thresholds equals the count of fl(a * r_k) > 3, also for amaxes
    on a threshold, one ulp either side of it, zero, and the global amax itself."""
    g = torch.tensor(g)
    _, s_k = mse.candidate_scales(g)
    r = nvfp4.rdiv(1.0, s_k)
    t = (3.0 / r.double()).float()
    a = torch.cat(
        [
            torch.rand(20000, generator=torch.Generator().manual_seed(0)) * g * 1.2,
            t,
            torch.nextafter(t, torch.zeros_like(t)),
            torch.nextafter(t, torch.full_like(t, float("inf"))),
            torch.zeros(2),
            g.reshape(1),
        ]
    )
    assert torch.equal(mse.k_tops(a, s_k), (a.unsqueeze(-1) * r > 3.0).sum(-1) - 1)
