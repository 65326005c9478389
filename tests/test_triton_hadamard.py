"""The Triton butterfly kernel of the Hadamard transform (through Triton's interpreter on the CPU):
bit for bit the torch butterfly stages, and inside hadamard_transform bit for bit the reference."""
import pytest
import torch

from lowbit.codegen.triton import fwht
from lowbit.hadamard import _fwht_last, hadamard_matrix, hadamard_transform


@pytest.mark.parametrize("p", [2, 4, 16, 128, 512, 4096])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_fwht_kernel_equals_torch_stages_bit_for_bit(p, rows):
    g = torch.Generator().manual_seed(p * 100 + rows)
    x = torch.randn(rows, p, generator=g) * torch.logspace(-3, 3, p)[torch.randperm(p, generator=g)]
    got = fwht(x, p)
    want = _fwht_last(x.clone(), p)
    assert torch.equal(got, want)
    # and it is the Sylvester transform (float64 matrix product, independent of both)
    ref = (x.double() @ hadamard_matrix(p).double().T)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-3 * x.abs().max().item())


@pytest.mark.parametrize("n", [64, 576, 1536, 160])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transpose", [False, True])
def test_hadamard_transform_with_the_kernel_is_the_reference(n, dtype, transpose):
    x = torch.randn(3, 7, n, generator=torch.Generator().manual_seed(n)).to(dtype)
    want = hadamard_transform(x, transpose=transpose)
    got = hadamard_transform(x, transpose=transpose, fwht=fwht)
    assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fwht_kernel_takes_half_inputs_as_their_float32_values(dtype):
    """A half input is converted as the kernel loads it: the result is the float32 transform of
    its float32 values (no float32 copy needed first)."""
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(9, 256, generator=g) * 30).to(dtype)
    got = fwht(x, 256)
    assert got.dtype == torch.float32
    assert torch.equal(got, _fwht_last(x.float(), 256))


def test_fwht_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(2, 12), 12)
    with pytest.raises(ValueError, match="float32"):
        fwht(torch.zeros(2, 16, dtype=torch.float64), 16)
    assert fwht(torch.zeros(0, 16), 16).shape == (0, 16)


def test_the_kernel_is_the_cuda_butterflies_once_registered_and_can_be_removed(monkeypatch):
    """Importing lowbit.codegen.triton makes the kernel the CUDA butterflies; a CPU tensor keeps
    the torch stages; removing the registration goes back to them."""
    import lowbit.hadamard as lh
    from lowbit.codegen.triton.dispatch import fwht_cuda

    assert lh._FWHT_KERNELS.get("cuda") is fwht_cuda
    assert "cpu" not in lh._FWHT_KERNELS
    monkeypatch.setattr(lh, "_FWHT_KERNELS", dict(lh._FWHT_KERNELS))
    lh.register_fwht_kernel("cuda", None)
    assert "cuda" not in lh._FWHT_KERNELS
