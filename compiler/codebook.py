"""Binary codebook format (sub-1-bit weights, in the spirit of BTC-LLM): numerics, the op
``torch.ops.lowbit.codebook_linear`` and the site module :class:`CodebookLinear`.

The format
----------
A weight ``W [N, K]`` is stored as per-group scales times signs, where the signs come
from a small learned codebook of binary vectors:

* ``K`` is padded with zero columns to ``Kp``, a multiple of the vector length ``v``
  and of the scale group size ``G`` (see :meth:`CodebookFormat.padded_width`);
* each row is cut into ``M = Kp / v`` consecutive sign vectors along the reduction
  dimension; vector ``m`` of row ``n`` covers columns ``m*v .. m*v + v - 1``;
* a codebook of ``C = 2^c`` binary vectors of length ``v`` (one codebook **per site**,
  i.e. per weight matrix) and an index ``idx[n, m]`` in ``[0, C)`` per vector;
* the sign of element ``(n, k)`` is ``codebook[idx[n, k // v], k % v]``;
* groups of ``G`` consecutive elements along K share a scale (``G = 0`` in the format
  means one group per row, ``G = Kp``).

Values use the 1-bit ``half`` grid of :mod:`lowbit.formats` (``QFormat(1, "half", G,
scale_dtype)``): a sign is a 1-bit code ``q`` (``q = 0`` for +, ``q = -1`` for -), and
the value is ``(q + 0.5) * eff`` with ``eff = fp32(stored) * global`` (so ``+-eff/2``).
Plain binarization (``sign(W)`` times a group scale) is the same grid with the signs
stored directly; the codebook format differs only in where its signs come from. Its
dequantization is literally ``lowbit.formats.dequantize_codes`` on the codes looked up
in the codebook.

Scales. For a group ``w`` (G weights) and fixed signs ``b in {-1,+1}^G``, the
least-squares scale of ``w ~ a * b`` is ``a = <w, b> / <b, b> = <w, b> / G``
(``d/da ||w - a b||^2 = -2 <w, b> + 2 a G = 0``); the error is then
``||w||^2 - <w, b>^2 / G``. With ``b = sign(w)`` this is ``mean |w|``. With importance
weights ``h`` (diagonal of the input second moment) the weighted least-squares scale is
``<h w, b> / sum(h)``. Scales are clamped at 0 (a group whose signs disagree with it
on balance gets 0, the best non-negative scale). The stored half-grid scale is
``2 a``. With ``scale_dtype="e4m3"`` the global fp32 scale is the one
``lowbit.formats.encode_scales`` picks (``max(2a) / 224``), and the E4M3 group scale is
``2a / global`` rounded to the **nearest** E4M3 value: unlike the RTN grids, a binary
group cannot clip, so the 1.0625 round-up of ``formats`` has no purpose here, and for
fixed signs the squared error ``G (a' - a)^2 + const`` is smallest at the nearest value.
With ``fp16``/``fp32`` scales the global scale is 1.

Storage (exact)
---------------
* indices: each row's ``M`` indices as one little-endian bitstream of ``M * c`` bits
  (index ``m`` occupies bits ``m*c .. m*c + c - 1``, its least significant bit first),
  packed eight bits per byte with :func:`lowbit.formats.pack_codes` (lowest bit index in
  the lowest bit), each row padded to whole bytes: uint8 ``[N, ceil(M c / 8)]``. For
  ``c = 8`` this is one index per byte.
* codebook: the ``C x v`` 1-bit codes (1 = negative), row-major, as one bitstream:
  uint8 ``[ceil(C v / 8)]``.
* scales ``[N, Kp / G]`` (E4M3, fp16 or fp32) and, for E4M3, one fp32 global scale.

``bits_per_weight = (8 * bytes(indices) + 8 * bytes(codebook) + scale_bits * N * Kp/G
+ 32 [E4M3 only]) / (N * K)`` with K the site's own input width; without padding this
is ``c / v + scale_bits / G + C v / (N K) + 32 / (N K)``.

Finding the codebook: Hamming k-means
-------------------------------------
:func:`hamming_kmeans` clusters the sign vectors ``b_i`` with non-negative element
weights ``omega_i`` (1: plain Hamming distance; ``|w|``: magnitude-weighted) by
minimising the weighted Hamming objective
``H = sum_i sum_p omega_ip [b_ip != c_{a(i), p}]``. With ``D_i = omega_i * b_i``,
``H = (sum omega - sum_i <D_i, c_{a(i)}>) / 2``, so the nearest centroid is
``argmax_j <D_i, c_j>`` (one matrix product) and the best centroid of a cluster is the
(weighted) majority vote ``sign(sum_{i in j} D_i)`` (an exact tie keeps the previous
bit). Both steps are exact minimisations, so ``H`` never increases. Magnitude weights
make ``H`` the first-order term of the squared weight error: for ``w ~ a b`` with
``a >= 0``, maximising ``<w, b>`` per group minimises ``||w||^2 - <w, b>^2 / G``.
Initialisation (seeded): the ``C`` sign patterns with the largest total weight in the
data (ties broken by a seeded permutation); empty or duplicate clusters are re-seeded
with the worst-fitted vectors' patterns.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from . import ops  # noqa: F401  (registers the other torch.ops.lowbit ops)
from .formats import (
    QFormat,
    QTensor,
    dequantize_codes,
    effective_scales,
    encode_scales,
    pack_codes,
    unpack_codes,
)
from .sites import register_site_module

MAX_VECTOR_SIZE = 62   # sign patterns are hashed into int64 keys
MAX_INDEX_BITS = 16


@dataclass(frozen=True)
class CodebookFormat:
    """Binary codebook format: vector length v, index bits c (C = 2^c), scale group G."""

    vector_size: int = 16
    index_bits: int = 10
    group_size: int = 64          # 0: one scale per row
    scale_dtype: str = "e4m3"

    def __post_init__(self):
        if not 1 <= self.vector_size <= MAX_VECTOR_SIZE:
            raise ValueError(f"vector_size must be in [1, {MAX_VECTOR_SIZE}], got {self.vector_size}")
        if not 1 <= self.index_bits <= min(MAX_INDEX_BITS, self.vector_size):
            raise ValueError(f"index_bits must be in [1, min({MAX_INDEX_BITS}, vector_size)], got {self.index_bits}")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0: per row), got {self.group_size}")
        QFormat(1, "half", 16, self.scale_dtype)  # validates scale_dtype

    @property
    def codebook_size(self) -> int:
        return 1 << self.index_bits

    @property
    def name(self) -> str:
        g = "row" if self.group_size == 0 else str(self.group_size)
        return f"btc_v{self.vector_size}_c{self.index_bits}_g{g}_{self.scale_dtype}"

    def padded_width(self, k: int) -> int:
        """Stored width Kp >= k: a multiple of v and of G (of v alone for per-row scales)."""
        m = self.vector_size if self.group_size == 0 else math.lcm(self.vector_size, self.group_size)
        return -(-k // m) * m

    def group_for(self, padded_width: int) -> int:
        """The actual scale group size for a stored width (per row: the width itself)."""
        return self.group_size or padded_width

    def scale_format(self, padded_width: int) -> QFormat:
        """The 1-bit half-grid QFormat whose values this format produces."""
        return QFormat(1, "half", self.group_for(padded_width), self.scale_dtype)

    def storage_shapes(self, rows: int, cols: int) -> dict:
        """Shapes of the stored tensors for a weight [rows, cols] (cols before padding)."""
        kp = self.padded_width(cols)
        m = kp // self.vector_size
        return {
            "padded_width": kp,
            "vectors_per_row": m,
            "indices_packed": (rows, -(-m * self.index_bits // 8)),
            "codebook_packed": (-(-self.codebook_size * self.vector_size // 8),),
            "scales": (rows, kp // self.group_for(kp)),
        }

    def bits_per_weight(self, rows: int, cols: int) -> float:
        """Exact storage bits per weight of a [rows, cols] weight (see module docstring)."""
        s = self.storage_shapes(rows, cols)
        fmt = self.scale_format(s["padded_width"])
        total = 8 * math.prod(s["indices_packed"]) + 8 * math.prod(s["codebook_packed"]) \
            + fmt.scale_bits * math.prod(s["scales"]) + (32 if self.scale_dtype == "e4m3" else 0)
        return total / (rows * cols)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CodebookFormat":
        return cls(**d)


# -- bit packing (built on formats.pack_codes at 1 bit) --------------------------------

def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack 0/1 values along the last dim into uint8 (lowest index in the lowest bit),
    padding the last dim with zeros to a multiple of 8."""
    n = bits.shape[-1]
    pad = (-n) % 8
    b = bits.to(torch.int8)
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))
    return pack_codes(b, 1)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int8 0/1 values [..., n]."""
    return unpack_codes(packed, 1, n) & 1   # 1-bit codes come back sign-extended (-1 for a set bit)


def pack_indices(idx: torch.Tensor, index_bits: int) -> torch.Tensor:
    """Indices [..., M] in [0, 2^c) -> uint8 [..., ceil(M c / 8)] (little-endian bitstream)."""
    shifts = torch.arange(index_bits, device=idx.device, dtype=torch.int64)
    bits = (idx.to(torch.int64).unsqueeze(-1) >> shifts) & 1
    return pack_bits(bits.reshape(*idx.shape[:-1], idx.shape[-1] * index_bits))


def unpack_indices(packed: torch.Tensor, count: int, index_bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: int64 indices [..., count]."""
    bits = unpack_bits(packed, count * index_bits).to(torch.int64)
    bits = bits.reshape(*packed.shape[:-1], count, index_bits)
    shifts = torch.arange(index_bits, device=packed.device, dtype=torch.int64)
    return (bits << shifts).sum(-1)


def signs_to_codes(signs: torch.Tensor) -> torch.Tensor:
    """+-1 (or any real: >= 0 is +) -> 1-bit half-grid codes (0 for +, -1 for -), int8."""
    return -(signs < 0).to(torch.int8)


def pack_codebook(codebook_signs: torch.Tensor) -> torch.Tensor:
    """Codebook [C, v] of +-1 -> uint8 [ceil(C v / 8)] (bit 1 = negative)."""
    return pack_bits((codebook_signs < 0).reshape(-1))


def unpack_codebook(packed: torch.Tensor, codebook_size: int, vector_size: int) -> torch.Tensor:
    """Inverse of :func:`pack_codebook` as 1-bit half-grid codes int8 [C, v] (0: +, -1: -)."""
    return -unpack_bits(packed, codebook_size * vector_size).reshape(codebook_size, vector_size)


# -- scales -------------------------------------------------------------------------------

def ls_scales(w: torch.Tensor, signs: torch.Tensor, group_size: int, importance: torch.Tensor | None = None,
              valid: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares group scales ``a = <w, b> / G`` (``<h w, b> / sum h`` with importance h),
    clamped at 0. w, signs: [N, Kp]; importance: [Kp] or [N, Kp]; valid: [Kp] bool mask of
    real (not padding) columns, excluded from the counts. Returns fp32 [N, Kp / G]."""
    w = w.double()
    b = signs.double()
    n, kp = w.shape
    h = torch.ones(kp, dtype=torch.float64, device=w.device) if importance is None else importance.double()
    if valid is not None:
        h = h * valid.double()
    h = h.expand(n, kp)
    num = (h * w * b).reshape(n, kp // group_size, group_size).sum(-1)
    den = h.reshape(n, kp // group_size, group_size).sum(-1)
    a = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return a.clamp_min(0).float()


def encode_binary_scales(a: torch.Tensor, fmt: QFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored half-grid scales (``2a``) and the global scale, for least-squares magnitudes a.

    The global scale is :func:`lowbit.formats.encode_scales`'s; E4M3 group scales are
    rounded to the nearest E4M3 value (see the module docstring)."""
    half = 2 * a.float()
    stored, gscale = encode_scales(half, fmt, per_row=False)
    if fmt.scale_dtype == "e4m3":
        stored = (half / gscale).clamp(0, fmt.scale_max).to(torch.float8_e4m3fn)
    return stored, gscale


def binarize_weight(w: torch.Tensor, fmt: QFormat, importance: torch.Tensor | None = None) -> QTensor:
    """Plain binarization on ``fmt`` (a 1-bit half-grid QFormat): signs of w and the
    least-squares group scale ``mean |w|`` (weighted with ``importance``). The baseline the
    codebook format is measured against; a drop-in ``weight_quantizer`` result for
    ``QuantizePass`` (w is padded with zero columns to ``lowbit.quant_linear.padded_width``;
    the padding does not count in the group means)."""
    if fmt.bits != 1 or fmt.grid != "half":
        raise ValueError(f"binarize_weight needs a 1-bit half-grid format, got {fmt.name}")
    from .quant_linear import padded_width

    w = w.detach().float()
    k = w.shape[-1]
    kp = padded_width(k, fmt)
    valid = torch.arange(kp, device=w.device) < k
    if kp != k:
        w = torch.nn.functional.pad(w, (0, kp - k))
        if importance is not None:
            importance = torch.nn.functional.pad(importance.float(), (0, kp - k))
    a = ls_scales(w, torch.where(w < 0, -1.0, 1.0), fmt.group_size, importance, valid)
    stored, gscale = encode_binary_scales(a, fmt)
    return QTensor(signs_to_codes(w), stored, gscale, fmt)


# -- dequantization (the definition of the format's values) ---------------------------------

def codebook_codes(indices_packed: torch.Tensor, codebook_packed: torch.Tensor, vector_size: int,
                   index_bits: int, padded_width: int) -> torch.Tensor:
    """1-bit half-grid codes [N, Kp] (0: +, -1: -) of a stored codebook weight."""
    m = padded_width // vector_size
    idx = unpack_indices(indices_packed, m, index_bits)                            # [N, M]
    cb = unpack_codebook(codebook_packed, 1 << index_bits, vector_size)            # [C, v]
    return cb[idx].reshape(indices_packed.shape[0], padded_width)


def dequantize_codebook_weight(indices_packed, codebook_packed, scales, global_scale, vector_size: int,
                               index_bits: int, group_size: int, scale_dtype: str,
                               in_features: int | None = None) -> torch.Tensor:
    """fp32 weight [N, Kp] (first ``in_features`` columns when given). ``group_size`` is the
    actual group size (for per-row scales: the stored width)."""
    kp = scales.shape[-1] * group_size
    codes = codebook_codes(indices_packed, codebook_packed, vector_size, index_bits, kp)
    w = dequantize_codes(codes, effective_scales(scales, global_scale), QFormat(1, "half", group_size, scale_dtype))
    return w if in_features is None else w[:, :in_features]


@torch.library.custom_op("lowbit::codebook_linear", mutates_args=())
def codebook_linear(
    x: torch.Tensor,
    indices_packed: torch.Tensor,
    codebook_packed: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    vector_size: int,
    index_bits: int,
    group_size: int,
    scale_dtype: str,
) -> torch.Tensor:
    """``y = x @ W[:, :K]^T + bias`` with W the dequantized codebook weight [N, Kp] and
    ``K = x.shape[-1]`` (padding columns ignored). Output in x's dtype; fp32 accumulation."""
    k = x.shape[-1]
    w = dequantize_codebook_weight(indices_packed, codebook_packed, scales, global_scale, vector_size,
                                   index_bits, group_size, scale_dtype, k)
    y = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


@codebook_linear.register_fake
def _(x, indices_packed, codebook_packed, scales, global_scale, bias, vector_size, index_bits, group_size,
      scale_dtype):
    return x.new_empty((*x.shape[:-1], indices_packed.shape[0]))


# -- Hamming k-means ------------------------------------------------------------------------

@dataclass
class KMeansResult:
    codebook: torch.Tensor            # float32 +-1 [C, v]
    assignment: torch.Tensor          # int64 [n]
    history: list = field(default_factory=list)   # weighted Hamming objective: init, then per iteration
    iterations: int = 0
    reseeded: int = 0

    @property
    def objective(self) -> float:
        return self.history[-1]


def _pattern_keys(signs: torch.Tensor) -> torch.Tensor:
    v = signs.shape[-1]
    w = torch.ones(v, dtype=torch.int64, device=signs.device) << torch.arange(v, device=signs.device)
    return ((signs < 0).to(torch.int64) * w).sum(-1)


def _keys_to_signs(keys: torch.Tensor, v: int) -> torch.Tensor:
    bits = (keys.unsqueeze(-1) >> torch.arange(v, device=keys.device)) & 1
    return 1.0 - 2.0 * bits.float()


def _assign(data: torch.Tensor, codebook: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax_j <data_i, c_j> and the max, in chunks of rows."""
    idx, best = [], []
    cbt = codebook.t().contiguous()
    chunk = max(1, min(chunk, (1 << 24) // codebook.shape[0]))   # at most 2^24 scores (64 MiB) at a time
    for s in range(0, data.shape[0], chunk):
        scores = data[s:s + chunk] @ cbt
        b, i = scores.max(dim=1)
        idx.append(i)
        best.append(b)
    return torch.cat(idx), torch.cat(best)


def hamming_kmeans(
    signs: torch.Tensor,
    n_clusters: int,
    weights: torch.Tensor | None = None,
    iterations: int = 10,
    seed: int = 0,
    init: str = "frequent",
    chunk: int = 16384,
) -> KMeansResult:
    """Cluster sign vectors [n, v] (+-1; >= 0 counts as +) into ``n_clusters`` binary centroids.

    Minimises the weighted Hamming objective ``sum_i sum_p weights_ip [b_ip != c_{a(i)p}]``
    (``weights=None``: plain Hamming distance) by alternating exact assignment
    (``argmax_j <weights_i * b_i, c_j>``) and weighted majority-vote updates; see the module
    docstring. ``init``: "frequent" (the heaviest patterns) or "random" (distinct data
    vectors chosen with the seeded generator). Stops early when nothing changes.
    """
    if init not in ("frequent", "random"):
        raise ValueError(f"init must be 'frequent' or 'random', got {init!r}")
    b = torch.where(signs < 0, -1.0, 1.0).float()
    n, v = b.shape
    om = torch.ones_like(b) if weights is None else weights.float().clamp_min(0)
    data = om * b
    gen = torch.Generator().manual_seed(seed)

    keys = _pattern_keys(b)
    uniq, inverse = torch.unique(keys, return_inverse=True)
    mass = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse.cpu(), om.sum(1).double().cpu())
    perm = torch.randperm(len(uniq), generator=gen)
    if init == "frequent":
        order = perm[torch.argsort(mass[perm], descending=True, stable=True)]
    else:
        order = perm
    chosen = uniq[order[:n_clusters].to(uniq.device)]
    if len(chosen) < n_clusters:  # fewer distinct patterns than centroids: fill with unused random patterns
        extra = []
        have = set(chosen.tolist())
        while len(have) + len(extra) < n_clusters and len(have) + len(extra) < (1 << v):
            cand = torch.randint(0, 1 << min(v, 62), (n_clusters,), generator=gen).tolist()
            for c in cand:
                if c not in have:
                    have.add(c)
                    extra.append(c)
                    if len(chosen) + len(extra) == n_clusters:
                        break
        chosen = torch.cat([chosen, torch.tensor(extra, dtype=torch.int64, device=chosen.device)])
        if len(chosen) < n_clusters:  # 2^v < n_clusters: repeat (duplicates are never used)
            chosen = chosen.repeat(-(-n_clusters // len(chosen)))[:n_clusters]
    codebook = _keys_to_signs(chosen, v).to(b.device)

    def objective(cb, a):
        return float(((b != cb[a]).to(om.dtype) * om).sum(dtype=torch.float64))

    assign, best = _assign(data, codebook, chunk)
    history = [objective(codebook, assign)]
    it = reseeded = 0
    for it in range(1, iterations + 1):
        sums = torch.zeros_like(codebook).index_add_(0, assign, data)
        new = torch.where(sums > 0, 1.0, torch.where(sums < 0, -1.0, codebook))
        # empty or duplicate centroids (never the nearest: argmax takes the first) -> worst-fitted patterns
        counts = torch.bincount(assign, minlength=n_clusters)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            fit = best - om.sum(1)                    # -2 * weighted distance to the assigned centroid
            worst = torch.argsort(fit)[: 4 * len(empty) + 16]
            wkeys = torch.unique(_pattern_keys(b[worst]), sorted=False)
            present = set(_pattern_keys(new).tolist())
            cand = [k for k in wkeys.tolist() if k not in present][: len(empty)]
            if cand:
                new[empty[: len(cand)]] = _keys_to_signs(torch.tensor(cand, device=b.device), v)
                reseeded += len(cand)
        changed = not torch.equal(new, codebook)
        codebook = new
        new_assign, best = _assign(data, codebook, chunk)
        history.append(objective(codebook, new_assign))
        moved = not torch.equal(new_assign, assign)
        assign = new_assign
        if not changed and not moved:
            break
    return KMeansResult(codebook, assign, history, it, reseeded)


# -- quantization of a weight ---------------------------------------------------------------

@dataclass
class CodebookWeight:
    """A weight in codebook form, unpacked: indices [N, M], codebook +-1 [C, v], stored
    scales [N, Kp/G], global scale, and the k-means record."""

    indices: torch.Tensor
    codebook: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor
    fmt: CodebookFormat
    kmeans: KMeansResult | None = None

    def dequantize(self) -> torch.Tensor:
        """fp32 weight [N, Kp] (padding columns included): the values a CodebookLinear stores."""
        n, m = self.indices.shape
        kp = m * self.fmt.vector_size
        codes = signs_to_codes(self.codebook[self.indices].reshape(n, kp))
        return dequantize_codes(codes, effective_scales(self.scales, self.global_scale), self.fmt.scale_format(kp))


WEIGHTINGS = ("hamming", "magnitude", "activation")


def quantize_codebook(
    weight: torch.Tensor,
    fmt: CodebookFormat,
    weighting: str = "magnitude",
    importance: torch.Tensor | None = None,
    iterations: int = 10,
    seed: int = 0,
    init: str = "frequent",
) -> CodebookWeight:
    """Codebook quantization of a float weight [N, K] (K padded with zeros to Kp).

    ``weighting``: element weights of the Hamming k-means: "hamming" (1), "magnitude"
    (``|w|``) or "activation" (``|w| * h``, h = ``importance`` [K], e.g. the mean squared
    input per channel; its scales are then the h-weighted least-squares scales).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "activation" and importance is None:
        raise ValueError("weighting='activation' needs importance (per input channel)")
    w = weight.detach().float()
    n, k = w.shape
    kp = fmt.padded_width(k)
    v = fmt.vector_size
    if kp != k:
        w = torch.nn.functional.pad(w, (0, kp - k))
    valid = torch.arange(kp, device=w.device) < k
    h = None
    if weighting == "activation":
        h = torch.nn.functional.pad(importance.detach().float().to(w.device).clamp_min(0), (0, kp - k))
    vec = w.reshape(n * (kp // v), v)
    if weighting == "hamming":
        om = valid.float().expand(n, kp).reshape(-1, v)
    elif weighting == "magnitude":
        om = vec.abs()
    else:
        om = (w.abs() * h).reshape(-1, v)
    km = hamming_kmeans(vec, fmt.codebook_size, om, iterations=iterations, seed=seed, init=init)
    signs = km.codebook[km.assignment].reshape(n, kp)
    g = fmt.group_for(kp)
    a = ls_scales(w, signs, g, importance=h if weighting == "activation" else None, valid=valid)
    stored, gscale = encode_binary_scales(a, fmt.scale_format(kp))
    return CodebookWeight(km.assignment.reshape(n, kp // v), km.codebook, stored, gscale.reshape(()), fmt, km)


# -- the site module --------------------------------------------------------------------------

@register_site_module
class CodebookLinear(nn.Module):
    """A linear site with a binary codebook weight: ``codebook_linear(prologue(x))``.

    Buffers: ``indices_packed`` uint8 [N, ceil(M c / 8)], ``codebook_packed`` uint8
    [ceil(C v / 8)], ``weight_scales`` [N, Kp / G] (E4M3 / fp16 / fp32), ``weight_global``
    fp32 [], optional ``bias`` fp32 [N]. ``in_features`` is the site's input width (before
    any prologue), ``weight_in_features`` the width the weight sees (after it).
    """

    def __init__(self, in_features: int, out_features: int, fmt: CodebookFormat, bias: bool = False,
                 weight_in_features: int | None = None, prologue: list[nn.Module] | None = None, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_in_features = weight_in_features or in_features
        self.fmt = fmt
        shapes = fmt.storage_shapes(out_features, self.weight_in_features)
        self.packed_in_features = shapes["padded_width"]
        self.group_size = fmt.group_for(self.packed_in_features)
        self.register_buffer("indices_packed", torch.zeros(shapes["indices_packed"], dtype=torch.uint8, device=device))
        self.register_buffer("codebook_packed", torch.zeros(shapes["codebook_packed"], dtype=torch.uint8, device=device))
        self.register_buffer("weight_scales", torch.zeros(shapes["scales"], device=device).to(
            fmt.scale_format(self.packed_in_features).scale_torch_dtype))
        self.register_buffer("weight_global", torch.ones((), dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, device=device))
        else:
            self.bias = None
        self.prologue = nn.ModuleList(prologue or [])

    def set_weight(self, cw: CodebookWeight, bias: torch.Tensor | None = None) -> None:
        m = self.packed_in_features // self.fmt.vector_size
        if tuple(cw.indices.shape) != (self.out_features, m) or cw.fmt != self.fmt:
            raise ValueError(f"codebook weight with indices {tuple(cw.indices.shape)} and format {cw.fmt.name} "
                             f"for a site of {(self.out_features, m)} vectors in {self.fmt.name}")
        dev = self.indices_packed.device
        self.indices_packed = pack_indices(cw.indices, self.fmt.index_bits).to(dev)
        self.codebook_packed = pack_codebook(cw.codebook).to(dev)
        self.weight_scales = cw.scales.to(dev)
        self.weight_global = cw.global_scale.reshape(()).float().to(dev)
        if bias is not None:
            self.bias = bias.detach().float().to(dev).clone()

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, fmt: CodebookFormat,
                    in_features: int | None = None, prologue: list[nn.Module] | None = None,
                    **quantize_options) -> "CodebookLinear":
        """Quantize a float weight [N, K'] (``quantize_options`` go to :func:`quantize_codebook`).
        The k-means record is kept as ``self.kmeans`` (not saved)."""
        n, k = weight.shape
        return cls.from_codebook_weight(quantize_codebook(weight, fmt, **quantize_options), k, bias,
                                        in_features, prologue)

    @classmethod
    def from_codebook_weight(cls, cw: "CodebookWeight", weight_in_features: int, bias: torch.Tensor | None = None,
                             in_features: int | None = None,
                             prologue: list[nn.Module] | None = None) -> "CodebookLinear":
        """A site holding an already quantized weight (of ``weight_in_features`` real columns)."""
        m = cls(in_features or weight_in_features, cw.indices.shape[0], cw.fmt, bias is not None,
                weight_in_features=weight_in_features, prologue=prologue, device=cw.indices.device)
        m.set_weight(cw, bias)
        m.kmeans = cw.kmeans
        return m

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 weight [N, weight_in_features] (padding dropped)."""
        return dequantize_codebook_weight(self.indices_packed, self.codebook_packed, self.weight_scales,
                                          self.weight_global, self.fmt.vector_size, self.fmt.index_bits,
                                          self.group_size, self.fmt.scale_dtype, self.weight_in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.prologue:
            x = op(x)
        f = self.fmt
        return torch.ops.lowbit.codebook_linear(x, self.indices_packed, self.codebook_packed, self.weight_scales,
                                                self.weight_global, self.bias, f.vector_size, f.index_bits,
                                                self.group_size, f.scale_dtype)

    def storage_bits(self) -> int:
        """Exact stored bits: indices, codebook, group scales and the E4M3 global scale (bias excluded)."""
        bits = 8 * self.indices_packed.numel() + 8 * self.codebook_packed.numel() \
            + self.weight_scales.numel() * self.weight_scales.element_size() * 8
        return bits + (32 if self.fmt.scale_dtype == "e4m3" else 0)

    def bits_per_weight(self) -> float:
        """Stored bits per weight of the original site (out_features x in_features)."""
        return self.storage_bits() / (self.out_features * self.in_features)

    def config(self) -> dict:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "weight_in_features": self.weight_in_features,
            "codebook_format": self.fmt.to_dict(),
            "bias": self.bias is not None,
            "prologue": [p.config() for p in self.prologue],
        }

    @classmethod
    def from_config(cls, cfg: dict, device=None) -> "CodebookLinear":
        from .prologue import prologue_from_config

        return cls(cfg["in_features"], cfg["out_features"], CodebookFormat.from_dict(cfg["codebook_format"]),
                   cfg["bias"], cfg["weight_in_features"],
                   [prologue_from_config(p) for p in cfg.get("prologue", [])], device=device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.fmt.name}, bias={self.bias is not None}")
