"""Random 2-bit weights and the error measure shared by the GPU test modules (imported as a
plain module, like tests/tiny_exports.py: pytest puts this folder on sys.path)."""
import torch

from lowbit.formats import QFormat, pack_codes
from lowbit.ops import dequantize_weight


def random_2bit_weight(n, k, grid, seed, device="cuda", edge_scales=False):
    """Random codes and E4M3 scales of a valid 2-bit tensor [n, k] (every code value occurs):
    ``(packed, stored scales, global scale, float weight)``. ``edge_scales`` also plants
    subnormal and negative scales."""
    g = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(-2, 2, (n, k), generator=g, device=device, dtype=torch.int8)
    stored = (torch.rand(n, k // 16, generator=g, device=device) * 224).to(torch.float8_e4m3fn)
    if edge_scales:
        sb = stored.view(torch.uint8)
        sb[:, ::7] = torch.randint(0, 0x7E, (n, sb[:, ::7].shape[1]), generator=g, device=device, dtype=torch.uint8)
        sb[::5, 3::11] |= 0x80  # negative scales
    gscale = torch.tensor(3e-4, device=device)
    packed = pack_codes(codes, 2)
    w = dequantize_weight(packed, stored, gscale, QFormat(2, grid))
    return packed, stored, gscale, w


def rel_error(y, ref):
    """Relative Frobenius error of y against a float64 reference."""
    return ((y.double() - ref).norm() / ref.norm()).item()
