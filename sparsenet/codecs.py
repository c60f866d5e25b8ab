"""The encodings of a pruned weight: CSR, relative indices, bit packing (NumPy only).

The paper ("Storage") stores a pruned layer sparse, with *relative* indices of 5 bits (FC) or 8 bits (conv);
:mod:`sparsenet.modelfile` puts these arrays in files, :mod:`sparsenet.inference` multiplies with the CSR.
A weight is encoded as the matrix its layer multiplies with (:func:`as_matrix`): ``rows = W.shape[0]``,
``cols = prod(W.shape[1:])`` in C order (a Conv2d's (F, kh, kw, C) becomes the im2col operand (F, kh·kw·C)).
The encoders store the positions of an optional ``mask`` (0/1 or boolean, of the matrix's shape), with
their values *even when a value is exactly 0.0*; without a mask, the non-zeros (−0.0 counts as zero).

CSR: ``data`` float32 (nnz,), the stored values row by row, columns ascending; ``indices`` int32 (nnz,),
their columns; ``indptr`` int32 (rows+1,): row ``r`` is ``data[indptr[r]:indptr[r+1]]`` (as scipy's).

Relative indices run over the *flattened* matrix, as in the paper (no indptr: position ``p`` is row
``p // cols``, column ``p % cols``). With ``F = 2**bits − 1``::

    cursor = −1
    for c in codes:
        if c == F:  cursor += F                       # filler: skips F positions, no value
        else:       cursor += c + 1; W.flat[cursor] = next value

A gap of ``s`` positions thus costs ``s // F`` fillers. The paper stores a filler as a zero *value*; with
float32 values (no codebook) that would cost 32 + bits bits, so the top code is reserved: ``bits`` bits.

Bit packing: code ``k`` fills stream bits ``k·bits … k·bits+bits−1`` least significant bit first; stream
bit ``i`` is bit ``i % 8`` of byte ``i // 8`` (``numpy.packbits(bitorder="little")``), padding bits 0.
With ``bits = 1`` this packs a 0/1 mask, one bit per entry.
"""
import numpy

BITS = {"linear": 5, "conv2d": 8}  # relative-index width per layer kind (the paper: FC 5 bits, conv 8)


def as_matrix(W):
    """The (rows, cols) matrix view of a weight: ``W.reshape(W.shape[0], −1)``."""
    return W.reshape(W.shape[0], -1)


def _positions(A, mask):
    """``A`` as float32 and the boolean array of the positions to store (``mask``, or A ≠ 0)."""
    A = numpy.asarray(A, dtype=numpy.float32)
    mask = A if mask is None else numpy.asarray(mask)
    if mask.shape != A.shape:
        raise ValueError(f"mask of shape {mask.shape} for an array of shape {A.shape}")
    return A, mask != 0


def csr_from_dense(A, mask=None):
    """CSR arrays of a 2-D array's stored positions: ``mask``'s ones, or its non-zeros.

    Returns ``(data float32 (nnz,), indices int32 (nnz,), indptr int32 (rows+1,))``, columns ascending.
    """
    A, keep = _positions(A, mask)
    rows, cols = numpy.nonzero(keep)
    indptr = numpy.zeros(A.shape[0] + 1, dtype=numpy.int32)
    numpy.cumsum(numpy.bincount(rows, minlength=A.shape[0]), out=indptr[1:])
    return A[rows, cols], cols.astype(numpy.int32), indptr


def csr_to_dense(data, indices, indptr, shape):
    """Inverse of :func:`csr_from_dense` (after :func:`check_csr`): float32 (rows, cols), 0 where not stored."""
    A = numpy.zeros(shape, dtype=numpy.float32)
    rows = numpy.repeat(numpy.arange(shape[0]), numpy.diff(indptr))
    A[rows, indices] = data
    return A


def check_csr(data, indices, indptr, shape):
    """Raise ValueError unless the arrays form a canonical CSR matrix of ``shape``.

    Canonical: ``len(indptr) = rows + 1``, ``indptr[0] = 0``, ``indptr[-1] = nnz = len(data) = len(indices)``,
    indptr non-decreasing, columns in ``[0, cols)`` and strictly increasing within a row (no duplicates).
    """
    rows, cols = shape
    if len(indptr) != rows + 1:
        raise ValueError(f"indptr has length {len(indptr)}, expected rows + 1 = {rows + 1}")
    if len(indices) != len(data):
        raise ValueError(f"indices has length {len(indices)} but data has {len(data)}")
    if indptr[0] != 0 or indptr[-1] != len(data):
        raise ValueError(f"indptr must run from 0 to nnz = {len(data)}, runs from {indptr[0]} to {indptr[-1]}")
    if numpy.any(numpy.diff(indptr) < 0):
        raise ValueError("indptr is not monotone")
    if len(indices) and (indices.min() < 0 or indices.max() >= cols):
        raise ValueError(f"column index out of range [0, {cols})")
    flat = numpy.repeat(numpy.arange(rows, dtype=numpy.int64), numpy.diff(indptr)) * cols + indices
    if numpy.any(numpy.diff(flat) <= 0):
        raise ValueError("columns are not strictly increasing within a row (unsorted or duplicate)")


def pack_bits(codes, bits):
    """Pack integers ``0 ≤ codes < 2**bits`` (bits ≤ 8) into ``⌈len·bits/8⌉`` bytes (layout: module doc)."""
    codes = numpy.asarray(codes, dtype=numpy.uint8).ravel()
    stream = (codes[:, None] >> numpy.arange(bits, dtype=numpy.uint8)) & 1
    return numpy.packbits(stream.ravel(), bitorder="little")


def unpack_bits(packed, bits, count):
    """Inverse of :func:`pack_bits`: ``count`` codes of ``bits`` bits as uint8.

    Raises ValueError when the byte count is not ``⌈count·bits/8⌉`` or a padding bit is set.
    """
    if len(packed) != -(-count * bits // 8):
        raise ValueError(f"{len(packed)} bytes of codes, expected ceil({count} codes x {bits} bits / 8)")
    stream = numpy.unpackbits(numpy.asarray(packed, dtype=numpy.uint8), bitorder="little")
    if stream[count * bits:].any():
        raise ValueError("padding bits after the last code are not zero")
    weights = (1 << numpy.arange(bits)).astype(numpy.uint8)
    return (stream[:count * bits].reshape(count, bits) * weights).sum(axis=1, dtype=numpy.uint8)


def relative_encode(A, bits, mask=None):
    """Relative-index encoding of ``A``'s stored positions (``mask``'s ones, or its non-zeros), flattened.

    Returns ``(codes, values)``: ``codes`` uint8 (n_codes,), not yet packed, each ``< 2**bits``; ``values``
    float32 (nnz,). An entry preceded by ``s`` unstored positions (since the previous entry, or the start) is
    ``s // F`` filler codes ``F = 2**bits − 1`` followed by the code ``s % F`` (layout: module doc).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    A, keep = _positions(A, mask)
    pos = numpy.flatnonzero(keep)
    F = (1 << bits) - 1
    gaps = numpy.diff(pos, prepend=-1) - 1
    ends = numpy.cumsum(gaps // F + 1) - 1  # index of each real code in the stream
    codes = numpy.full(int(ends[-1]) + 1 if len(ends) else 0, F, dtype=numpy.uint8)
    codes[ends] = gaps % F
    return codes, A.ravel()[pos]


def relative_decode(codes, values, shape, bits):
    """Inverse of :func:`relative_encode`: CSR ``(data, indices, indptr)`` of a ``shape`` matrix.

    Raises ValueError when a code is out of range, the number of non-filler codes is not ``len(values)``,
    or a position falls past the end of the matrix.
    """
    (rows, cols), F = shape, (1 << bits) - 1
    codes = numpy.asarray(codes)
    if len(codes) and codes.max() > F:
        raise ValueError(f"code {codes.max()} does not fit in {bits} bits")
    real = codes != F
    if int(real.sum()) != len(values):
        raise ValueError(f"{int(real.sum())} non-filler codes but {len(values)} values")
    pos = numpy.cumsum(codes.astype(numpy.int64) + real) - 1  # step c + 1, or F for a filler
    if len(pos) and pos[-1] >= rows * cols:
        raise ValueError(f"relative indices run to position {pos[-1]}, past the {rows}x{cols} matrix")
    pos = pos[real]
    indptr = numpy.zeros(rows + 1, dtype=numpy.int32)
    numpy.cumsum(numpy.bincount(pos // cols, minlength=rows), out=indptr[1:])
    return numpy.asarray(values), (pos % cols).astype(numpy.int32), indptr
