"""Quantization-aware training: trainable fake-quant sites and their freezing.

``prepare_qat(model, recipe)`` (``compile_quantized(..., mode="train")``) compiles a model
as usual (capture, the recipe's passes, quantization with the recipe's weight method)
but puts a :class:`FakeQuantLinear` at every quantized site instead of a packed
``QuantLinear``. ``freeze(model)`` turns each FakeQuantLinear back into a QuantLinear
holding exactly the codes and scales the training forward used.

Math of a FakeQuantLinear (weight format ``fmt``, group size G, global scale g)
------------------------------------------------------------------------------
Trainable tensors: a latent float weight ``W`` [N, K'] (K' the padded width of the
site) and one log group scale ``t`` per group [N, K'/G].

* stored group scale ``S = e4m3(clamp(exp(t), 2^-9, fmt.scale_max))``: the E4M3 value
  the artifact will hold (round to nearest even), with a straight-through gradient
  (``dS/dt = exp(t)``). Groups whose initial scale was zero (all-zero groups, padding)
  keep S = 0.
* effective scale ``s = S * g`` (fp32; ``g`` is a fixed buffer).
* codes and values come from :mod:`lowbit.formats` itself:
  ``q = quantize_codes(W, s)``, ``W_q = dequantize_codes(q, s)``, so the forward value is
  bit for bit the weight the inference op dequantizes.
* gradients (straight-through estimator for the rounding, LSQ for the scale): with
  ``r = W / s`` and ``l`` the level of q (``q``, or ``q + 0.5`` on the half grid),
  ``dW_q/dW = 1`` where r lies inside the grid's range and 0 where it is clipped;
  ``dW_q/ds = l - r`` inside and ``l`` where clipped (summed over the group).
  Learning the group scales therefore learns each group's clipping as well.

Activations (``act_format``) are fake-quantized per token and group exactly as
``torch.ops.lowbit.qlinear`` does (``lowbit.ops.fake_quantize_act``), with a plain
straight-through gradient: dynamic scales are rounded up and never clip, so the
estimator is exact everywhere except at the rounding itself. A clipped activation format
(``clip < 1``, :mod:`lowbit.formats`) clamps the largest elements of a row to the end
levels; their gradient is zero. Optionally (:meth:`FakeQuantLinear.learn_act_clip`, the
trainer's ``act_clip_lr``) the clip ratio ``c`` is itself trained: the row's effective scales
are ``s = S * fp32(global * c)``, and ``c`` gets LSQ's gradient through them,
``d x_q / d c = (l - x / s) * s / c`` inside the grid and ``l * s / c`` where clipped.

Invariants: (1) ``freeze`` changes no output beyond float rounding (in fp32 the frozen
QuantLinear's reference op gives the same numbers); (2) the prologue of the site (online
Hadamard, channel split) is kept and applied first, as in QuantLinear; (3) the fp32
float weight of the site after the recipe's passes is kept as a buffer, so ``float_mode``
turns the model into the (rotated, split) float model the student distills from.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops  # noqa: F401  (registers torch.ops.lowbit)
from .formats import (
    QFormat,
    QTensor,
    _grouped,
    dequantize_codes,
    effective_scales,
    nest_codes,
    quantize_codes,
    quantize_weight_rtn,
    round_e4m3,
    unpack_codes,
)
from .quant_linear import QuantLinear
from .sites import register_site_module
from lowbit.passes.quantize import QuantizePass
from lowbit.passes.weights import get_attr_path, install_module

MIN_SCALE = 2.0 ** -9  # smallest positive E4M3 value (subnormal)
MIN_ACT_CLIP = 0.05  # lowest learned activation clip ratio


def _straight_through(value: torch.Tensor, source: torch.Tensor, slope: torch.Tensor | None = None) -> torch.Tensor:
    """``value`` in the forward, gradient ``slope * g`` (or ``g``) into ``source`` in the backward.

    ``value + (source - source.detach()) * slope``: the added term is exactly zero for finite
    ``source`` and ``slope``, so the forward is bit for bit ``value``. Written with detach
    rather than as a ``torch.autograd.Function`` because torch.compile traces it as plain
    tensor math: torch 2.11 compiled blocks with these estimators as autograd Functions into
    graphs whose backward gave every latent weight and scale a zero gradient."""
    delta = source - source.detach()
    return value.detach() + (delta if slope is None else delta * slope)


def _stored_scale(ratio: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """Forward: the stored group scale (E4M3-rounded, or rounded to fp16/fp32); backward: identity."""
    with torch.no_grad():
        stored = ratio.clamp(MIN_SCALE, fmt.scale_max if fmt.scale_dtype == "e4m3" else float("inf"))
        stored = round_e4m3(stored) if fmt.scale_dtype == "e4m3" else stored.to(fmt.scale_torch_dtype).float()
    return _straight_through(stored, ratio)


def _inside_grid(r: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """Where ``r = x / s`` rounds into fmt's grid without clamping: ``[lo - 0.5, hi + 0.5)`` in
    units of the scale, for both grids (the straight-through estimators pass gradient there)."""
    return (r >= fmt.level_lo - 0.5) & (r < fmt.level_hi + 0.5)


def _rounding_terms(x: torch.Tensor, codes: torch.Tensor, eff_scales: torch.Tensor, fmt: QFormat):
    """The straight-through terms of quantizing ``x`` to ``codes`` with ``eff_scales``, grouped
    [..., K/G, G]: ``inside`` (``r = x / s`` rounds into the grid), ``slope`` (LSQ's
    ``d x_q / d s = l - r`` inside, ``l`` where clamped; zero in groups of scale 0) and ``live``
    (the group's scale is not 0)."""
    s = eff_scales.float().unsqueeze(-1)
    live = s != 0
    r = _grouped(x.float(), fmt.group_size) / torch.where(live, s, torch.ones_like(s))
    level = _grouped(codes.float(), fmt.group_size) + (0.5 if fmt.grid == "half" else 0.0)
    inside = _inside_grid(r, fmt)
    return inside, torch.where(inside, level - r, level) * live, live


def fake_quantize_weight(w: torch.Tensor, eff_scales: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """Differentiable weight fake-quant: ``dequantize_codes(quantize_codes(w, s), s)`` (values
    exactly those of :mod:`lowbit.formats`) with STE (w) and LSQ (s) gradients."""
    with torch.no_grad():
        codes = quantize_codes(w, eff_scales, fmt)
        value = _grouped(dequantize_codes(codes, eff_scales, fmt), fmt.group_size)
        inside, scale_slope, live = _rounding_terms(w, codes, eff_scales, fmt)  # d W_q / d s, per element
        inside = inside & live
    grouped_w = _grouped(w, fmt.group_size)
    out = _straight_through(value, grouped_w, inside.to(grouped_w.dtype))
    out = out + (eff_scales - eff_scales.detach()).unsqueeze(-1).to(out.dtype) * scale_slope
    return out.reshape(w.shape)


def fake_quantize_act(x: torch.Tensor, fmt: QFormat, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token activation fake-quant of ``torch.ops.lowbit.qlinear`` (values exactly
    ``lowbit.ops.fake_quantize_act``); straight-through gradient, zero where a clipped format
    (``fmt.clip < 1``) clamps the element to an end level.

    ``clip``: a learned clip ratio (an fp32 scalar tensor in (0, 1]) in place of ``fmt.clip``.
    The values are those of the format with ``clip=float(clip)``: the row's global scale is
    ``fp32(global * clip)`` either way. Its gradient is LSQ's through the effective scales
    ``s = S * global * clip``: ``d x_q / d clip = (l - x / s) * s / clip`` where the element
    rounds inside the grid and ``l * s / clip`` where it is clipped (``l`` its level)."""
    if clip is not None:
        return _fake_quantize_act_learned_clip(x, fmt, clip)
    with torch.no_grad():
        codes, scales, gscale = torch.ops.lowbit.quantize_act(x, fmt.bits, fmt.grid, fmt.group_size,
                                                              fmt.scale_dtype, fmt.clip)
        eff = effective_scales(scales, gscale)
        value = dequantize_codes(codes, eff, fmt)
        inside = None
        if fmt.clip != 1.0:
            s = eff.float().unsqueeze(-1)
            r = _grouped(x.float(), fmt.group_size) / torch.where(s != 0, s, torch.ones_like(s))
            inside = _inside_grid(r, fmt).reshape(x.shape).to(x.dtype)
    return _straight_through(value, x, inside)


def _fake_quantize_act_learned_clip(x: torch.Tensor, fmt: QFormat, clip: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        # the stored scales do not depend on the clip ratio (formats docstring), only the global one
        _, scales, gscale = torch.ops.lowbit.quantize_act(x, fmt.bits, fmt.grid, fmt.group_size,
                                                          fmt.scale_dtype, 1.0)
        stored = scales.float()
        eff = effective_scales(scales, gscale * clip.detach())
        codes = quantize_codes(x, eff, fmt)
        value = dequantize_codes(codes, eff, fmt)
        inside, slope, _ = _rounding_terms(x, codes, eff, fmt)
    eff_grad = _straight_through(eff, stored * gscale * clip)  # the value eff, the gradient into clip
    out = _straight_through(value, x, inside.reshape(x.shape).to(x.dtype))
    dclip = (eff_grad - eff_grad.detach()).unsqueeze(-1).to(out.dtype) * slope
    return out + dclip.reshape(x.shape)


# -- gradients of the prologue ops (straight through their linear maps) -----------------------------

def _hadamard_backward(ctx, g):
    from .hadamard import hadamard_transform

    # y = x H^T / sqrt(n)  =>  dx = g H / sqrt(n)
    return hadamard_transform(g, transpose=True).to(g.dtype)


def _split_setup(ctx, inputs, output):
    x, index, scale = inputs
    ctx.save_for_backward(index, scale)
    ctx.width = x.shape[-1]


def _split_backward(ctx, g):
    index, scale = ctx.saved_tensors
    gx = g.new_zeros(*g.shape[:-1], ctx.width).index_add_(-1, index, g * scale.to(g.dtype))
    return gx, None, None


torch.library.register_autograd("lowbit::hadamard", _hadamard_backward, setup_context=lambda ctx, inputs, output: None)
torch.library.register_autograd("lowbit::channel_split", _split_backward, setup_context=_split_setup)


@register_site_module
class FakeQuantLinear(nn.Module):
    """A trainable quantized linear site (see the module docstring for the math)."""

    def __init__(self, in_features: int, out_features: int, weight_format: QFormat,
                 act_format: QFormat | None = None, bias: bool = False, weight_in_features: int | None = None,
                 prologue: list[nn.Module] | None = None, device=None):
        super().__init__()
        from .quant_linear import padded_width

        self.in_features, self.out_features = in_features, out_features
        self.weight_in_features = weight_in_features or in_features
        self.weight_format, self.act_format = weight_format, act_format
        k = padded_width(self.weight_in_features, weight_format, act_format)
        self.packed_in_features = k
        self.weight = nn.Parameter(torch.zeros(out_features, k, device=device))
        self.log_scale = nn.Parameter(torch.zeros(out_features, k // weight_format.group_size, device=device))
        self.register_buffer("live_groups", torch.ones(out_features, k // weight_format.group_size,
                                                       dtype=torch.bool, device=device))
        self.register_buffer("weight_global", torch.ones((), device=device))
        self.register_buffer("float_weight", torch.zeros(out_features, k, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self.prologue = nn.ModuleList(prologue or [])
        self.float_mode = False
        self.register_parameter("act_clip_ratio", None)  # a learned activation clip ratio (learn_act_clip)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_quant_linear(cls, ql: QuantLinear, float_weight: torch.Tensor) -> "FakeQuantLinear":
        """The trainable twin of ``ql``: same codes, scales, prologue and bias.

        ``float_weight`` [N, K'] is the site's float weight (after the recipe's passes). The
        latent weight is that weight wherever it rounds to ql's code, and the dequantized
        code elsewhere (GPTQ moves codes), so the twin starts with exactly ql's codes.
        """
        m = cls(ql.in_features, ql.out_features, ql.weight_format, ql.act_format, ql.bias is not None,
                ql.weight_in_features, list(ql.prologue), device=ql.weight_packed.device)
        k = m.packed_in_features
        fw = float_weight.detach().float()
        fw = F.pad(fw, (0, k - fw.shape[1])) if fw.shape[1] < k else fw
        qt = QTensor(unpack_codes(ql.weight_packed, ql.weight_format.bits, k), ql.weight_scales,
                     ql.weight_global, ql.weight_format)
        m.load_qtensor(qt, fw)
        if ql.bias is not None:
            m.bias.data.copy_(ql.bias.float())
        return m

    def load_qtensor(self, qt: QTensor, float_weight: torch.Tensor | None = None) -> None:
        """Set scales and latent weight so that the forward reproduces ``qt`` exactly."""
        with torch.no_grad():
            stored = qt.scales.float()
            self.weight_global.copy_(qt.global_scale.reshape(()).float())
            self.live_groups.copy_(stored > 0)
            self.log_scale.copy_(torch.log(stored.clamp_min(MIN_SCALE)))
            eff = self.eff_scales().detach()
            deq = dequantize_codes(qt.codes, eff, self.weight_format)
            if float_weight is not None:
                self.float_weight.copy_(float_weight)
                same = quantize_codes(float_weight, eff, self.weight_format) == qt.codes
                self.weight.copy_(torch.where(same, float_weight, deq))
            else:
                self.weight.copy_(deq)

    def _latent_position(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, the codes' values, the group step per element) of the current latent weight."""
        eff = self.eff_scales().detach()
        codes = quantize_codes(self.weight.detach(), eff, self.weight_format)
        step = eff.repeat_interleave(self.weight_format.group_size, dim=1)
        return codes, dequantize_codes(codes, eff, self.weight_format), step

    def latent_offsets(self, bits: int) -> torch.Tensor:
        """Where each latent weight sits inside its code's rounding interval, which spans one
        group step around the code's value: the interval cut into ``2**bits`` equal parts, part
        ``j`` (from below) returned as the ``bits``-bit code ``j - 2**(bits-1)`` (int8, the
        weight's shape). A weight beyond the end values (clipped) takes the outermost part; a
        dead group (zero scale) the middle. The frozen model keeps only the codes, so a run
        that starts from it (:meth:`Trainer.start_from_artifact`) puts every latent weight at
        its code's value (or at the float weight where that rounds to the same code), where the
        straight-through gradient may need half a step to change it; these offsets let it start
        where the earlier run left the latent weights instead."""
        with torch.no_grad():
            _, level, step = self._latent_position()
            live = step > 0
            r = torch.where(live, (self.weight - level) / torch.where(live, step, 1.0), 0.0)
            parts = 2 ** bits
            part = torch.floor((r.clamp(-0.5, 0.5) + 0.5) * parts).clamp(0, parts - 1)
            return (part - parts // 2).to(torch.int8)

    def set_latent_offsets(self, offsets: torch.Tensor, bits: int) -> None:
        """Put every latent weight at the middle of the part :meth:`latent_offsets` gives, inside
        its current code's interval: the codes, and so the forward, do not change."""
        if tuple(offsets.shape) != tuple(self.weight.shape):
            raise ValueError(f"latent offsets of shape {tuple(offsets.shape)} for a latent weight of shape "
                             f"{tuple(self.weight.shape)}")
        parts = 2 ** bits
        if int(offsets.min()) < -(parts // 2) or int(offsets.max()) >= parts // 2:
            raise ValueError(f"latent offsets outside the {bits}-bit range")
        with torch.no_grad():
            codes, level, step = self._latent_position()
            r = (offsets.to(level.device).float() + parts // 2 + 0.5) / parts - 0.5  # inside (-1/2, 1/2)
            self.weight.copy_(level + r * step)
            if not torch.equal(quantize_codes(self.weight, self.eff_scales(), self.weight_format), codes):
                raise RuntimeError("moving the latent weights inside their intervals changed a code")

    def learn_act_clip(self) -> None:
        """Make the activation clip ratio a trained parameter (fp32, used clamped to
        [MIN_ACT_CLIP, 1]), starting at the format's ratio: ``fp32(global * clip)`` is the same
        number for the format's float and for the parameter holding its fp32 value, so enabling
        it changes no output. It is part of the site's state (checkpoints) and the format's
        ``clip`` follows it wherever the format is read (:meth:`current_act_format`)."""
        if self.act_format is None:
            raise ValueError("learn_act_clip: this site does not quantize its activations")
        if self.act_clip_ratio is None:
            self.act_clip_ratio = nn.Parameter(torch.tensor(self.act_format.clip, dtype=torch.float32,
                                                            device=self.weight.device))

    def act_clip(self) -> torch.Tensor | None:
        """The learned clip ratio (fp32 scalar, differentiable), or None."""
        if self.act_clip_ratio is None:
            return None
        return self.act_clip_ratio.float().clamp(MIN_ACT_CLIP, 1.0)

    def current_act_format(self) -> QFormat | None:
        """The activation format, with the learned clip ratio when there is one."""
        if self.act_clip_ratio is None or self.act_format is None:
            return self.act_format
        return dataclasses.replace(self.act_format, clip=float(self.act_clip().detach()))

    # -- quantizers -----------------------------------------------------------------------------
    def stored_scales(self) -> torch.Tensor:
        """fp32 values of the stored group scales (exact E4M3 values), differentiable in log_scale."""
        s = _stored_scale(torch.exp(self.log_scale.float()), self.weight_format)
        return s * self.live_groups

    def eff_scales(self) -> torch.Tensor:
        return effective_scales(self.stored_scales(), self.weight_global)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight [N, K'] (differentiable)."""
        return fake_quantize_weight(self.weight, self.eff_scales(), self.weight_format)

    def codes(self) -> torch.Tensor:
        with torch.no_grad():
            return quantize_codes(self.weight, self.eff_scales(), self.weight_format)

    def qtensor(self) -> QTensor:
        """The inference form: codes, stored scales (in the format's dtype), global scale."""
        with torch.no_grad():
            stored = self.stored_scales().to(self.weight_format.scale_torch_dtype)
            eff = effective_scales(stored, self.weight_global)
            return QTensor(quantize_codes(self.weight, eff, self.weight_format), stored,
                           self.weight_global.clone(), self.weight_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.prologue:
            x = op(x)
        k = x.shape[-1]
        bias = self.bias
        if self.float_mode:
            return F.linear(x, self.float_weight[:, :k].to(x.dtype), None if bias is None else bias.to(x.dtype))
        w = self.quantized_weight()[:, :k]
        if self.act_format is None and torch.is_autocast_enabled(x.device.type):
            # autocast casts x to its dtype either way; skipping x.float() saves two copies
            return F.linear(x, w, bias)
        xa = x.float()
        if self.act_format is not None:
            pad = self.packed_in_features - k
            xa = fake_quantize_act(F.pad(xa, (0, pad)) if pad else xa, self.act_format, self.act_clip())[..., :k]
        if torch.is_autocast_enabled(x.device.type):
            return F.linear(xa, w, bias)
        return F.linear(xa, w, None if bias is None else bias.float()).to(x.dtype)

    # -- precision changes -------------------------------------------------------------------------
    def set_formats(self, weight_format: QFormat, act_format: QFormat | None = "keep", refit: bool = False) -> None:
        """Move to another weight precision along the nested grids (``lowbit.formats``).

        Going from b to b' < b bits on the same grid, the new codes are the nested ones,
        ``q' = round_shift(q, b - b')``, the stored group scales are kept and the global
        scale grows by ``2^(b - b')``; when the new format's largest stored scale is lower
        (224 at 2 bits) the stored scales are halved and the global doubled (exact in
        E4M3). The latent weight is moved onto the new codes only where it does not already
        round to them. Going up in precision (or to another grid) keeps the latent weight
        and rescales by ``2^(b - b')`` likewise.

        ``refit=True`` instead keeps the latent weight as it is and searches new group scales
        for it in the new format (RTN with clipping search, ``lowbit.formats``): on the
        asymmetric ``int`` grid the nested 2-bit codes of a 3- or 4-bit model clip the
        positive half of each group, a much worse start than a fresh search.
        """
        old = self.weight_format
        if weight_format.group_size != old.group_size:
            raise ValueError("set_formats keeps the group size")
        with torch.no_grad():
            codes = self.codes()
            stored = self.stored_scales().detach()
            g = self.weight_global * float(2.0 ** (old.bits - weight_format.bits))
            while weight_format.scale_dtype == "e4m3" and float(stored.max()) > weight_format.scale_max:
                stored, g = stored / 2, g * 2
            self.weight_format = weight_format
            if act_format != "keep":
                # a site keeps its own activation clip ratio (chosen by act_clip_search) across stages
                keep_clip = act_format is not None and self.act_format is not None
                self.act_format = (dataclasses.replace(act_format, clip=self.act_format.clip) if keep_clip
                                   else act_format)
            self.weight_global.copy_(g)
            self.log_scale.copy_(torch.log(stored.clamp_min(MIN_SCALE)))
            if refit:
                qt = quantize_weight_rtn(self.weight, weight_format)
                self.weight_global.copy_(qt.global_scale.reshape(()))
                self.live_groups.copy_(qt.scales.float() > 0)
                self.log_scale.copy_(torch.log(qt.scales.float().clamp_min(MIN_SCALE)))
                return
            eff = self.eff_scales()
            if weight_format.bits < old.bits and weight_format.grid == old.grid:
                nested = nest_codes((codes.to(torch.int32) << (8 - old.bits)).to(torch.int8), weight_format)
                deq = dequantize_codes(nested, eff, weight_format)
                same = quantize_codes(self.weight, eff, weight_format) == nested
                self.weight.copy_(torch.where(same, self.weight, deq))

    # -- site-module protocol ----------------------------------------------------------------------
    def config(self) -> dict:
        act_format = self.current_act_format()
        return {"in_features": self.in_features, "out_features": self.out_features,
                "weight_in_features": self.weight_in_features, "weight_format": self.weight_format.to_dict(),
                "act_format": act_format.to_dict() if act_format else None,
                "bias": self.bias is not None, "prologue": [p.config() for p in self.prologue]}

    @classmethod
    def from_config(cls, cfg: dict, device=None) -> "FakeQuantLinear":
        from .prologue import prologue_from_config

        return cls(cfg["in_features"], cfg["out_features"], QFormat.from_dict(cfg["weight_format"]),
                   QFormat.from_dict(cfg["act_format"]) if cfg.get("act_format") else None, cfg["bias"],
                   cfg["weight_in_features"], [prologue_from_config(p) for p in cfg.get("prologue", [])], device)

    def to_quant_linear(self) -> QuantLinear:
        ql = QuantLinear(self.in_features, self.out_features, self.weight_format, self.current_act_format(),
                         self.bias is not None, self.weight_in_features, list(self.prologue),
                         device=self.weight.device)
        ql.set_weight(self.qtensor(), None if self.bias is None else self.bias.detach())
        return ql

    def extra_repr(self) -> str:
        a = self.act_format.name if self.act_format else "none"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight={self.weight_format.name}, act={a}, bias={self.bias is not None}")


# -- model-level helpers -------------------------------------------------------------------------

def fake_quant_sites(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


@contextlib.contextmanager
def float_mode(model: nn.Module):
    """Inside the block every FakeQuantLinear computes with its float weight, unquantized:
    the model is the float model (after the recipe's passes) the student distills from."""
    sites = list(fake_quant_sites(model).values())
    for m in sites:
        m.float_mode = True
    try:
        yield model
    finally:
        for m in sites:
            m.float_mode = False


def set_formats(model: nn.Module, weight_format: QFormat, act_format: QFormat | None = "keep",
                refit: bool = False) -> None:
    """Change every site's formats (nested grids, see :meth:`FakeQuantLinear.set_formats`)."""
    for m in fake_quant_sites(model).values():
        m.set_formats(weight_format, act_format, refit)


def trainable_parameters(model: nn.Module, scales: bool = True, weights: bool = True) -> list[nn.Parameter]:
    """Latent weights and log scales of the FakeQuantLinear sites (everything else stays frozen)."""
    out = []
    for m in fake_quant_sites(model).values():
        if weights:
            out.append(m.weight)
        if scales:
            out.append(m.log_scale)
    return out


def freeze(model: nn.Module) -> nn.Module:
    """Replace every FakeQuantLinear by the packed QuantLinear of its current codes (in place)."""
    for name, m in list(fake_quant_sites(model).items()):
        model.set_submodule(name, m.to_quant_linear())
    return model


class TrainableQuantizePass(QuantizePass):
    """The quantize pass with trainable sites: each site is quantized as usual (RTN with
    clipping search, GPTQ, split-aware codes...), then its QuantLinear is replaced by the
    trainable twin (:meth:`FakeQuantLinear.from_quant_linear`)."""

    name = "quantize_train"

    def _quantize_site(self, gm, name, site, node, x, errors):
        float_weight = get_attr_path(gm, site.weight).detach().float().clone()
        super()._quantize_site(gm, name, site, node, x, errors)
        install_module(gm, name, FakeQuantLinear.from_quant_linear(get_attr_path(gm, name), float_weight))


def prepare_qat(model: nn.Module, recipe="w2a16", calibration=None, **kwargs) -> nn.Module:
    """``compile_quantized(model, recipe, calibration, mode="train")``: the model with
    trainable FakeQuantLinear sites, initialised by the recipe's weight method."""
    from .api import compile_quantized

    return compile_quantized(model, recipe, calibration=calibration, mode="train", **kwargs)


def site_error(model: nn.Module) -> float:
    """Mean relative weight error ``||W_q - W_float|| / ||W_float||`` over the sites."""
    errs = []
    with torch.no_grad():
        for m in fake_quant_sites(model).values():
            errs.append(float((m.quantized_weight() - m.float_weight).norm() / m.float_weight.norm().clamp_min(1e-30)))
    return sum(errs) / max(1, len(errs)) if errs else math.nan
