"""GPTQ: error-compensating weight quantization from calibration activations.

For a site ``y = x W^T`` with calibration inputs X [n, K], the layer's output error of a
quantized weight Q is ``||X (W - Q)^T||^2 = sum_rows (w - q) H (w - q)^T`` with the
Hessian ``H = X^T X`` (damped: ``+ damp * mean(diag H) * I``). GPTQ quantizes the
columns one at a time; after column j is rounded, the remaining columns absorb its
error optimally: with ``U`` the upper Cholesky factor of ``H^-1``,
``W[:, j+1:] -= ((w_j - q_j) / U[j, j]) U[j, j+1:]``. Updates are applied in blocks of
columns (lazy batch updates) for speed; the result is the same.

Microscaling groups. The fp32 global scale is fixed from the original weight. Without
act-order, a group's E4M3 scale is searched (``lowbit.formats.search_group_scales``) on
the error-updated weights when GPTQ reaches the group's first column, so it sees the
values it will quantize. With act-order (columns by decreasing ``H[j, j]``) the group
scales are searched on the original weight before the loop ("static groups"), since a
group's columns are then visited out of order.

Invariants: the codes are exactly the format's rounding of the updated weights with the
stored scales (``lowbit.formats.quantize_codes``), so the QTensor is an ordinary one;
columns that calibration never excites (``H[j, j] = 0``) are quantized plainly.
Works for every weight format (bits 2, 3, 4, 8; ``int`` and ``half`` grids).
"""
from __future__ import annotations

import torch

from lowbit.formats import (
    QFormat,
    QTensor,
    dequantize_codes,
    effective_scales,
    quantize_codes,
    search_group_scales,
    weight_global_scale,
)


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``X^T X / n`` in float64 for inputs x [..., K]."""
    x = x.reshape(-1, x.shape[-1]).double()
    return x.T @ x / max(1, x.shape[0])


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    fmt: QFormat,
    act_order: bool = False,
    damp: float = 0.01,
    block: int = 128,
    clip_search: bool = True,
) -> QTensor:
    """Quantize w [N, K] given the Hessian h [K, K] of its inputs (K a multiple of the group)."""
    n_out, k = w.shape
    g = fmt.group_size
    if k % g:
        raise ValueError(f"GPTQ needs a width that is a multiple of the group size ({k} % {g})")
    block = max(g, (block // g) * g)
    w = w.detach().double().clone()
    h = h.detach().double().clone()
    gscale = weight_global_scale(w.float(), fmt)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(k, dtype=h.dtype, device=h.device) * damp * torch.diagonal(h).mean()
    stored = None
    if act_order:
        stored = search_group_scales(w.float(), fmt, gscale, clip_search)
        perm = torch.argsort(torch.diagonal(h), descending=True)
    else:
        perm = torch.arange(k, device=w.device)
        stored = torch.zeros(n_out, k // g, device=w.device).to(fmt.scale_torch_dtype)
    inv = torch.argsort(perm)
    w = w[:, perm]
    h = h[perm][:, perm]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    off = 0.5 if fmt.grid == "half" else 0.0
    q_all = torch.zeros_like(w)
    zero_col = torch.zeros(n_out, dtype=w.dtype, device=w.device)

    def group_scales(scale):  # (scale, scale > 0, scale with its zeros replaced by 1)
        pos = scale > 0
        return scale, pos, torch.where(pos, scale, torch.ones_like(scale))

    if act_order:  # every group's scale is fixed before the loop
        eff_all, pos_all, safe_all = group_scales(effective_scales(stored, gscale).double())
    order = perm.tolist()
    current = None  # (scale, pos, safe) of the group being quantized (no act-order)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            orig = order[col]
            grp = orig // g
            if act_order:
                scale, pos, safe = eff_all[:, grp], pos_all[:, grp], safe_all[:, grp]
            else:
                if orig % g == 0:  # group start: scale from the updated weights
                    s = search_group_scales(w1[:, i:i + g].float(), fmt, gscale, clip_search)
                    stored[:, grp] = s[:, 0]
                    current = group_scales(effective_scales(stored[:, grp], gscale).double())
                scale, pos, safe = current
            r = w1[:, i] / safe
            code = (torch.floor(r) if fmt.grid == "half" else torch.round(r)).clamp(fmt.qmin, fmt.qmax)
            q = torch.where(pos, (code + off) * scale, zero_col)
            q_all[:, col] = q
            e = (w1[:, i] - q) / hinv1[i, i]
            # lazy updates: the error reaches the rest of its chunk of g columns at once, and the
            # rest of the block when the chunk is done (the same sum, in fewer, larger products)
            c_start, c_end = (i // g) * g, min((i // g + 1) * g, i2 - i1)
            w1[:, i:c_end] -= e[:, None] * hinv1[i, i:c_end][None, :]
            err1[:, i] = e
            if i + 1 == c_end and c_end < i2 - i1:
                w1[:, c_end:] -= err1[:, c_start:c_end] @ hinv1[c_start:c_end, c_end:]
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    q_all = q_all[:, inv]
    eff_scales = effective_scales(stored, gscale)
    codes = quantize_codes(q_all.float(), eff_scales, fmt)
    return QTensor(codes, stored, gscale, fmt)


class GPTQWeightQuantizer:
    """A ``weight_quantizer`` for the quantize pass: GPTQ from the site's calibration inputs.

    Falls back to RTN (with the clipping search) for a site without calibration inputs.
    """

    def __init__(self, fmt: QFormat, act_order: bool = False, damp: float = 0.01, clip_search: bool = True):
        self.method = "gptq" + ("+act_order" if act_order else "")
        self.fmt, self.act_order, self.damp, self.clip_search = fmt, act_order, damp, clip_search
        self._last_hessian: tuple[torch.Tensor, torch.Tensor] | None = None  # (inputs, their Hessian)

    def site_hessian(self, inputs: torch.Tensor) -> torch.Tensor:
        """``hessian(inputs)``, built once for consecutive sites given the same inputs tensor
        (the quantize pass passes one tensor to the sites that read one activation)."""
        if self._last_hessian is None or self._last_hessian[0] is not inputs:
            self._last_hessian = (inputs, hessian(inputs))
        return self._last_hessian[1]

    def __call__(self, name: str, weight: torch.Tensor, inputs: torch.Tensor | None,
                 fmt: QFormat | None = None) -> QTensor | None:
        """GPTQ codes of ``weight`` in ``fmt`` (default: the quantizer's format)."""
        if inputs is None:
            return None
        fmt = fmt or self.fmt
        k = weight.shape[1]
        from lowbit.quant_linear import padded_width

        kp = padded_width(k, fmt)
        h = self.site_hessian(inputs)
        w = weight
        if kp != k:  # padded columns see zero inputs: dead columns, quantized to zero codes
            w = torch.nn.functional.pad(weight.detach().float(), (0, kp - k))
            h = torch.nn.functional.pad(h, (0, kp - k, 0, kp - k))
        return gptq_quantize(w, h, fmt, self.act_order, self.damp, clip_search=self.clip_search)


def layer_output_error(w: torch.Tensor, qt: QTensor, x: torch.Tensor) -> float:
    """Relative output error ``||x (W - Q)^T|| / ||x W^T||`` (float64)."""
    x = x.reshape(-1, x.shape[-1]).double()
    deq = dequantize_codes(qt.codes, qt.eff_scales(), qt.fmt).double()[:, : w.shape[1]]
    ref = x @ w.double().T
    return ((x @ deq.T - ref).norm() / ref.norm()).item()
