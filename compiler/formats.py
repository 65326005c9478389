"""Numeric formats: the definition of every quantized value lowbit produces.

Every backend (reference ops, Triton kernels, ONNX graphs) reproduces exactly the
arithmetic written here; nothing else in the package quantizes on its own.

Grids
-----
A b-bit code ``q`` is a two's complement integer in ``[-2^(b-1), 2^(b-1) - 1]``.

* ``int`` grid:  value = ``q * s``. Levels in units of s: ``lo = -2^(b-1)``, ``hi = 2^(b-1) - 1``.
* ``half`` grid: value = ``(q + 0.5) * s``, symmetric and without zero. Levels:
  ``lo = -2^(b-1) + 0.5``, ``hi = 2^(b-1) - 0.5``. 1-bit formats must use it (signs).

Quantization of a group x with effective scale ``s`` (fp32):

* ``int``:  ``q = clamp(round_half_even(x / s), -2^(b-1), 2^(b-1) - 1)``
* ``half``: ``q = clamp(floor(x / s), -2^(b-1), 2^(b-1) - 1)``
* a group whose effective scale is zero gets codes 0.

The division is an IEEE fp32 division (not a multiplication by a reciprocal).

Scales (microscaling)
---------------------
Groups of ``G`` consecutive elements along the last (reduction) dimension share a
scale. The unclipped scale of a group is the smallest that keeps both signs in range:
``s = max(max(x) / hi, min(x) / lo, 0)``; a clipping ratio ``r <= 1`` shrinks it.

With ``scale_dtype="e4m3"`` the group scale is stored as FP8 E4M3 (``torch.float8_e4m3fn``,
round to nearest even, max 448) together with one fp32 *global* scale per tensor
(weights) or per row (activations): ``global = max_group_scale / scale_max`` and
``stored = e4m3(min(fp32(s / global) * 1.0625, scale_max))``; the effective scale is
``fp32(stored) * global``. The factor 1.0625 = 1 + 2^-4 (half an E4M3 mantissa step)
makes round-to-nearest-even land on or above ``s / global`` for every normal E4M3
value, so rounding the scale never clips a group's largest element (plain nearest
rounding can shrink a scale by 6% and clip the top of 8-bit groups by ~8 steps).
``scale_max`` is 224 for formats of at most 2 bits, so that ``q * stored`` with
``|q| <= 2`` is itself exactly representable in E4M3 (the product of a 2-bit integer
and an E4M3 number gains no mantissa bits, and 2 * 224 = 448 does not overflow): the
2-bit operands can feed FP8 tensor cores without rounding. Wider formats use 448.
With ``fp16``/``fp32`` scales there is no global scale (it is 1).

Activation clipping
-------------------
An activation format may carry a clip ratio ``0 < clip <= 1`` (``QFormat.clip``; weights
learn or search their clipping per group instead). Dynamic (per-row) quantization then
multiplies the row's global scale by it after the stored scales are encoded:
``global_c = fp32(global * clip)``, ``effective = fp32(stored) * global_c``, and the codes
are computed with that effective scale (so the largest elements of a row clip to the end
levels). The stored scales are those of ``clip = 1``; ``global_c`` is the global scale
the op returns. At 2 bits, rotated activations lose far less to clipping than to the
coarse steps of absmax scaling (see docs/qat.md).

Nested grids
------------
``int`` codes of b bits derive from 8-bit codes of the same group by a rounding right
shift by ``d = 8 - b``: ``q_b = clamp((q_8 + 2^(d-1)) >> d, lo_b, hi_b)`` (arithmetic
shift), and the effective scale multiplies by ``2^d`` (folded into the global scale, so
the stored E4M3 group scales are shared by every precision). ``half`` codes need no
rounding: ``q_b = q_8 >> d`` maps the centre ``(q_8 + 0.5)`` to its enclosing b-bit bin.

Packing
-------
Codes are packed along the last dimension into uint8 containers of ``c`` bits (``c`` =
1, 2, 4 or 8: the smallest power of two >= b; 3-bit codes use 4-bit containers), the
element with the lowest index in the lowest bits, each code as its two's complement in
``c`` bits. A weight ``[N, K]`` at 2 bits is stored as uint8 ``[N, K / 4]`` with scales
``[N, K / G]``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch

E4M3_MAX = 448.0
SCALE_DTYPES = ("e4m3", "fp16", "fp32")
GRIDS = ("int", "half")
BITS = (1, 2, 3, 4, 8)


@dataclass(frozen=True)
class QFormat:
    """A quantization format: element bits, grid, group size and scale type."""

    bits: int
    grid: str = "int"
    group_size: int = 16
    scale_dtype: str = "e4m3"
    clip: float = 1.0  # activations only: multiplies the per-row global scale (module docstring)

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"QFormat.bits must be one of {BITS}, got {self.bits}")
        if self.grid not in GRIDS:
            raise ValueError(f"QFormat.grid must be one of {GRIDS}, got {self.grid!r}")
        if self.bits == 1 and self.grid != "half":
            raise ValueError("1-bit formats need grid='half' (values +-0.5*s); an int grid of 1 bit has no positive level")
        if self.group_size < 1:
            raise ValueError(f"QFormat.group_size must be >= 1, got {self.group_size}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"QFormat.scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")
        if not (isinstance(self.clip, (int, float)) and 0.0 < self.clip <= 1.0):
            raise ValueError(f"QFormat.clip must be a ratio in (0, 1], got {self.clip!r}")
        object.__setattr__(self, "clip", float(self.clip))

    # -- grid ---------------------------------------------------------------
    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def level_lo(self) -> float:
        """Lowest level in units of the scale."""
        return self.qmin + (0.5 if self.grid == "half" else 0.0)

    @property
    def level_hi(self) -> float:
        """Highest level in units of the scale."""
        return self.qmax + (0.5 if self.grid == "half" else 0.0)

    @property
    def container_bits(self) -> int:
        return 1 << math.ceil(math.log2(self.bits)) if self.bits > 1 else 1

    @property
    def scale_max(self) -> float:
        """Largest stored E4M3 group scale (see module docstring)."""
        return E4M3_MAX / 2 if self.bits <= 2 else E4M3_MAX

    @property
    def scale_bits(self) -> int:
        return {"e4m3": 8, "fp16": 16, "fp32": 32}[self.scale_dtype]

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        return {"e4m3": torch.float8_e4m3fn, "fp16": torch.float16, "fp32": torch.float32}[self.scale_dtype]

    def bits_per_weight(self, rows: int, cols: int, global_scales: int = 1) -> float:
        """Storage bits per element: packed codes + group scales + fp32 global scales."""
        n = rows * cols
        groups = rows * math.ceil(cols / self.group_size)
        total = n * self.container_bits + groups * self.scale_bits
        if self.scale_dtype == "e4m3":
            total += 32 * global_scales
        return total / n

    @property
    def name(self) -> str:
        clip = "" if self.clip == 1.0 else f"_c{self.clip:g}"
        return f"{self.grid}{self.bits}_g{self.group_size}_{self.scale_dtype}{clip}"

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["clip"] == 1.0:  # the default stays out of manifests and recipes
            del d["clip"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QFormat":
        return cls(**d)


# -- E4M3 --------------------------------------------------------------------

def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to the nearest E4M3 value (ties to even), saturating at +-448.

    Identical to ``x.clamp(-448, 448).to(torch.float8_e4m3fn)``; returned as fp32.
    """
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


SCALE_ROUND_UP = 1.0625


def e4m3_group_scales(ratio: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """Stored E4M3 group scales for fp32 ``scale / global`` ratios (rounded up, see above)."""
    return (ratio.float() * SCALE_ROUND_UP).clamp(max=fmt.scale_max).to(torch.float8_e4m3fn)


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    k = x.shape[-1]
    if k % group_size:
        raise ValueError(f"last dimension {k} is not a multiple of the group size {group_size}")
    return x.reshape(*x.shape[:-1], k // group_size, group_size)


def unclipped_group_scales(x: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """Smallest per-group scale that represents every element without clipping. [..., K/G]"""
    g = _grouped(x.float(), fmt.group_size)
    pos = g.amax(dim=-1).clamp(min=0) / fmt.level_hi
    neg = g.amin(dim=-1).clamp(max=0) / fmt.level_lo
    return torch.maximum(pos, neg)


def encode_scales(scales: torch.Tensor, fmt: QFormat, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn fp32 group scales into (stored scales, fp32 global scale).

    ``per_row``: one global scale per row (activations, shape [..., 1]) instead of one
    per tensor (weights, shape []).
    """
    scales = scales.float()
    if fmt.scale_dtype == "e4m3":
        smax = scales.amax(dim=-1, keepdim=True) if per_row else scales.amax()
        global_scale = smax / fmt.scale_max
        safe = torch.where(global_scale > 0, global_scale, torch.ones_like(global_scale))
        return e4m3_group_scales(scales / safe, fmt), safe
    stored = scales.to(fmt.scale_torch_dtype)
    ones = torch.ones(scales.shape[:-1] + (1,) if per_row else (), dtype=torch.float32, device=scales.device)
    return stored, ones


def effective_scales(stored: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """fp32 effective group scales: fp32(stored) * global (global broadcasts per row or tensor)."""
    return stored.float() * global_scale.float()


def quantize_codes(x: torch.Tensor, eff_scales: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """Codes (int8, same shape as x) of x on fmt's grid with per-group effective scales."""
    g = _grouped(x.float(), fmt.group_size)
    s = eff_scales.float().unsqueeze(-1)
    zero = s == 0
    r = g / torch.where(zero, torch.ones_like(s), s)
    r = torch.floor(r) if fmt.grid == "half" else torch.round(r)
    q = r.clamp(fmt.qmin, fmt.qmax)
    q = torch.where(zero, torch.zeros_like(q), q)
    return q.to(torch.int8).reshape(x.shape)


def dequantize_codes(q: torch.Tensor, eff_scales: torch.Tensor, fmt: QFormat, dtype=torch.float32) -> torch.Tensor:
    """Values of codes q (int8, [..., K]) with effective group scales [..., K/G]."""
    g = _grouped(q.float(), fmt.group_size)
    if fmt.grid == "half":
        g = g + 0.5
    v = g * eff_scales.float().unsqueeze(-1)
    return v.reshape(q.shape).to(dtype)


@dataclass
class QTensor:
    """A quantized tensor: unpacked int8 codes, stored group scales and global scale."""

    codes: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor
    fmt: QFormat

    def eff_scales(self) -> torch.Tensor:
        return effective_scales(self.scales, self.global_scale)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_codes(self.codes, self.eff_scales(), self.fmt, dtype)


def quantize(x: torch.Tensor, fmt: QFormat, per_row: bool = False, clip_ratio: torch.Tensor | float | None = None) -> QTensor:
    """Round-to-nearest quantization of x along its last dimension in groups.

    ``per_row`` selects one global scale per row (activations) instead of per tensor; per row,
    ``fmt.clip`` multiplies it (activation clipping).
    ``clip_ratio`` (scalar or per-group tensor) multiplies the unclipped scales.
    """
    scales = unclipped_group_scales(x, fmt)
    if clip_ratio is not None:
        scales = scales * clip_ratio
    stored, gscale = encode_scales(scales, fmt, per_row)
    if per_row and fmt.clip != 1.0:
        gscale = gscale * fmt.clip  # activation clipping (module docstring)
    eff = effective_scales(stored, gscale)
    return QTensor(quantize_codes(x, eff, fmt), stored, gscale, fmt)


CLIP_RATIOS = (0.3, 1.0, 15)


def weight_global_scale(w: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """The per-tensor global scale of a weight, from its unclipped group scales."""
    return encode_scales(unclipped_group_scales(w, fmt), fmt, per_row=False)[1]


def search_group_scales(
    w: torch.Tensor, fmt: QFormat, global_scale: torch.Tensor, clip_search: bool = True,
    ratios: tuple[float, float, int] = CLIP_RATIOS,
) -> torch.Tensor:
    """Stored group scales [.., K/G] for w under a fixed global scale.

    Each group takes, among ``ratios`` (low, high, count; linearly spaced, tried from high to
    low) times its unclipped scale, the one whose stored (E4M3-rounded) scale gives the least
    squared error over the group, the first tried on ties (only the ratio 1 without
    ``clip_search``). All candidates are evaluated in one batched computation (rows in chunks
    to bound memory); every element goes through the same fp32 operations as one at a time.
    """
    w = w.detach().float()
    lo, hi, n = ratios
    cand = torch.linspace(hi, lo, n) if clip_search else torch.ones(1)
    if w.dim() == 0 or w.shape[-1] == 0:
        raise ValueError("search_group_scales needs a weight with a last dimension")
    rows = w.reshape(-1, w.shape[-1])
    # elements per batched block: ~1M on the CPU (cache-sized; measured fastest), 16M on a GPU
    # (fewer launches: small blocks made RTN of a 7B-shaped layer launch-bound)
    budget = 1 << (24 if rows.is_cuda else 20)
    chunk = max(1, budget // max(1, cand.numel() * rows.shape[1]))
    parts = [_search_rows(rows[i:i + chunk], fmt, global_scale, cand) for i in range(0, rows.shape[0], chunk)]
    return torch.cat(parts).reshape(*w.shape[:-1], -1)


def _search_rows(w: torch.Tensor, fmt: QFormat, global_scale: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """:func:`search_group_scales` for a [R, K] block: candidates along a new leading dim."""
    base = unclipped_group_scales(w, fmt)                     # [R, G]
    r = cand.to(base.device).reshape(-1, 1, 1)                # [C, 1, 1]
    if fmt.scale_dtype == "e4m3":
        stored = e4m3_group_scales(base * r / global_scale, fmt)
    else:
        stored = (base * r).to(fmt.scale_torch_dtype)
    eff = effective_scales(stored, global_scale)              # [C, R, G]
    wc = w.expand(r.shape[0], *w.shape)
    err = (_grouped(dequantize_codes(quantize_codes(wc, eff, fmt), eff, fmt), fmt.group_size)
           - _grouped(w, fmt.group_size)).pow(2).sum(-1)       # [C, R, G]
    best = torch.argmin(err, dim=0, keepdim=True)            # first minimum: the earliest candidate on ties
    return torch.gather(stored.float(), 0, best)[0].to(stored.dtype)


def quantize_weight_rtn(
    w: torch.Tensor,
    fmt: QFormat,
    clip_search: bool = True,
    ratios: tuple[float, float, int] = CLIP_RATIOS,
) -> QTensor:
    """Static weight quantization: RTN with a per-group clipping-ratio search.

    The global scale is fixed from the unclipped scales; the group scales come from
    :func:`search_group_scales`.
    """
    w = w.detach().float()
    gscale = weight_global_scale(w, fmt)
    stored = search_group_scales(w, fmt, gscale, clip_search, ratios)
    eff = effective_scales(stored, gscale)
    return QTensor(quantize_codes(w, eff, fmt), stored, gscale, fmt)


# -- nested grids ---------------------------------------------------------------

def nest_codes(q8: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """b-bit codes of ``fmt`` derived from 8-bit codes of the same grid (module docstring)."""
    d = 8 - fmt.bits
    q = q8.to(torch.int32)
    if d == 0:
        return q.to(torch.int8)
    if fmt.grid == "int":
        q = (q + (1 << (d - 1))) >> d
    else:
        q = q >> d
    return q.clamp(fmt.qmin, fmt.qmax).to(torch.int8)


def nest_qtensor(qt8: QTensor, fmt: QFormat) -> QTensor:
    """The b-bit tensor nested in an 8-bit one: same stored group scales, global x 2^(8-b)."""
    if qt8.fmt.bits != 8 or qt8.fmt.grid != fmt.grid or qt8.fmt.group_size != fmt.group_size:
        raise ValueError("nesting needs an 8-bit tensor of the same grid and group size")
    factor = float(1 << (8 - fmt.bits))
    return QTensor(nest_codes(qt8.codes, fmt), qt8.scales, qt8.global_scale * factor, fmt)


# -- packing -----------------------------------------------------------------------

def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int8 codes along the last dim into uint8 (lowest index in the lowest bits)."""
    c = QFormat(bits, "half" if bits == 1 else "int").container_bits
    per_byte = 8 // c
    k = q.shape[-1]
    if k % per_byte:
        raise ValueError(f"last dimension {k} is not a multiple of {per_byte} (codes per byte at {bits} bits)")
    u = (q.to(torch.int32) & ((1 << c) - 1)).reshape(*q.shape[:-1], k // per_byte, per_byte)
    shifts = torch.arange(per_byte, device=q.device, dtype=torch.int32) * c
    return (u << shifts).sum(-1).to(torch.uint8)


def _unpack_codes_arith(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The definition of unpacking: shift each code out of its byte and sign-extend it."""
    c = QFormat(bits, "half" if bits == 1 else "int").container_bits
    per_byte = 8 // c
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * c
    u = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << c) - 1)
    u = torch.where(u >= (1 << (c - 1)), u - (1 << c), u)
    return u.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte).to(torch.int8)


@functools.lru_cache(maxsize=32)
def _unpack_table(bits: int, device: torch.device) -> torch.Tensor:
    """[256, codes per byte] int8: the codes of every byte value (by the definition above)."""
    return _unpack_codes_arith(torch.arange(256, dtype=torch.uint8).unsqueeze(-1), bits).to(device)


def unpack_codes(packed: torch.Tensor, bits: int, k: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int8 codes, sign-extended from their container (one
    lookup per byte in a 256-entry table of :func:`_unpack_codes_arith`'s results)."""
    table = _unpack_table(bits, packed.device)
    q = table[packed.long()].reshape(*packed.shape[:-1], packed.shape[-1] * table.shape[1])
    if k is not None:
        q = q[..., :k]
    return q
