"""The encodings of a pruned weight: CSR, relative indices, bit packing (sparsenet.codecs)."""
import numpy as np
import pytest
import scipy.sparse
from hypothesis import given
from hypothesis import strategies as st

from sparsenet.codecs import (as_matrix, check_csr, csr_from_dense, csr_to_dense, pack_bits, relative_decode,
                              relative_encode, unpack_bits)


def roundtrip(A, bits, mask=None):
    codes, values = relative_encode(A, bits, mask)
    packed = pack_bits(codes, bits)
    assert len(packed) == -(-len(codes) * bits // 8)
    data, indices, indptr = relative_decode(unpack_bits(packed, bits, len(codes)), values, A.shape, bits)
    check_csr(data, indices, indptr, A.shape)
    return codes, csr_to_dense(data, indices, indptr, A.shape)


def assert_bitwise(A, B):
    """Equal float32 bit patterns, −0.0 (a pruned negative weight) read as +0.0."""
    assert np.array_equal((A + np.float32(0)).view(np.uint32), (B + np.float32(0)).view(np.uint32))


@st.composite
def sparse_matrices(draw):
    """Float32 matrices mixing empty, fully dense and random rows, with gaps past 2^bits."""
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 300))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kinds = draw(st.lists(st.sampled_from(["empty", "dense", "sparse", "very sparse"]), min_size=rows, max_size=rows))
    p = np.array([{"empty": 0.0, "dense": 1.0, "sparse": 0.1, "very sparse": 0.01}[k] for k in kinds])
    keep = rng.random((rows, cols)) < p[:, None]
    values = (rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-40, 30, (rows, cols))).astype(np.float32)
    values[values == 0] = 1.0  # subnormals stay, underflows to 0 do not
    return np.where(keep, values, np.float32(-0.0))


@given(sparse_matrices(), st.sampled_from([1, 2, 3, 5, 8]))
def test_relative_roundtrip_is_bitwise(A, bits):
    codes, B = roundtrip(A, bits)
    assert_bitwise(A, B)
    F = 2**bits - 1
    pos = np.flatnonzero(A)
    assert (codes != F).sum() == len(pos)
    assert (codes == F).sum() == ((np.diff(pos, prepend=-1) - 1) // F).sum()  # s // F fillers per gap of s


@given(sparse_matrices(), st.sampled_from([1, 5, 8]), st.integers(0, 2**32 - 1))
def test_a_mask_gives_the_stored_positions_zero_values_included(A, bits, seed):
    """With a mask, exactly its ones are stored, a 0.0 (or −0.0) value with its sign."""
    rng = np.random.default_rng(seed)
    mask = (A != 0) & (rng.random(A.shape) < 0.8)  # some non-zeros are not stored...
    zeros = mask & (rng.random(A.shape) < 0.3)
    A = np.where(zeros, np.where(rng.random(A.shape) < 0.5, np.float32(0.0), np.float32(-0.0)), A)  # ...some stored 0s
    A = np.where(mask, A, np.float32(0.0))
    codes, B = roundtrip(A, bits, mask)
    assert np.array_equal(A.view(np.uint32), B.view(np.uint32))  # −0.0 survives too
    assert (codes != 2**bits - 1).sum() == mask.sum()
    data, indices, indptr = csr_from_dense(A, mask)
    assert len(data) == mask.sum() and np.array_equal(csr_to_dense(np.ones_like(data), indices, indptr, A.shape),
                                                      mask.astype(np.float32))
    assert np.array_equal(csr_to_dense(data, indices, indptr, A.shape).view(np.uint32), A.view(np.uint32))


def test_mask_of_another_shape_is_refused():
    with pytest.raises(ValueError, match="mask of shape"):
        csr_from_dense(np.ones((2, 3), np.float32), np.ones((3, 2)))
    with pytest.raises(ValueError, match="mask of shape"):
        relative_encode(np.ones((2, 3), np.float32), 5, np.ones(6))


@pytest.mark.parametrize("p", [0, 1, 29, 30, 31, 32, 61, 62, 63, 200, 299])
def test_gap_lengths_around_the_index_range(p):
    A = np.zeros((1, 300), np.float32)
    A[0, p] = 3.5
    A[0, -1] = -1.25
    codes, B = roundtrip(A, 5)
    assert_bitwise(A, B)
    assert list(codes[:p // 31]) == [31] * (p // 31) and codes[p // 31] == p % 31


@pytest.mark.parametrize("A", [np.zeros((3, 4), np.float32), np.ones((3, 4), np.float32),
                               np.arange(1, 8, dtype=np.float32)[:, None], np.zeros((5, 1), np.float32)],
                         ids=["empty", "dense", "single column", "empty column"])
def test_edge_matrices(A):
    for bits in (1, 5, 8):
        assert_bitwise(A, roundtrip(A, bits)[1])
    data, indices, indptr = csr_from_dense(A)
    assert np.array_equal(scipy.sparse.csr_matrix((data, indices, indptr), shape=A.shape).toarray(), A)


def test_as_matrix_is_the_gemm_operand():
    W = np.arange(2 * 3 * 3 * 4, dtype=np.float32).reshape(2, 3, 3, 4)
    assert as_matrix(W).shape == (2, 36) and np.array_equal(as_matrix(W)[1], W[1].ravel())


@given(st.integers(1, 8), st.integers(0, 50), st.integers(0, 2**32 - 1))
def test_pack_bits_roundtrip(bits, n, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, n).astype(np.uint8)
    packed = pack_bits(codes, bits)
    assert len(packed) == -(-n * bits // 8)
    assert np.array_equal(unpack_bits(packed, bits, n), codes)


def test_pack_bits_layout_is_lsb_first():
    assert list(pack_bits([1, 2, 31], 5)) == [0b01000001, 0b01111100]  # 00001 | 00010 | 11111, LSB first
    M = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 1]], np.float32)  # a mask, one bit per entry
    assert np.array_equal(pack_bits(M, 1), np.packbits(M.ravel().astype(np.uint8), bitorder="little"))


@pytest.mark.parametrize("mutate, needle", [
    (lambda c, v: (c[:-1], v), "non-filler codes"),
    (lambda c, v: (c, v[:-1]), "non-filler codes"),
    (lambda c, v: (np.where(c == 31, 31, 30).astype(np.uint8), v), "past the"),
    (lambda c, v: (c + 40, v), "does not fit"),
])
def test_relative_decode_rejects(mutate, needle):
    A = np.zeros((4, 50), np.float32)
    A[:, ::7] = 1.0
    codes, values = relative_encode(A, 5)
    with pytest.raises(ValueError, match=needle):
        relative_decode(*mutate(codes, values), A.shape, 5)


@pytest.mark.parametrize("packed, count, needle", [(b"\x01\x02", 1, "bytes of codes"), (b"\xe0", 1, "padding")])
def test_unpack_bits_rejects(packed, count, needle):
    with pytest.raises(ValueError, match=needle):
        unpack_bits(np.frombuffer(packed, np.uint8), 5, count)


@pytest.mark.parametrize("data, indices, indptr, needle", [
    ([1.0], [0], [0, 1], "indptr has length"),
    ([1.0], [0, 1], [0, 1, 1], "indices has length"),
    ([1.0], [0], [1, 1, 1], "must run from 0"),
    ([1.0, 2.0], [0, 1], [0, 2, 1], "must run from 0"),
    ([1.0, 2.0], [0, 1], [0, 0, 2], None),
    ([1.0], [3], [0, 1, 1], "out of range"),
    ([1.0, 2.0], [1, 0], [0, 2, 2], "strictly increasing"),
])
def test_check_csr(data, indices, indptr, needle):
    args = (np.array(data, np.float32), np.array(indices), np.array(indptr), (2, 3))
    if needle is None:
        check_csr(*args)
        return
    with pytest.raises(ValueError, match=needle):
        check_csr(*args)
