"""CPU checks of the Gluon codebook kernel's offline formats (codegen/triton/codebook_gluon.py),
pure torch: the table words, the kernel's sign construction replayed on them, the int16
indices and row scales, and a float64 GEMV on those formats against lowbit's dequantized
codebook weight."""
import pytest
import torch

from lowbit.codebook import dequantize_codebook_weight, pack_codebook, pack_indices
from lowbit.codegen.triton import codebook_gluon as cg


def _codebook_weight(n, k, c, seed):
    g = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(1 << c, 16, generator=g) < 0.5, -1.0, 1.0)
    idx = torch.randint(0, 1 << c, (n, k // 16), generator=g)
    stored = (torch.rand(n, 1, generator=g) * 200).to(torch.float8_e4m3fn)
    gscale = torch.tensor(3e-3)
    return signs, idx, pack_indices(idx, c), pack_codebook(signs), stored, gscale


@pytest.mark.parametrize("c", [1, 8, 11, 12])
def test_table_words_carry_the_codebook_signs(c):
    signs, _, _, cb, _, _ = _codebook_weight(4, 256, c, seed=c)
    words = cg.table_words(cb, c)
    assert words.dtype == torch.int32 and words.shape == (1 << c,)
    assert torch.equal(cg.signs_of_table(words).float(), signs)


@pytest.mark.parametrize("c", [1, 8, 11])
def test_byte_table_carries_the_codebook_signs(c):
    signs, _, _, cb, _, _ = _codebook_weight(4, 256, c, seed=c + 1)
    words = cg.table_bytes(cb, c)
    assert words.dtype == torch.int32 and words.shape == (4 << c,)
    assert torch.equal(cg.signs_of_byte_table(words).float(), signs)
    # every byte is the high byte of bf16 +1 (0x3F80) or -1 (0xBF80)
    b = words.view(torch.uint8)
    assert bool(((b == 0x3F) | (b == 0xBF)).all())


def test_table_word_bit_of_each_element():
    """A codeword with only element j negative sets exactly bit 8 + j/2 (j even) or 24 + (j-1)/2
    (j odd): the pair (2i, 2i + 1) lands on bits 15 / 31 after a left shift by 7 - i."""
    signs = torch.ones(16, 16)
    for j in range(16):
        signs[j, j] = -1.0
    words = cg.table_words(pack_codebook(signs), 4).to(torch.int64) & 0xFFFFFFFF
    for j in range(16):
        bit = 8 + j // 2 if j % 2 == 0 else 24 + j // 2
        assert words[j].item() == 1 << bit
        i = j // 2
        assert ((words[j].item() << (7 - i)) & 0xFFFFFFFF) == 1 << (15 if j % 2 == 0 else 31)


@pytest.mark.parametrize("n,k,c,byte_table", [(64, 256, 11, True), (64, 256, 11, False), (128, 512, 8, True),
                                              (64, 768, 12, False)])
def test_formats_reproduce_the_dequantized_product(n, k, c, byte_table):
    """y = rowscale * sum_m <signs[idx[n, m]], x[16 m: 16 m + 16]> on the prepared formats, in
    float64, equals x @ W^T with lowbit's dequantized codebook weight."""
    signs, idx, idx_packed, cb, stored, gscale = _codebook_weight(n, k, c, seed=n + c)
    idx16, table, rowscale, is_bytes = cg.prepared(idx_packed, cb, stored, gscale, c, k, byte_table)
    assert is_bytes == byte_table
    assert idx16.dtype == torch.int16 and torch.equal(idx16.long(), idx)
    assert rowscale.dtype == torch.float32 and rowscale.shape == (n,)
    x = torch.randn(3, k, dtype=torch.float64)
    signs = cg.signs_of_byte_table(table) if byte_table else cg.signs_of_table(table)
    s = signs.double()[idx16.long()]                                     # [n, k/16, 16]
    y = torch.einsum("nmj,rmj->rn", s, x.reshape(3, k // 16, 16)) * rowscale.double()
    w = dequantize_codebook_weight(idx_packed, cb, stored, gscale, 16, c, k, "e4m3").double()
    ref = x @ w.T
    assert ((y - ref).norm() / ref.norm()).item() < 1e-12


def test_prepared_is_cached_until_a_tensor_changes():
    _, _, idx_packed, cb, stored, gscale = _codebook_weight(64, 256, 11, seed=3)
    a = cg.prepared(idx_packed, cb, stored, gscale, 11, 256)
    assert cg.prepared(idx_packed, cb, stored, gscale, 11, 256) is a
    gscale.mul_(2.0)  # in place: the row scales must follow
    b = cg.prepared(idx_packed, cb, stored, gscale, 11, 256)
    assert b is not a and torch.equal(b.rowscale, a.rowscale * 2)
    assert not a.byte_table and cg.prepared(idx_packed, cb, stored, gscale, 11, 256, byte_table=True).byte_table


def test_unsupported_says_why():
    _, _, idx_packed, _, _, _ = _codebook_weight(64, 256, 11, seed=4)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    assert cg.unsupported(x, idx_packed, 11, 256) is not None   # CPU (or the interpreter)
    with pytest.raises(ValueError, match="15 bits"):
        cg.indices_int16(idx_packed, 16, 16)
    _, _, idx12, cb12, st12, gs12 = _codebook_weight(64, 256, 12, seed=5)
    with pytest.raises(ValueError, match="at most 11 index bits"):
        cg.prepared(idx12, cb12, st12, gs12, 12, 256, byte_table=True)


def test_shape_problem_sends_oversized_k_to_triton():
    """Codebook mode has no classic-kernel fallback: where the staged share of x cannot fit in
    one program's shared memory the call must be refused (and so routed to a Triton path)."""
    assert cg.shape_problem(1, 8192, 8192, 11, 8192) is None
    assert cg.shape_problem(8, 28672, 8192, 11, 8192) is None
    # 8 rows of K = 65536 split 4 ways: 8 * 16384 bf16 of x alone are 256 KiB, over the 227 KiB
    assert 8 * (65536 // 4) * 2 > 227 * 1024
    why = cg.shape_problem(8, 8192, 65536, 11, 65536)
    assert why is not None and "shared memory" in why
    assert cg.shape_problem(1, 8192, 8192, 11, 8448) is not None     # padded width != K
    assert cg.shape_problem(1, 8160, 8192, 11, 8192) is not None     # N not a multiple of 64
    assert cg.shape_problem(1, 8192, 8192, 16, 8192) is not None     # too many index bits
