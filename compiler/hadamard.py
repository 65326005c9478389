r"""Hadamard matrices and fast Hadamard transforms (QuaRot / SpinQuant rotations).

Everything in this module is defined in terms of one family of matrices,
``H_n = hadamard_matrix(n)``, and the fast transform applies *exactly* that
matrix, so the two can be mixed freely.

Hadamard matrices
-----------------
A Hadamard matrix of order ``n`` is an ``n x n`` matrix with entries in
``{+1, -1}`` whose rows are mutually orthogonal, i.e. ``H H^T = n I``.
``H / sqrt(n)`` is therefore orthogonal.  Supported orders are

    n = m * 2^k,   m in {1, 12, 20, 28, 36, 44, 60},  k >= 0

(1, 2, 4, 8, ..., 12, 24, 48, ..., 20, 40, 80, ..., 28, 56, 112, ...).  These
cover the hidden sizes of common LLMs (e.g. 5120 = 20 * 256,
11008 = 43 * 256 is *not* covered, 13824 = 27 * 512 is not covered either,
but 14336 = 28 * 512 is, as is 1536 = 12 * 128 and 576 = 36 * 16).  The
decomposition is unique because the odd parts of the bases (3, 5, 7, 9, 11, 15)
differ and each base carries the factor 4.

Power-of-two part (Sylvester).  ``S_1 = [1]`` and
``S_{2p} = [[S_p, S_p], [S_p, -S_p]] = kron(S_2, S_p)``, so
``S_{2^k} = S_2 (x) S_2 (x) ... (x) S_2`` (k factors) and, in closed form,
``S[i, j] = (-1)^popcount(i & j)``.  ``S`` is symmetric and ``S S = 2^k I``.

Base matrices (Paley).  Let ``q`` be an odd prime and ``chi`` the quadratic
residue character mod ``q``: ``chi(0) = 0``, ``chi(a) = +1`` when ``a`` is a
non-zero square mod ``q``, ``-1`` otherwise.  The Jacobsthal matrix is the
``q x q`` matrix ``Q[i, j] = chi(j - i)`` (indices 0..q-1).  It satisfies
``Q Q^T = q I - J`` and ``Q J = J Q = 0`` (``J`` = all-ones), and
``Q^T = chi(-1) Q``.

* Paley construction I (``q = 3 mod 4``, so ``chi(-1) = -1`` and ``Q`` is
  antisymmetric), order ``q + 1``.  With the antisymmetric conference matrix
  ``C = [[0, 1^T], [-1, Q]]`` (``C C^T = q I``) set ``H = I + C``.  Then
  ``H H^T = (I + C)(I - C) = I + C C^T = (q + 1) I``.
  Used for ``q = 11`` (order 12), ``q = 19`` (order 20), ``q = 43`` (order 44) and
  ``q = 59`` (order 60).

* Paley construction II (``q = 1 mod 4``, so ``Q`` is symmetric), order
  ``2(q + 1)``.  With the symmetric conference matrix
  ``C = [[0, 1^T], [1, Q]]`` (``C C^T = q I``) replace every entry ``0`` by
  ``B = [[1, -1], [-1, -1]]`` and every ``+-1`` by ``+-A`` with
  ``A = [[1, 1], [1, -1]]``; i.e. ``H = kron(C, A) + kron(I, B)``.  Since
  ``A A^T = B B^T = 2 I`` and ``A B^T + B A^T = 0``,
  ``H H^T = 2 C C^T + 2 I = 2(q + 1) I``.
  Used for ``q = 13`` (order 28) and ``q = 17`` (order 36; SmolLM2's width 576 = 36 * 16).

The base matrices are *not* normalised (first row/column are not all ones).
The Paley I bases are *not* symmetric (``H + H^T = 2 I`` since ``C`` is
antisymmetric), so for ``n = 12 * 2^k`` and ``20 * 2^k`` one must distinguish
``H_n`` from ``H_n^T``; the Paley II base ``H_28`` happens to be symmetric
(``C``, ``A`` and ``B`` all are), as are all Sylvester matrices.

Kronecker ordering
------------------
For ``n = m * p`` with ``p = 2^k``::

    H_n = kron(H_m, S_p),   H_n[a*p + b, c*p + d] = H_m[a, c] * S_p[b, d]

i.e. the *slow* (outer) index of a length-``n`` vector selects the block of the
``m x m`` base matrix and the *fast* (inner, contiguous) index goes through the
Sylvester butterfly.  For ``m = 1`` this is plain Sylvester.

Transform
---------
``hadamard_transform(x, scale)`` is defined as ::

    y = scale * (x @ H_n^T)       (along the last dimension of x)

i.e. ``y[..., i] = scale * sum_j H_n[i, j] x[..., j]`` (``H_n`` applied to each
row vector).  The default ``scale = 1/sqrt(n)`` makes the map orthogonal.  If
the last axis of ``x`` is viewed as an ``(m, p)`` matrix ``X`` (row-major, the
same index split as above), then ``x @ H_n^T`` is ``H_m @ X @ S_p^T =
H_m @ X @ S_p``: a butterfly over the contiguous axis (``k`` stages of
``(u, v) -> (u + v, u - v)``, O(n log n)) followed by a small dense ``m x m``
matmul over the other axis (O(n m)).  ``transpose=True`` applies ``H_n^T``
instead (``y = scale * (x @ H_n)``), which is the inverse of the orthogonal
forward transform: ``hadamard_transform(hadamard_transform(x), transpose=True)
== x``.  For pure powers of two ``H`` is symmetric so the flag does nothing and
the orthonormal transform is an involution.

Randomised Hadamard (QuaRot)
----------------------------
``random_hadamard_matrix(n, seed)`` returns the orthogonal matrix ::

    Q = H_n diag(s) / sqrt(n),   s = random_signs(n, seed) in {+1, -1}^n

(columns of ``H_n`` flipped by random signs).  Then ``Q Q^T = H diag(s)^2 H^T / n
= I``.  Identities used to apply it without materialising ``Q`` (all with the
default scale ``1/sqrt(n)``)::

    x @ Q^T = (x * s) @ H^T / sqrt(n)  = hadamard_transform(x * s)
    x @ Q   = (x @ H) * s / sqrt(n)    = hadamard_transform(x, transpose=True) * s

The second is the inverse of the first.  To fold the rotation into a linear
layer ``y = x @ W^T`` (``W`` of shape ``(out, n)``) whose input is rotated as
``x' = x @ Q^T``: ``y = x' @ (W Q^T)^T`` because ``Q^T Q = I``, and
``W Q^T = hadamard_transform(W * s)`` (row-wise), so rotated weights are
computed with the same fast transform.
"""

from __future__ import annotations

import functools
import math
import operator

import torch
from torch import Tensor

__all__ = [
    "register_fwht_kernel",
    "BASE_SIZES",
    "hadamard_matrix",
    "supported_hadamard_size",
    "decompose",
    "hadamard_transform",
    "random_signs",
    "random_hadamard_matrix",
]

#: Non-power-of-two base orders and the prime / Paley construction used for each.
_PALEY_BASES = {12: (11, 1), 20: (19, 1), 28: (13, 2), 36: (17, 2), 44: (43, 1), 60: (59, 1)}
#: All base orders ``m`` (``n = m * 2^k``); 1 stands for pure Sylvester sizes.
BASE_SIZES = (1, 12, 20, 28, 36, 44, 60)

_HALF_DTYPES = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- #
# Sizes
# --------------------------------------------------------------------------- #
def _as_size(n) -> int:
    if isinstance(n, bool):
        raise TypeError(f"Hadamard size must be an integer, got {n!r}")
    try:
        return operator.index(n)
    except TypeError:
        raise TypeError(f"Hadamard size must be an integer, got {n!r}") from None


def _try_decompose(n: int) -> tuple[int, int] | None:
    if n < 1:
        return None
    p = n & -n  # largest power of two dividing n
    m = n // p
    if m == 1:
        return 1, p
    # m is odd here; a base m0 = 4 * odd needs at least the factor 4 from p.
    for base in BASE_SIZES[1:]:
        odd = base // 4
        if m == odd and p >= 4:
            return base, p // 4
    return None


def _nearest_supported(n: int) -> tuple[int | None, int]:
    """Largest supported size < n (None if none) and smallest supported size > n."""
    lower, upper = None, None
    for base in BASE_SIZES:
        p = 1
        while base * p <= max(n, 1) * 2 + 1:
            s = base * p
            if s < n and (lower is None or s > lower):
                lower = s
            if s > n and (upper is None or s < upper):
                upper = s
            p *= 2
    assert upper is not None
    return lower, upper


def _unsupported(n) -> ValueError:
    msg = (
        f"Hadamard size {n} is not supported: supported sizes are n = m * 2^k with "
        f"m in {{{', '.join(map(str, BASE_SIZES))}}} and k >= 0 (i.e. 2^k, "
        + ", ".join(f"{m}*2^k" for m in BASE_SIZES[1:]) + ")"
    )
    if isinstance(n, int) and n >= 1:
        lower, upper = _nearest_supported(n)
        near = f"{upper}" if lower is None else f"{lower} and {upper}"
        msg += f"; nearest supported sizes: {near}"
    return ValueError(msg)


def supported_hadamard_size(n) -> bool:
    """True iff ``hadamard_matrix(n)`` exists, i.e. ``n = m * 2^k`` with m in ``BASE_SIZES``."""
    try:
        n = _as_size(n)
    except TypeError:
        return False
    return _try_decompose(n) is not None


def decompose(n) -> tuple[int, int]:
    """Split a supported size as ``n = m * p`` with ``m`` in ``BASE_SIZES``, ``p = 2^k``.

    ``H_n = kron(H_m, S_p)``.  The split is unique (e.g. ``decompose(24) == (12, 2)``,
    ``decompose(8) == (1, 8)``).  Raises ``ValueError`` for unsupported sizes.
    """
    n = _as_size(n)
    res = _try_decompose(n)
    if res is None:
        raise _unsupported(n)
    return res


# --------------------------------------------------------------------------- #
# Explicit matrices
# --------------------------------------------------------------------------- #
def _quadratic_character(q: int) -> list[int]:
    squares = {(a * a) % q for a in range(1, q)}
    return [0] + [1 if a in squares else -1 for a in range(1, q)]


def _jacobsthal(q: int) -> Tensor:
    chi = torch.tensor(_quadratic_character(q), dtype=torch.int64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]  # Q[i, j] = chi(j - i)


def _conference(q: int) -> Tensor:
    """``[[0, 1^T], [chi(-1) * 1, Q]]``: antisymmetric for q = 3 mod 4, symmetric for 1 mod 4."""
    sign = 1 if q % 4 == 1 else -1
    c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    c[0, 1:] = 1
    c[1:, 0] = sign
    c[1:, 1:] = _jacobsthal(q)
    return c


@functools.lru_cache(maxsize=None)
def _base_matrix_int(m: int) -> Tensor:
    """The ``m x m`` base matrix (int64) for ``m`` in ``BASE_SIZES``."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.int64)
    q, kind = _PALEY_BASES[m]
    c = _conference(q)
    if kind == 1:  # Paley I: H = I + C
        assert q % 4 == 3 and m == q + 1
        h = torch.eye(q + 1, dtype=torch.int64) + c
    else:  # Paley II: H = kron(C, A) + kron(I, B)
        assert q % 4 == 1 and m == 2 * (q + 1)
        a = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
        b = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
        h = torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.int64), b)
    return h


def _sylvester_int(p: int) -> Tensor:
    """``S_p`` as int8 (p a power of two), by Sylvester doubling ``S_2p = [[S, S], [S, -S]]``.

    Equivalently ``S_p[i, j] = (-1)^popcount(i & j)``.
    """
    s = torch.ones(1, 1, dtype=torch.int8)
    while s.shape[0] < p:
        top = torch.cat((s, s), dim=1)
        bottom = torch.cat((s, -s), dim=1)
        s = torch.cat((top, bottom), dim=0)
    return s


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """Unnormalised Hadamard matrix ``H_n`` (entries +-1, ``H_n @ H_n.T == n * I``).

    ``H_n = kron(H_m, S_p)`` with ``(m, p) = decompose(n)``, ``H_m`` the Paley base
    matrix (m in BASE_SIZES[1:]) or ``[1]`` and ``S_p`` the Sylvester matrix; see the
    module docstring.  ``dtype`` may be any floating or signed integer dtype
    (``torch.int8`` is the compact choice for large ``n``).  Raises ``ValueError``
    for unsupported ``n``.
    """
    m, p = decompose(n)
    s = _sylvester_int(p)
    if m == 1:
        h = s
    else:
        h = torch.kron(_base_matrix_int(m).to(torch.int8), s)
    return h.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- #
# Fast transform
# --------------------------------------------------------------------------- #
@functools.lru_cache(maxsize=64)
def _base_matrix_cached(m: int, transpose: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    h = _base_matrix_int(m)
    if transpose:
        h = h.T
    return h.to(device=device, dtype=dtype).contiguous()


def _is_fake(x: Tensor) -> bool:
    """Whether x is a fake tensor of a torch.compile / export trace (the cached real matrix
    cannot enter such a trace)."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode((x,)) is not None


def _base_matrix_traced(m: int, transpose: bool, dtype: torch.dtype, like: Tensor) -> Tensor:
    """The ``m x m`` base matrix as a constant of the trace ``like`` belongs to (same values
    as :func:`_base_matrix_cached`)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        rows = _base_matrix_int(m).tolist()
    h = torch.tensor(rows, dtype=dtype, device=like.device)
    return (h.T if transpose else h).contiguous()


def _fwht_last(x: Tensor, p: int) -> Tensor:
    """Unnormalised Sylvester transform ``x @ S_p`` along the last axis of a 2-D tensor.

    Butterfly stages ``(u, w) -> (u + w, u - w)``. Without autograd they are written into a
    ping-pong pair of buffers (``x`` itself is never written), with half the memory traffic
    of stacking; with autograd they are stacked. Both compute the same sums in the same
    order, so the results are identical bit for bit."""
    rows = x.shape[0]
    h = 1
    if x.requires_grad and torch.is_grad_enabled():
        while h < p:
            v = x.view(rows, p // (2 * h), 2, h)
            u, w = v[:, :, 0, :], v[:, :, 1, :]
            x = torch.stack((u + w, u - w), dim=2).view(rows, p)
            h *= 2
        return x
    out = torch.empty_like(x)
    while h < p:
        v = x.view(rows, p // (2 * h), 2, h)
        o = out.view(rows, p // (2 * h), 2, h)
        torch.add(v[:, :, 0, :], v[:, :, 1, :], out=o[:, :, 0, :])
        torch.sub(v[:, :, 0, :], v[:, :, 1, :], out=o[:, :, 1, :])
        x, out = out, (x if h > 1 else torch.empty_like(x))  # the caller's tensor is not reused
        h *= 2
    return x


# exact butterfly kernels by device type (see register_fwht_kernel)
_FWHT_KERNELS: dict = {}


def register_fwht_kernel(device_type: str, kernel) -> None:
    """Run the butterfly stages of :func:`hadamard_transform` on ``device_type`` with
    ``kernel(x, p)`` (x: a 2-D float32, float16 or bfloat16 tensor whose rows have length ``p``, a
    power of two; returns ``x @ S_p`` of its values converted to float32, as a new float32 tensor)
    when no gradient is being recorded. The kernel must compute the
    sums of :func:`_fwht_last` in the same order, so results stay identical bit for bit
    (importing ``lowbit.codegen.triton`` registers one for CUDA); ``kernel=None`` removes it."""
    if kernel is None:
        _FWHT_KERNELS.pop(device_type, None)
    else:
        _FWHT_KERNELS[device_type] = kernel


def hadamard_transform(x: Tensor, scale: float | None = None, *, transpose: bool = False, fwht=None) -> Tensor:
    """Fast Hadamard transform along the last dimension.

    Returns ``scale * (x @ H_n.T)`` (or ``scale * (x @ H_n)`` with ``transpose=True``)
    where ``n = x.shape[-1]`` and ``H_n = hadamard_matrix(n)``.  ``scale`` defaults to
    ``1 / sqrt(n)``, which makes the transform orthogonal; with ``transpose=True`` and
    the default scale it inverts the forward transform.

    Cost: ``log2(p)`` vectorised butterfly stages plus one ``m x m`` matmul
    (``(m, p) = decompose(n)``).  Accepts any leading shape, float16/bfloat16
    (computed in float32, returned in the input dtype), float32 and float64, on
    any device.  Differentiable.  ``fwht``: a kernel for the butterfly stages (see
    :func:`register_fwht_kernel`; default: the one registered for the device, if any, else
    the stages in torch).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"hadamard_transform expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("hadamard_transform needs at least one dimension")
    if not x.dtype.is_floating_point:
        raise TypeError(f"hadamard_transform expects a floating-point tensor, got {x.dtype}")
    n = x.shape[-1]
    m, p = decompose(n)
    if scale is None:
        scale = 1.0 / math.sqrt(n)

    out_dtype = x.dtype
    compute_dtype = torch.float32 if x.dtype in _HALF_DTYPES else x.dtype
    lead = x.shape[:-1]
    rows = math.prod(lead)
    fake = _is_fake(x)
    # no autograd graph and no trace: the kernel takes half inputs and the scaling writes the output
    # dtype directly (each saves a pass over a float32 copy; the values are the same, see below)
    plain = not fake and not (x.requires_grad and torch.is_grad_enabled())
    kernel = (fwht or _FWHT_KERNELS.get(x.device.type)) if p > 1 else None
    if kernel is _fwht_last or compute_dtype != torch.float32 or not plain:
        kernel = None
    if kernel is not None:
        # a registered kernel converts half inputs to float32 as it loads them (exact)
        y = kernel(x.reshape(rows * m, p), p)
    else:
        y = x.to(compute_dtype).reshape(rows * m, p)
        if p > 1:
            y = _fwht_last(y, p)
    y = y.view(rows, m, p)
    if m > 1:
        # x @ H_n^T  <=>  H_m @ X @ S_p   (X = row viewed as (m, p));  x @ H_n <=> H_m^T @ X @ S_p
        hm = _base_matrix_traced(m, transpose, compute_dtype, y) if fake else \
            _base_matrix_cached(m, transpose, compute_dtype, y.device)
        y = torch.matmul(hm, y)
    if plain and out_dtype != compute_dtype:
        # the product in float32, rounded once to the output dtype: (y * scale).to(out_dtype) in one pass
        out = torch.empty(y.shape, dtype=out_dtype, device=y.device)
        return torch.mul(y, scale, out=out).reshape(*lead, n)
    if scale != 1.0:
        y = y * scale
    return y.reshape(*lead, n).to(out_dtype)


# --------------------------------------------------------------------------- #
# Randomised Hadamard
# --------------------------------------------------------------------------- #
def random_signs(n: int, seed: int, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """``n`` random +-1 signs drawn from a CPU ``torch.Generator`` seeded with ``seed``.

    Deterministic for a given ``(n, seed)`` (independent of ``device``); these are the
    ``s`` of ``random_hadamard_matrix``.
    """
    n = _as_size(n)
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    bits = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64)
    return (1 - 2 * bits).to(device=device, dtype=dtype)


def random_hadamard_matrix(n: int, seed: int, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """Orthogonal randomised Hadamard matrix ``Q = H_n diag(s) / sqrt(n)``.

    ``s = random_signs(n, seed)``.  Apply it without materialising ``Q``::

        x @ Q.T == hadamard_transform(x * s)
        x @ Q   == hadamard_transform(x, transpose=True) * s

    (see the module docstring for the derivation and weight folding).
    """
    h = hadamard_matrix(n, dtype=torch.float64)
    s = random_signs(n, seed, dtype=torch.float64)
    q = h * s[None, :] / math.sqrt(n)
    return q.to(device=device, dtype=dtype)
