"""Canonical Huffman coding of uint8 symbol streams, as in Deep Compression (NumPy only).

Symbols are integers ``0 … len(lengths)−1`` (at most 256): codebook indices or relative-index codes.
A code is described by its *lengths* alone, uint8, one per symbol, 0 for a symbol without a code, each
``≤ MAX_LEN = 16``, with Kraft sum ``Σ 2**−l ≤ 1`` over the non-zero lengths (the code may be incomplete).

Canonical codes (the DEFLATE rule): sort the symbols with ``l > 0`` by (length, symbol); the first gets
code 0 and each next one ``(previous + 1) << (its length − previous length)``. Equivalently the code of
the i-th sorted symbol is ``Σ_{j<i} 2**(l_i − l_j)``: the Kraft partial sum read in ``l_i`` bits.

Stream: the codes of the symbols in order, each written most significant bit first; stream bit ``i`` is
bit ``7 − i % 8`` of byte ``i // 8`` (``numpy.packbits(bitorder="big")``: the first bit is the byte's
top bit). The last byte is padded with 0 bits (at most 7); the symbol count is stored elsewhere.
``encode`` returns the bytes and ``n_bits = Σ lengths[symbols]``; there are ``⌈n_bits / 8⌉`` bytes.

Decoding: at bit position ``p`` (first 0) read the ``L = max(lengths)`` bits ``p … p+L−1`` as an integer
``w`` (bits past the last byte read as 0); the symbol is the one whose canonical code ``c`` of length
``l`` has ``c << (L − l) ≤ w < (c + 1) << (L − l)`` (none: invalid); emit it, ``p += l``; repeat
``n_symbols`` times; then the bits left (``8·len(packed) − p``) must number at most 7 and all be 0.
The count is part of the container, not of the stream: zero padding that could itself hold codes (an
all-zero code of ≤ 7 bits) also decodes as that many more symbols.

:func:`code_lengths` is length-limited by package-merge (Larmore & Hirschberg's coin collector), which is
optimal among codes with lengths ``≤ max_len``: a Huffman code's total whenever none would be longer.
"""
import numpy

MAX_LEN = 16


def _per_symbol(a, what):
    """``a`` as a 1-D array of at most 256 non-negative integers (an empty list too), else ValueError."""
    a = numpy.asarray(a)
    a = a.astype(numpy.int64) if a.size == 0 and a.dtype == numpy.float64 else a
    if a.ndim != 1 or len(a) > 256 or not numpy.issubdtype(a.dtype, numpy.integer) or (len(a) and a.min() < 0):
        raise ValueError(f"{what} must be a 1-D array of at most 256 integers ≥ 0, got {a.dtype} {a.shape}")
    return a


def code_lengths(counts, max_len=MAX_LEN):
    """Optimal code lengths (uint8, one per count, 0 for count 0) with no length above ``max_len``.

    One used symbol gets length 1, none gives all zeros. Package-merge, items ordered by (weight, leaves
    before packages, symbol): the same counts always give the same lengths.
    """
    counts = _per_symbol(counts, "counts")
    used = numpy.flatnonzero(counts)
    lengths = numpy.zeros(len(counts), dtype=numpy.uint8)
    if not 1 <= max_len <= MAX_LEN or len(used) > 2**max_len:
        raise ValueError(f"max_len must be in 1..{MAX_LEN} and leave room for {len(used)} codes, got {max_len}")
    if len(used) <= 1:
        lengths[used] = 1
        return lengths
    order = used[numpy.lexsort((used, counts[used]))]
    leaf_w, leaf_m = counts[order].astype(numpy.int64), numpy.eye(len(order), dtype=numpy.int32)
    w, m = leaf_w, leaf_m  # items: weights and how many times each leaf is in them
    for _ in range(max_len - 1):
        k = len(w) // 2 * 2  # pair neighbours into packages, the odd last one dropped
        w = numpy.concatenate([leaf_w, w[0:k:2] + w[1:k:2]])
        m = numpy.concatenate([leaf_m, m[0:k:2] + m[1:k:2]])
        o = numpy.argsort(w, kind="stable")
        w, m = w[o], m[o]
    lengths[order] = m[:2 * len(order) - 2].sum(axis=0)
    return lengths


def _check_lengths(lengths):
    """``lengths`` as uint8 after checking shape, range and the Kraft inequality (ValueError)."""
    lengths = _per_symbol(lengths, "lengths")
    if lengths.max(initial=0) > MAX_LEN:
        raise ValueError(f"code lengths must be in 0..{MAX_LEN}")
    lengths = lengths.astype(numpy.uint8)
    l = lengths[lengths > 0].astype(numpy.int64)
    if (1 << (MAX_LEN - l)).sum() > 1 << MAX_LEN:
        raise ValueError("code lengths violate the Kraft inequality (no prefix code has them)")
    return lengths


def _sorted_codes(lengths):
    """The coded symbols sorted by (length, symbol), their lengths and canonical codes (as int64)."""
    used = numpy.flatnonzero(lengths)
    order = used[numpy.lexsort((used, lengths[used]))]
    l = lengths[order].astype(numpy.int64)
    kraft = numpy.cumsum(1 << (MAX_LEN - l)) - (1 << (MAX_LEN - l))  # exclusive partial sums, in 2**-16
    return order, l, kraft >> (MAX_LEN - l)


def canonical_codes(lengths):
    """The canonical code of each symbol (uint32, 0 where the length is 0; layout: module doc)."""
    lengths = _check_lengths(lengths)
    codes = numpy.zeros(len(lengths), dtype=numpy.uint32)
    order, _, c = _sorted_codes(lengths)
    codes[order] = c
    return codes


def encoded_bits(counts, lengths):
    """``Σ counts·lengths``: the stream's bit count (ValueError if a counted symbol has no code)."""
    counts, lengths = numpy.asarray(counts, dtype=numpy.int64), numpy.asarray(lengths, dtype=numpy.int64)
    if numpy.any((counts > 0) & (lengths == 0)):
        raise ValueError("a symbol with a non-zero count has no code (length 0)")
    return int(counts @ lengths)


def encode(symbols, lengths):
    """The packed stream of ``symbols`` under ``lengths``: ``(packed uint8, n_bits)`` (layout: module doc)."""
    lengths = _check_lengths(lengths)
    symbols = numpy.asarray(symbols).ravel()
    symbols = symbols.astype(numpy.int64) if symbols.size == 0 else symbols
    if len(symbols) and (not numpy.issubdtype(symbols.dtype, numpy.integer)
                         or symbols.min() < 0 or symbols.max() >= len(lengths)):
        raise ValueError(f"symbols must be integers in 0..{len(lengths) - 1}")
    if numpy.any(lengths[symbols] == 0):
        raise ValueError(f"symbol {symbols[lengths[symbols] == 0][0]} has no code (length 0)")
    L = max(int(lengths.max(initial=0)), 1)
    codes, shift = canonical_codes(lengths), lengths[:, None].astype(numpy.int64) - 1 - numpy.arange(L)
    bits = ((codes[:, None] >> numpy.maximum(shift, 0)) & 1).astype(numpy.uint8)  # (symbol, bit): MSB first
    stream = bits[symbols][(shift >= 0)[symbols]]  # each row cut to its length, rows concatenated
    return numpy.packbits(stream, bitorder="big"), len(stream)


def _next_positions(packed, lengths):
    """``(win, tsym, tlen, nxt)``: for every stream bit ``p`` the L-bit window ``win[p]`` starting there,
    the symbol ``tsym[w]`` and length ``tlen[w]`` of the code a window ``w`` starts with (``N + 1``: none,
    ``N = 8·len(packed)``), and where the next code starts, ``nxt[p]`` (``N + 1``: no code, or it runs past
    the end). ``nxt`` has ``N + 2`` entries: ``nxt[N] = nxt[N + 1] = N + 1``, so a failed walk stays failed.
    """
    order, l, _ = _sorted_codes(lengths)
    N, L = 8 * len(packed), int(l[-1])
    idx = numpy.int32 if 2 * N + 2 < 2**31 else numpy.int64
    width = 1 << (L - l)  # the L-bit windows a code prefixes: contiguous ranges from 0, in sorted order
    tsym, tlen = numpy.zeros(1 << L, dtype=numpy.uint8), numpy.full(1 << L, N + 1, dtype=idx)
    tsym[:width.sum()], tlen[:width.sum()] = numpy.repeat(order, width), numpy.repeat(l, width)
    b = numpy.zeros(len(packed) + 3, dtype=numpy.uint32)
    b[:len(packed)] = packed
    word = (b[:-3] << 24) | (b[1:-2] << 16) | (b[2:-1] << 8) | b[3:]  # 32 bits from each byte on
    win = ((word[:, None] << numpy.arange(8, dtype=numpy.uint32)) >> numpy.uint32(32 - L)).ravel()
    nxt = numpy.full(N + 2, N + 1, dtype=idx)
    numpy.take(tlen, win, out=nxt[:N])  # in place: these arrays are the stream's size, 4-8 bytes a bit
    nxt[:N] += numpy.arange(N, dtype=idx)
    numpy.minimum(nxt, N + 1, out=nxt)
    return win, tsym, tlen, nxt


def _walk(nxt, n):
    """The first ``n`` positions of the walk ``0, nxt[0], nxt[nxt[0]], …`` (int array).

    ``nxt`` composed 32 times (5 squarings) is followed in Python to every 32nd position; the 31
    between are then filled in vectorised, so the Python loop runs ``n / 32`` times.
    """
    jump = nxt
    for _ in range(5):
        jump = jump[jump]
    hop, heads, p = memoryview(jump), [0] * -(-n // 32), 0
    for i in range(len(heads)):
        heads[i], p = p, hop[p]
    grid = numpy.empty((32, len(heads)), dtype=nxt.dtype)
    grid[0] = heads
    for k in range(1, 32):
        grid[k] = nxt[grid[k - 1]]
    return grid.T.ravel()[:n]


def decode(packed, n_symbols, lengths):
    """Inverse of :func:`encode`: ``n_symbols`` symbols as uint8.

    ValueError when ``packed`` is not 1-D uint8, a position holds no code, the stream ends early, or the
    padding after the last symbol is more than 7 bits or not zero. ``n_symbols > 8·len(packed)`` is
    refused at once: the work is bounded by the stream's length, whatever the count.
    """
    lengths, packed = _check_lengths(lengths), numpy.asarray(packed)
    if packed.dtype != numpy.uint8 or packed.ndim != 1:
        raise ValueError(f"packed must be a 1-D uint8 array, got {packed.dtype} {packed.shape}")
    N, n = 8 * len(packed), int(n_symbols)
    if n != n_symbols or n < 0 or n > N or (n and not lengths.any()):
        raise ValueError(f"{len(packed)} bytes cannot hold {n_symbols} symbols with {(lengths > 0).sum()} codes")
    if n == 0:
        symbols, end = numpy.zeros(0, dtype=numpy.uint8), 0
    else:
        win, tsym, tlen, nxt = _next_positions(packed, lengths)
        starts = _walk(nxt, n)
        end = int(nxt[starts[-1]])
        if end > N:
            i = int(numpy.argmax(nxt[starts] > N))
            at = int(starts[i])
            raise ValueError(f"no valid code at bit {at} (symbol {i})" if at < N and tlen[win[at]] > N else
                             f"the stream ends inside or before symbol {i} of {n}")
        symbols = tsym[win[starts]]
    if N - end > 7:
        raise ValueError(f"{N - end} bits after the last symbol: more than 7 bits of padding (trailing bytes?)")
    if numpy.unpackbits(packed[end // 8:])[end % 8:].any():
        raise ValueError("padding bits after the last symbol are not all zero")
    return symbols
