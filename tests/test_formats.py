"""Numerics of lowbit.formats against independent float64 / hand-derived references."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from lowbit.formats import (
    QFormat,
    dequantize_codes,
    effective_scales,
    nest_codes,
    nest_qtensor,
    pack_codes,
    quantize,
    quantize_codes,
    quantize_weight_rtn,
    round_e4m3,
    unpack_codes,
)


def e4m3_values() -> np.ndarray:
    """All finite non-negative E4M3 (fn) values, decoded from their bit fields in float64."""
    vals = []
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue  # NaN
            if e == 0:
                vals.append(m / 8 * 2.0 ** -6)
            else:
                vals.append((1 + m / 8) * 2.0 ** (e - 7))
    return np.array(vals)


def e4m3_round_reference(x: np.ndarray) -> np.ndarray:
    """Nearest E4M3 value, ties to the value with an even mantissa code, saturating at 448."""
    pos = e4m3_values()  # increasing; index parity == mantissa parity
    out = np.empty_like(x)
    for i, v in enumerate(x):
        a = min(abs(v), 448.0)
        j = np.searchsorted(pos, a)
        if j < len(pos) and pos[j] == a:
            r = pos[j]
        else:
            lo, hi = pos[j - 1], pos[j]
            if a - lo < hi - a:
                r = lo
            elif a - lo > hi - a:
                r = hi
            else:
                r = lo if (j - 1) % 2 == 0 else hi
        out[i] = math.copysign(r, v)
    return out


def test_e4m3_rounding_matches_bitfield_reference():
    pos = e4m3_values()
    mids = (pos[1:] + pos[:-1]) / 2
    rng = np.random.default_rng(0)
    x = np.concatenate([pos, -pos, mids, -mids, rng.uniform(-500, 500, 2000), rng.normal(0, 0.01, 2000),
                        [449.0, 460.0, 1e6, -1e6]])
    x = x.astype(np.float32).astype(np.float64)  # exact in fp32 so both sides see the same input
    got = round_e4m3(torch.tensor(x, dtype=torch.float32)).double().numpy()
    np.testing.assert_array_equal(got, e4m3_round_reference(x))


def test_two_bit_int_times_e4m3_scale_is_exact_in_e4m3():
    fmt = QFormat(2, "int")
    scales = e4m3_values()
    scales = scales[scales <= fmt.scale_max]
    for q in range(fmt.qmin, fmt.qmax + 1):
        prod = torch.tensor(q * scales, dtype=torch.float32)
        assert torch.equal(round_e4m3(prod), prod), q
    # and the largest stored scale really is the largest allowed
    w = torch.randn(8, 64)
    qt = quantize(w, fmt)
    assert qt.scales.float().max().item() <= fmt.scale_max


def test_pack_layout_hand_derived():
    # 2-bit codes [1, -1, 0, -2] -> two's complement 01, 11, 00, 10; lowest index lowest bits
    q = torch.tensor([[1, -1, 0, -2]], dtype=torch.int8)
    assert pack_codes(q, 2).tolist() == [[0b10_00_11_01]]
    # 4-bit codes [-8, 7] -> 1000, 0111 -> 0111_1000
    assert pack_codes(torch.tensor([[-8, 7]], dtype=torch.int8), 4).tolist() == [[0x78]]
    # 1-bit codes (half grid) -1 -> 1, 0 -> 0
    q1 = torch.tensor([[-1, 0, 0, -1, 0, 0, 0, -1]], dtype=torch.int8)
    assert pack_codes(q1, 1).tolist() == [[0b1000_1001]]


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4, 8]), rows=st.integers(1, 5), k8=st.integers(1, 8), seed=st.integers(0, 10**6))
def test_pack_roundtrip(bits, rows, k8, seed):
    fmt = QFormat(bits, "half" if bits == 1 else "int")
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(fmt.qmin, fmt.qmax + 1, (rows, 8 * k8), generator=g, dtype=torch.int8)
    packed = pack_codes(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == 8 * k8 * fmt.container_bits // 8
    assert torch.equal(unpack_codes(packed, bits), q)


def reference_quantize_f64(x: np.ndarray, fmt: QFormat, eff: np.ndarray) -> np.ndarray:
    g = x.reshape(x.shape[0], -1, fmt.group_size)
    s = eff[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        r = g / s
    r = np.floor(r) if fmt.grid == "half" else np.round(r)  # numpy rounds half to even
    q = np.clip(r, fmt.qmin, fmt.qmax)
    q = np.where(s == 0, 0, q)
    return q.reshape(x.shape)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4, 8]), grid=st.sampled_from(["int", "half"]),
       scale_dtype=st.sampled_from(["e4m3", "fp16", "fp32"]), group=st.sampled_from([8, 16, 32]),
       rows=st.integers(1, 6), groups=st.integers(1, 4), seed=st.integers(0, 10**6), spread=st.floats(1e-3, 1e3))
def test_quantize_matches_float64_reference_and_error_bound(bits, grid, scale_dtype, group, rows, groups, seed, spread):
    if bits == 1:
        grid = "half"
    fmt = QFormat(bits, grid, group, scale_dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, group * groups, generator=g) * spread
    x[0, :group] = 0.0  # an all-zero group
    qt = quantize(x, fmt, per_row=True)
    eff = qt.eff_scales()
    # codes agree with an independent float64 computation using the same effective scales
    # (fp32 division vs float64 division can only differ exactly at rounding ties)
    ref = reference_quantize_f64(x.double().numpy(), fmt, eff.double().numpy())
    got = qt.codes.double().numpy()
    mismatch = got != ref
    assert mismatch.mean() < 1e-3
    # every element within half a step of its value, or clipped only by E4M3 scale rounding
    deq = qt.dequantize().double()
    step = eff.double().repeat_interleave(group, dim=-1)
    err = (deq - x.double()).abs()
    # scales are rounded so that nothing clips: every element within half a step
    # (fp16 scales may round down by 2^-11 relative: allow that much clipping)
    top = max(abs(fmt.level_lo), fmt.level_hi)
    slack = top * 2.0 ** -10 if scale_dtype == "fp16" else 1e-6
    assert torch.all(err <= step * (0.5 + slack) + 1e-30)
    assert torch.all(qt.codes[0, :group] == 0) and torch.all(deq[0, :group] == 0) if grid == "int" else True


def test_dequantize_values_hand_computed():
    fmt = QFormat(2, "half", 4, "fp32")
    q = torch.tensor([[-2, -1, 0, 1]], dtype=torch.int8)
    v = dequantize_codes(q, torch.tensor([[2.0]]), fmt)
    assert v.tolist() == [[-3.0, -1.0, 1.0, 3.0]]
    fmt_i = QFormat(2, "int", 4, "fp32")
    assert dequantize_codes(q, torch.tensor([[2.0]]), fmt_i).tolist() == [[-4.0, -2.0, 0.0, 2.0]]


def test_bits_per_weight_formula():
    fmt = QFormat(2, "int", 16, "e4m3")
    assert fmt.bits_per_weight(64, 128) == pytest.approx(2 + 8 / 16 + 32 / (64 * 128))
    assert QFormat(3, "int", 32, "fp16").bits_per_weight(4, 64) == pytest.approx(4 + 16 / 32)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("grid", ["int", "half"])
def test_nested_codes_match_float_rounding(bits, grid):
    fmt = QFormat(bits, grid)
    q8 = torch.arange(-128, 128, dtype=torch.int8)
    d = 8 - bits
    if grid == "int":
        ref = np.floor(q8.double().numpy() / 2 ** d + 0.5)  # round half up
    else:
        ref = np.floor((q8.double().numpy() + 0.5) / 2 ** d)  # bin containing the centre
    ref = np.clip(ref, fmt.qmin, fmt.qmax)
    assert np.array_equal(nest_codes(q8, fmt).double().numpy(), ref)


def test_nested_tensor_shares_scales_and_tracks_the_8bit_values():
    w = torch.randn(16, 64)
    qt8 = quantize(w, QFormat(8, "int"))
    qt4 = nest_qtensor(qt8, QFormat(4, "int"))
    assert torch.equal(qt4.scales.float(), qt8.scales.float())
    # each 4-bit value lies within half a 4-bit step (plus clipping at the top) of the 8-bit value
    step4 = qt4.eff_scales().repeat_interleave(16, dim=-1)
    diff = (qt4.dequantize() - qt8.dequantize()).abs()
    inside = qt4.codes < QFormat(4).qmax
    assert torch.all(diff[inside] <= step4[inside] * 0.5 + 1e-6)


def test_clip_search_never_worse_and_helps_at_two_bits():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g)
    fmt = QFormat(2, "int")
    plain = quantize_weight_rtn(w, fmt, clip_search=False)
    searched = quantize_weight_rtn(w, fmt, clip_search=True)
    e_plain = (plain.dequantize() - w).pow(2).reshape(64, -1, 16).sum(-1)
    e_search = (searched.dequantize() - w).pow(2).reshape(64, -1, 16).sum(-1)
    assert torch.all(e_search <= e_plain + 1e-6)
    assert e_search.sum() < 0.9 * e_plain.sum()


def test_weight_error_against_float64_rtn():
    """4-bit RTN relative error is near what an independent float64 RTN gives."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 128, generator=g, dtype=torch.float64)
    fmt = QFormat(4, "int", 16, "fp32")
    wg = w.reshape(32, -1, 16)
    s = torch.maximum(wg.amax(-1).clamp(min=0) / 7, wg.amin(-1).clamp(max=0) / -8)
    ref = (torch.clamp(torch.round(wg / s[..., None]), -8, 7) * s[..., None]).reshape(32, 128)
    ours = quantize_weight_rtn(w.float(), fmt, clip_search=False).dequantize().double()
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_bad_formats_are_rejected():
    with pytest.raises(ValueError, match="bits"):
        QFormat(5)
    with pytest.raises(ValueError, match="half"):
        QFormat(1, "int")
    with pytest.raises(ValueError, match="multiple"):
        quantize(torch.randn(2, 10), QFormat(2, group_size=16))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_table_unpacking_equals_the_shift_definition(bits):
    """unpack_codes (a 256-entry table) gives the shift-and-sign-extend definition's codes for
    every byte value, in every position, and inverts pack_codes."""
    from lowbit.formats import _unpack_codes_arith

    every = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    assert torch.equal(unpack_codes(every, bits), _unpack_codes_arith(every, bits))
    per_byte = unpack_codes(every, bits).shape[-1] // 64
    lo, hi = (-(1 << (8 // per_byte - 1)), (1 << (8 // per_byte - 1)) - 1)
    q = torch.randint(lo, hi + 1, (3, 16 * per_byte), dtype=torch.int8)
    assert torch.equal(unpack_codes(pack_codes(q, bits), bits), q)


def _search_one_at_a_time(w, fmt, global_scale, clip_search=True, ratios=(0.3, 1.0, 15)):
    """The clipping search written as the plain loop it is defined by: candidates from the
    highest ratio down, a candidate replaces the best only when its error is strictly lower."""
    from lowbit.formats import dequantize_codes, e4m3_group_scales, effective_scales, quantize_codes, \
        unclipped_group_scales

    w = w.float()
    base = unclipped_group_scales(w, fmt)
    lo, hi, n = ratios
    best_err = best = None
    for r in (torch.linspace(hi, lo, n).tolist() if clip_search else [1.0]):
        stored = e4m3_group_scales(base * r / global_scale, fmt) if fmt.scale_dtype == "e4m3" \
            else (base * r).to(fmt.scale_torch_dtype)
        eff = effective_scales(stored, global_scale)
        deq = dequantize_codes(quantize_codes(w, eff, fmt), eff, fmt)
        err = (deq - w).reshape(*w.shape[:-1], -1, fmt.group_size).pow(2).sum(-1)
        if best is None:
            best_err, best = err, stored.float()
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, stored.float(), best)
    return best


@pytest.mark.parametrize("bits,grid,scale_dtype", [(2, "int", "e4m3"), (3, "half", "e4m3"), (4, "int", "fp16"),
                                                    (8, "half", "fp32")])
def test_batched_clip_search_equals_the_sequential_definition(bits, grid, scale_dtype):
    """search_group_scales evaluates all candidates at once (in row chunks); its stored scales
    equal the one-candidate-at-a-time loop exactly, ties included (integer-valued and
    zero-heavy weights make ties common), for GPTQ-sized slices and whole weights."""
    from lowbit.formats import search_group_scales, weight_global_scale

    fmt = QFormat(bits, grid, 16, scale_dtype)
    g = torch.Generator().manual_seed(bits)
    for shape in [(576, 16), (5, 3, 64), (40, 8192)]:  # the last one spans several row chunks
        for kind in range(3):
            w = torch.randn(shape, generator=g) * 10.0 ** (kind - 2)
            if kind == 1:
                w[..., ::3] = 0
            if kind == 2:
                w = w.round()
            gs = weight_global_scale(w, fmt)
            for clip in (True, False):
                got = search_group_scales(w, fmt, gs, clip)
                assert got.shape == (*shape[:-1], shape[-1] // 16)
                assert torch.equal(got.float(), _search_one_at_a_time(w, fmt, gs, clip))
