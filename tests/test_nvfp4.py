"""NVFP4 numerics against hand-computed values."""

import pytest
import torch

from nvfp4cal.numerics import nvfp4


def test_e2m1_rounding_ties_and_saturation():
    y = torch.tensor([0, 0.25, 0.2501, 0.74, 0.75, 1.25, 1.2501, 1.74, 1.75, 2.5, 2.51, 3.49, 3.5, 5, 5.01, 1e9])
    want = [0, 0, 0.5, 0.5, 1, 1, 1.5, 1.5, 2, 2, 3, 3, 4, 4, 6, 6]
    assert nvfp4.e2m1_round(y).tolist() == want


def test_e2m1_grid_points_are_fixed_points():
    vals = nvfp4.e2m1_values()
    assert torch.equal(nvfp4.e2m1_round(vals), vals)
    assert nvfp4.e2m1_index(vals).tolist() == list(range(8))


def test_scale_2_and_zero_tensor():
    assert nvfp4.scale_2(torch.tensor(2688.0)).item() == 1.0
    s = nvfp4.scale_2(torch.tensor(0.0))
    assert torch.isfinite(s) and s > 0
    w = torch.zeros(2, 32)
    nib, sc = nvfp4.quantize(w, nvfp4.block_amax(w), s)
    assert (nib == 0).all()
    assert torch.equal(nvfp4.dequantize(nib, sc, s), w)
    assert not torch.isnan(sc.float()).any()


def test_block_scale_bytes_subnormal_and_clamp():
    s2 = torch.tensor(1.0)
    # a/6 = 2^-9 (smallest subnormal), below it clamps to 2^-9, 2^-8 exact subnormal, 448 saturates
    amax = torch.tensor([6 * 2.0**-9, 6 * 2.0**-12, 6 * 2.0**-8, 6 * 1000.0, 6 * 0.3])
    sc = nvfp4.block_scales(amax, s2)
    assert sc.view(torch.uint8).tolist() == [0x01, 0x01, 0x02, 0x7E, sc.view(torch.uint8)[4].item()]
    assert sc.float()[4].item() == 0.3125  # 0.3 -> nearest E4M3 (0.296875 or 0.3125): 0.3125
    assert (sc.view(torch.uint8) & 0x7F != 0x7F).all()


def test_e4m3_round_to_nearest_even():
    s2 = torch.tensor(1.0)
    # between 1.0 (m=0) and 1.125 (m=1): midpoint 1.0625 ties to even (1.0); between 1.125 and 1.25 -> 1.25
    r = nvfp4.block_scales(torch.tensor([6 * 1.0625, 6 * 1.1875]), s2).float().tolist()
    assert r == [1.0, 1.25]


def test_quantize_by_hand():
    # one block, s2 = 1, amax 6 -> scale byte 1.0; values round on the E2M1 grid
    w = torch.tensor([[6.0, -0.25, 0.3, -0.75, 1.3, 1.75, 2.5, -3.5, 5.0, 5.1, 0, -0.0, 1, 2, 3, 4]])
    nib, sc = nvfp4.quantize(w, nvfp4.block_amax(w), torch.tensor(1.0))
    assert sc.float().item() == 1.0
    deq = nvfp4.dequantize(nib, sc, torch.tensor(1.0))
    assert deq.tolist() == [[6, 0, 0.5, -1, 1.5, 2, 2, -4, 4, 6, 0, 0, 1, 2, 3, 4]]
    assert nib[0, 1].item() == 0  # -0.25 rounds to zero, encoded +0


def test_pack_nibble_order():
    nib = torch.tensor([[1, 2, 15, 8]], dtype=torch.uint8)
    packed = nvfp4.pack(nib)
    assert packed.tolist() == [[0x21, 0x8F]]  # low nibble = even column
    assert torch.equal(nvfp4.unpack(packed), nib)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_idempotent(dtype):
    torch.manual_seed(0)
    w = (torch.randn(8, 64) * 3).to(dtype)
    blk, s2 = nvfp4.block_amax(w), nvfp4.scale_2(w.float().abs().max())
    fq = nvfp4.fake_quantize(w.float(), blk, s2)
    nib, sc = nvfp4.quantize(w, blk, s2)
    assert torch.equal(nvfp4.dequantize(nib, sc, s2), fq)
    # quantizing the dequantized weight with the same scales gives the same nibbles
    nib2, sc2 = nvfp4.quantize(fq, blk, s2)
    assert torch.equal(nib2, nib) and torch.equal(sc2.view(torch.uint8), sc.view(torch.uint8))
    # error bounded by half a step of the coarsest grid spacing (2 * step at the top)
    step = (sc.float() * s2).repeat_interleave(16, -1)
    assert ((fq - w.float()).abs() <= step + 1e-6).all()


def test_candidates():
    c = nvfp4.fp8_candidates()
    assert c.numel() == 126
    assert (c[1:] > c[:-1]).all()
    assert c[0] == torch.tensor(2.0**-9) / 448 and c[-1].item() == 1.0
    # every candidate times 448 is an exact E4M3 value
    assert torch.equal((c * 448).to(nvfp4.FP8).float(), c * 448)


def test_candidate_amax_gives_that_scale_byte():
    g = torch.tensor(3.7)
    c = nvfp4.fp8_candidates()
    sc = nvfp4.block_scales(c * g, nvfp4.scale_2(g))
    assert torch.equal(sc.float(), c * 448)


def test_fast_round_equals_index_rounding():
    """e2m1_round (magic numbers) and e2m1_index (its code) agree with bucketing against the midpoints on a
    dense grid, every tie +-1 ulp, zero, subnormals, infinity and NaN (index 7)."""
    vals = torch.cat([torch.linspace(0, 10, 1_000_001), torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])])
    vals = torch.cat([vals, torch.nextafter(vals, torch.tensor(0.0)), torch.nextafter(vals, torch.tensor(20.0))])
    vals = torch.cat([vals, torch.tensor([1e-45, 1e-38, 1e30, float("inf")])])
    ref = nvfp4.e2m1_index_by_thresholds(vals)
    assert torch.equal(nvfp4.e2m1_round(vals), nvfp4.e2m1_values()[ref.long()])
    assert torch.equal(nvfp4.e2m1_index(vals), ref)
    nan = torch.tensor([float("nan")])
    assert nvfp4.e2m1_index(nan).item() == nvfp4.e2m1_index_by_thresholds(nan).item() == 7
