"""Tests for lowbit.hadamard: constructions, fast transform, randomised rotations."""

from __future__ import annotations

import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.hadamard import (
    BASE_SIZES,
    decompose,
    hadamard_matrix,
    hadamard_transform,
    random_hadamard_matrix,
    random_signs,
    supported_hadamard_size,
)

# Sizes whose explicit n x n matrix is cheap enough to build and square exactly.
POWERS = [1, 2, 4, 8, 32]
SIZES = sorted({m * p for m in BASE_SIZES for p in POWERS} | {64, 576, 1024, 1536})
UNSUPPORTED = [3, 5, 6, 7, 9, 10, 52, 68, 100, 11008, 13824]


def _rand(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------- #
# Sizes
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("m", BASE_SIZES)
@pytest.mark.parametrize("p", [1, 2, 4, 128, 4096])
def test_decompose_roundtrip(m, p):
    n = m * p
    assert supported_hadamard_size(n)
    assert decompose(n) == (m, p)


def test_decompose_examples():
    assert decompose(24) == (12, 2)
    assert decompose(8) == (1, 8)
    assert decompose(1536) == (12, 128)
    assert decompose(5120) == (20, 256)
    assert decompose(14336) == (28, 512)


@pytest.mark.parametrize("n", UNSUPPORTED + [0, -4])
def test_unsupported_sizes(n):
    assert not supported_hadamard_size(n)
    with pytest.raises(ValueError, match="not supported"):
        decompose(n)
    with pytest.raises(ValueError, match="not supported"):
        hadamard_matrix(n)
    if n > 0:
        with pytest.raises(ValueError, match="not supported"):
            hadamard_transform(torch.zeros(2, n))


def test_error_message_names_nearest_sizes():
    with pytest.raises(ValueError, match=r"nearest supported sizes: 64 and 72"):
        hadamard_matrix(68)
    with pytest.raises(ValueError, match=r"nearest supported sizes: 48 and 56"):
        hadamard_matrix(52)
    with pytest.raises(ValueError, match=r"nearest supported sizes: 96 and 112"):
        hadamard_matrix(100)
    with pytest.raises(ValueError, match=r"12\*2\^k, 20\*2\^k, 28\*2\^k"):
        hadamard_matrix(6)


def test_non_integer_sizes():
    assert not supported_hadamard_size(8.0)
    assert not supported_hadamard_size(True)
    with pytest.raises(TypeError):
        hadamard_matrix(8.0)


# --------------------------------------------------------------------------- #
# Explicit matrices
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("n", SIZES)
def test_hadamard_matrix_is_hadamard(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert bool(((h == 1) | (h == -1)).all())
    # Entries are +-1, so every entry of H H^T is an integer <= n: float64 is exact.
    gram = h @ h.T
    assert torch.equal(gram, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("m", BASE_SIZES)
def test_kronecker_ordering(m):
    p = 8
    h = hadamard_matrix(m * p)
    hm = hadamard_matrix(m)
    hp = hadamard_matrix(p)
    assert torch.equal(h, torch.kron(hm, hp))
    # H_n[a*p + b, c*p + d] == H_m[a, c] * S_p[b, d]
    assert torch.equal(h.view(m, p, m, p), hm[:, None, :, None] * hp[None, :, None, :])


def test_sylvester_closed_form():
    n = 64
    i = torch.arange(n)
    both = i[:, None] & i[None, :]
    parity = torch.zeros(n, n, dtype=torch.int64)
    for b in range(6):
        parity ^= (both >> b) & 1
    assert torch.equal(hadamard_matrix(n, dtype=torch.int64), 1 - 2 * parity)
    assert torch.equal(hadamard_matrix(2), torch.tensor([[1.0, 1.0], [1.0, -1.0]]))


def test_symmetry_of_bases():
    # Paley I bases are not symmetric (H + H^T = 2I); Paley II (28) and Sylvester are.
    for m in (12, 20):
        h = hadamard_matrix(m)
        assert not torch.equal(h, h.T)
        assert torch.equal(h + h.T, 2 * torch.eye(m, dtype=h.dtype))
    for n in (28, 64):
        h = hadamard_matrix(n)
        assert torch.equal(h, h.T)


def test_large_8192_matrix():
    n = 8192
    h = hadamard_matrix(n, dtype=torch.int8)
    assert h.shape == (n, n)
    lo, hi = h.aminmax()
    assert lo.item() == -1 and hi.item() == 1 and bool(h.ne(0).all())
    # A full n^3 Gram product is too slow for a unit test; check a row subset
    # (float32 is exact: integer partial sums <= 8192 < 2^24), column block by block.
    rows = torch.tensor([0, 1, 2, 3, 77, 1000, 4095, 4096, 8191])
    sub = h[rows].to(torch.float32)
    gram = torch.cat([sub @ blk.to(torch.float32).T for blk in h.split(1024)], dim=1)
    expected = torch.zeros(len(rows), n)
    expected[torch.arange(len(rows)), rows] = n
    assert torch.equal(gram, expected)
    # transform agrees with the explicit matrix (checked on a subset of outputs)
    x = _rand((3, n), torch.float32)
    ref = (x.double() @ sub.double().T) / math.sqrt(n)
    torch.testing.assert_close(hadamard_transform(x)[:, rows].double(), ref, rtol=1e-5, atol=1e-5)


def test_integer_dtype_and_device_args():
    h = hadamard_matrix(24, dtype=torch.int8, device="cpu")
    assert h.dtype == torch.int8
    assert torch.equal(h.double(), hadamard_matrix(24))


# --------------------------------------------------------------------------- #
# Fast transform
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("n", SIZES)
def test_transform_matches_matrix_float64(n):
    h = hadamard_matrix(n)
    x = _rand((5, n), seed=n)
    xh_t, xh = x @ h.T, x @ h
    for scale in (None, 1.0, 0.25):
        s = 1 / math.sqrt(n) if scale is None else scale
        torch.testing.assert_close(hadamard_transform(x, scale), xh_t * s, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(
            hadamard_transform(x, scale, transpose=True), xh * s, rtol=1e-10, atol=1e-10
        )


@pytest.mark.parametrize("n", [m * p for m in BASE_SIZES for p in (1, 4, 128)])
def test_transform_matches_matrix_float32(n):
    h = hadamard_matrix(n)
    x = _rand((2, 3, n), torch.float32, seed=n)
    y = hadamard_transform(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    ref = x.double() @ h.T / math.sqrt(n)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 96, 160, 224])
def test_transform_half_dtypes(dtype, n):
    x = _rand((4, n), dtype, seed=1)
    y = hadamard_transform(x)
    assert y.dtype == dtype
    # reference: exact product of the (already rounded) input, rounded once to dtype
    ref = (x.double() @ hadamard_matrix(n).T / math.sqrt(n)).to(dtype)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)  # float32 compute, single rounding


def test_transform_leading_shapes_and_noncontiguous():
    n = 48
    h = hadamard_matrix(n)
    x = _rand((2, 3, 4, n))
    torch.testing.assert_close(hadamard_transform(x), x @ h.T / math.sqrt(n))
    v = _rand((n,))
    torch.testing.assert_close(hadamard_transform(v), h @ v / math.sqrt(n))
    xt = _rand((n, 7)).T  # non-contiguous view with last dim n
    assert not xt.is_contiguous()
    torch.testing.assert_close(hadamard_transform(xt), xt @ h.T / math.sqrt(n))
    empty = torch.zeros(0, 3, n)
    assert hadamard_transform(empty).shape == (0, 3, n)


def test_transform_does_not_modify_input():
    x = _rand((3, 20))
    x0 = x.clone()
    hadamard_transform(x)
    hadamard_transform(x, transpose=True)
    assert torch.equal(x, x0)


def test_transform_rejects_bad_input():
    with pytest.raises(TypeError):
        hadamard_transform(torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(ValueError):
        hadamard_transform(torch.tensor(1.0))


@pytest.mark.parametrize("n", [1, 2, 16, 1024, 8192])
def test_involution_sylvester(n):
    x = _rand((3, n))
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x)), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [12, 20, 28, 24, 40, 56, 1536, 2560, 3584])
def test_inverse_general(n):
    # x @ (H^T H) / n == x: forward then transposed transform is the identity.
    x = _rand((3, n))
    y = hadamard_transform(x)
    torch.testing.assert_close(hadamard_transform(y, transpose=True), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x, transpose=True)), x)
    # orthogonality: norms preserved
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    if decompose(n)[0] in (12, 20):
        # H is not symmetric here, so applying the forward transform twice is NOT the identity
        assert not torch.allclose(hadamard_transform(y), x)


def test_transform_autograd():
    n = 40
    x = _rand((2, n)).requires_grad_(True)
    y = hadamard_transform(x)
    g = _rand((2, n), seed=3)
    y.backward(g)
    # d/dx <g, x H^T/sqrt n> = g H / sqrt n
    torch.testing.assert_close(x.grad, g @ hadamard_matrix(n) / math.sqrt(n))


def test_transform_fast_enough():
    x = _rand((64, 8192), torch.float32)
    hadamard_transform(x)  # warm-up
    best = math.inf
    for _ in range(3):  # best of 3: robust to a busy machine
        t0 = time.perf_counter()
        hadamard_transform(x)
        best = min(best, time.perf_counter() - t0)
    assert best < 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transform_cuda(dtype):
    n = 1536
    x = _rand((8, n), dtype)
    y = hadamard_transform(x.cuda())
    assert y.device.type == "cuda" and y.dtype == dtype
    torch.testing.assert_close(y.cpu(), hadamard_transform(x), rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------- #
# Randomised Hadamard
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("n", [1, 8, 12, 20, 28, 96, 768])
def test_random_hadamard_orthogonal(n):
    q = random_hadamard_matrix(n, seed=1234)
    assert q.shape == (n, n) and q.dtype == torch.float64
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(q @ q.T, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(q.T @ q, eye, rtol=0, atol=1e-12)
    # it really is H diag(s) / sqrt(n)
    s = random_signs(n, 1234)
    torch.testing.assert_close(q, hadamard_matrix(n) * s / math.sqrt(n), rtol=0, atol=0)


def test_random_signs_seeded():
    a = random_signs(4096, 7)
    assert torch.equal(a, random_signs(4096, 7))
    assert not torch.equal(a, random_signs(4096, 8))
    assert bool(((a == 1) | (a == -1)).all())
    assert 0.4 < (a > 0).double().mean().item() < 0.6
    q = random_hadamard_matrix(64, seed=7)
    assert torch.equal(q, random_hadamard_matrix(64, seed=7))
    assert not torch.equal(q, random_hadamard_matrix(64, seed=8))


@pytest.mark.parametrize("n", [16, 12, 20, 28, 48, 1536])
def test_random_hadamard_identities(n):
    seed = 99
    q = random_hadamard_matrix(n, seed)
    s = random_signs(n, seed)
    x = _rand((6, n), seed=n + 1)
    # x @ Q^T == hadamard_transform(x * s)
    torch.testing.assert_close(hadamard_transform(x * s), x @ q.T, rtol=1e-10, atol=1e-10)
    # x @ Q == hadamard_transform(x, transpose=True) * s   (the inverse rotation)
    torch.testing.assert_close(hadamard_transform(x, transpose=True) * s, x @ q, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x * s), transpose=True) * s, x)
    # weight folding: y = x W^T = (x Q^T) (W Q^T)^T with W Q^T = hadamard_transform(W * s)
    w = _rand((5, n), seed=n + 2)
    w_rot = hadamard_transform(w * s)
    torch.testing.assert_close(w_rot, w @ q.T, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hadamard_transform(x * s) @ w_rot.T, x @ w.T, rtol=1e-10, atol=1e-10)


def test_random_hadamard_dtype():
    q = random_hadamard_matrix(24, seed=0, dtype=torch.float32)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q.double(), random_hadamard_matrix(24, seed=0), rtol=1e-7, atol=1e-7)


# --------------------------------------------------------------------------- #
# Property test
# --------------------------------------------------------------------------- #
_PROP_SIZES = [m * p for m in BASE_SIZES for p in (1, 2, 4, 16, 32) if m * p > 1]


@settings(max_examples=30, deadline=None)
@given(
    lead=st.lists(st.integers(min_value=0, max_value=4), min_size=0, max_size=3),
    n=st.sampled_from(_PROP_SIZES),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    scale=st.one_of(st.none(), st.floats(min_value=-4.0, max_value=4.0, allow_nan=False)),
    transpose=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_property_transform_matches_matrix(lead, n, dtype, scale, transpose, seed):
    x = _rand((*lead, n), dtype, seed=seed)
    y = hadamard_transform(x, scale, transpose=transpose)
    assert y.shape == x.shape and y.dtype == dtype
    s = 1 / math.sqrt(n) if scale is None else scale
    h = hadamard_matrix(n)
    ref = x.double() @ (h if transpose else h.T) * s
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * max(1.0, abs(s) * math.sqrt(n)))


def test_fast_transform_equals_its_autograd_form_bit_for_bit():
    """The buffer (no autograd) and stacking (autograd) butterflies give identical bits and
    leave the input untouched."""
    from lowbit.hadamard import hadamard_transform

    for n in (16, 96, 512, 1536):
        x = torch.randn(33, n, generator=torch.Generator().manual_seed(n))
        keep = x.clone()
        fast = hadamard_transform(x)
        slow = hadamard_transform(x.clone().requires_grad_(True)).detach()
        assert torch.equal(fast, slow) and torch.equal(x, keep)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [64, 576, 1536])
@pytest.mark.parametrize("transpose", [False, True])
def test_half_inputs_round_once_and_equal_the_autograd_form(dtype, n, transpose):
    """Half inputs: computed in float32 and rounded once to the input dtype. Without autograd the
    scaling writes the output dtype directly; the result equals, bit for bit, the autograd form
    (scale in float32, then cast) and the pipeline spelled out here with the module's pieces."""
    from lowbit.hadamard import _base_matrix_cached, _fwht_last

    g = torch.Generator().manual_seed(n)
    x = (torch.randn(5, 3, n, generator=g) * torch.logspace(-4, 4, n)).to(dtype)
    fast = hadamard_transform(x, transpose=transpose)
    slow = hadamard_transform(x.clone().requires_grad_(True), transpose=transpose).detach()
    m, p = decompose(n)
    y = x.float().reshape(-1, p)
    y = (_fwht_last(y, p) if p > 1 else y).view(15, m, p)
    if m > 1:
        y = torch.matmul(_base_matrix_cached(m, transpose, torch.float32, y.device), y)
    spelled = (y * (1.0 / math.sqrt(n))).reshape(5, 3, n).to(dtype)
    assert fast.dtype == dtype
    assert torch.equal(fast.view(torch.int16), slow.view(torch.int16))
    assert torch.equal(fast.view(torch.int16), spelled.view(torch.int16))
    # and the transform itself (float64 matrix product, independent of the fast path)
    h = hadamard_matrix(n)
    ref = x.double() @ (h if transpose else h.T) / math.sqrt(n)
    torch.testing.assert_close(fast.double(), ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))
