"""Canonical Huffman coding of uint8 symbol streams (sparsenet.huffman)."""
import heapq
import itertools
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparsenet.huffman import MAX_LEN, canonical_codes, code_lengths, decode, encode, encoded_bits


def reference_lengths(counts):
    """Textbook Huffman with heapq (no length limit): each merge deepens every symbol under it."""
    heap = [(int(c), s, [s]) for s, c in enumerate(counts) if c > 0]
    lengths = np.zeros(len(counts), np.int64)
    if len(heap) == 1:
        lengths[heap[0][1]] = 1
    heapq.heapify(heap)
    while len(heap) > 1:
        (w1, t1, s1), (w2, t2, s2) = heapq.heappop(heap), heapq.heappop(heap)
        lengths[s1 + s2] += 1
        heapq.heappush(heap, (w1 + w2, min(t1, t2), s1 + s2))
    return lengths


def kraft(lengths):
    return sum(2.0 ** -int(l) for l in lengths if l > 0)


def as_bits(code, length):
    return format(int(code), f"0{int(length)}b")


def roundtrip(symbols, lengths):
    packed, n_bits = encode(symbols, lengths)
    assert packed.dtype == np.uint8 and len(packed) == -(-n_bits // 8)
    assert n_bits == encoded_bits(np.bincount(np.asarray(symbols, np.int64), minlength=len(lengths)), lengths)
    out = decode(packed, len(symbols), lengths)
    assert out.dtype == np.uint8 and np.array_equal(out, symbols)
    return packed, n_bits


@st.composite
def streams(draw):
    """Symbol streams over 1..256 symbols, from uniform to very skewed (geometric or Zipf-like)."""
    k, n = draw(st.integers(1, 256)), draw(st.integers(0, 5000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rank = np.arange(k, dtype=np.float64)
    p = draw(st.sampled_from([np.ones(k), 0.5 ** rank, 0.9 ** rank, (rank + 1) ** -2.0]))
    symbols = rng.permutation(k)[rng.choice(k, n, p=p / p.sum())]  # the common symbols anywhere in 0..k-1
    return symbols.astype(np.uint8), k


@given(streams(), st.sampled_from([MAX_LEN, 12, 9]))
def test_roundtrip(stream, max_len):
    symbols, k = stream
    lengths = code_lengths(np.bincount(symbols, minlength=k), max_len)
    assert len(lengths) == k and lengths.max(initial=0) <= max_len
    roundtrip(symbols, lengths)


@pytest.mark.parametrize("symbols, k", [([], 1), ([], 256), ([7], 8), ([255], 256), ([3] * 1000, 4), ([0] * 8, 1),
                                        ([0, 255], 256), ([1, 0] * 9, 2)],
                         ids=["empty", "empty of 256", "once", "255 once", "repeated", "repeated, one byte",
                              "two", "alternating"])
def test_edge_streams(symbols, k):
    symbols = np.array(symbols, np.uint8)
    lengths = code_lengths(np.bincount(symbols, minlength=k))
    packed, n_bits = roundtrip(symbols, lengths)
    assert n_bits == len(symbols)  # one or two symbols: one bit each


def test_empty_stream_is_empty():
    out = decode(np.zeros(0, np.uint8), 0, np.zeros(5, np.uint8))
    assert out.dtype == np.uint8 and out.shape == (0,)
    assert encode([], [0, 0])[1] == 0 and len(encode([], [0, 0])[0]) == 0


def test_layout_is_canonical_msb_first_big_endian():
    lengths = [2, 1, 3, 3]  # sorted by (length, symbol): 1 → 0, 0 → 10, 2 → 110, 3 → 111
    assert canonical_codes(lengths).tolist() == [0b10, 0b0, 0b110, 0b111]
    packed, n_bits = encode([0, 1, 2, 3, 1], lengths)  # 10 0 110 111 0 + 6 zero padding bits
    assert n_bits == 10 and packed.tolist() == [0b10011011, 0b10000000]
    assert decode(packed, 5, lengths).tolist() == [0, 1, 2, 3, 1]


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=256), st.integers(0, 2**32 - 1))
def test_lengths_are_optimal(counts, seed):
    counts = np.array(counts, np.int64)
    counts[np.random.default_rng(seed).random(len(counts)) < 0.3] = 0  # unused symbols
    lengths, ref = code_lengths(counts), reference_lengths(counts)
    assert lengths.dtype == np.uint8 and np.array_equal(lengths > 0, counts > 0)
    assert kraft(lengths) <= 1 and lengths.max(initial=0) <= MAX_LEN
    if ref.max(initial=0) <= MAX_LEN:  # the limit does not bind: a Huffman code's total
        assert encoded_bits(counts, lengths) == encoded_bits(counts, ref)
    else:
        assert encoded_bits(counts, lengths) >= encoded_bits(counts, ref)


@given(st.lists(st.integers(1, 1000), min_size=2, max_size=7), st.integers(1, 4))
def test_length_limit_is_optimal(counts, max_len):
    """Against brute force: every non-increasing-in-count assignment of lengths 1..max_len obeying Kraft."""
    max_len = max(max_len, (len(counts) - 1).bit_length())
    w = sorted(counts, reverse=True)
    best = min(sum(a * b for a, b in zip(w, ls))
               for ls in itertools.combinations_with_replacement(range(1, max_len + 1), len(w)) if kraft(ls) <= 1)
    lengths = code_lengths(counts, max_len)
    assert lengths.max() <= max_len and kraft(lengths) <= 1 and encoded_bits(counts, lengths) == best


@pytest.mark.parametrize("max_len", [8, 10, 12, MAX_LEN])
def test_fibonacci_counts_respect_max_len(max_len):
    """Fibonacci counts make Huffman codes as deep as the alphabet; the limit must hold anyway."""
    fib = [1, 1]
    while len(fib) < 80:
        fib.append(fib[-1] + fib[-2])
    for counts in (fib[:20], fib[:40], fib[:80], fib[:60] + [1] * 196):
        counts = np.array(counts, np.int64)
        k = len(counts)
        assert reference_lengths(counts).max() >= 19 > max_len
        lengths = code_lengths(counts, max_len)
        assert lengths.max() <= max_len and kraft(lengths) <= 1 and np.all(lengths > 0)
        symbols = np.repeat(np.arange(k, dtype=np.uint8), 3)
        roundtrip(symbols, lengths)


@given(streams())
def test_canonical_codes_are_prefix_free_and_deflate(stream):
    symbols, k = stream
    lengths = code_lengths(np.bincount(symbols, minlength=k))
    codes = canonical_codes(lengths)
    assert codes.dtype == np.uint32 and len(codes) == k
    # DEFLATE (RFC 1951, 3.2.2): next_code[bits] = (code + bl_count[bits-1]) << 1
    bl_count = np.bincount(lengths, minlength=MAX_LEN + 1)
    bl_count[0], code, next_code = 0, 0, {}
    for bits in range(1, MAX_LEN + 1):
        code = (code + bl_count[bits - 1]) << 1
        next_code[bits] = code
    for s in range(k):
        if lengths[s]:
            assert codes[s] == next_code[lengths[s]]
            next_code[lengths[s]] += 1
    words = sorted(as_bits(codes[s], lengths[s]) for s in range(k) if lengths[s])
    assert all(not b.startswith(a) for a, b in zip(words, words[1:]))  # sorted: a prefix would be adjacent


def test_same_counts_give_same_lengths():
    counts = np.array([5, 5, 5, 3, 3, 0, 8, 8, 1, 1, 1, 1], np.int64)  # many ties
    first = code_lengths(counts)
    for again in (code_lengths(counts.copy()), code_lengths(counts.tolist()), code_lengths(counts.astype(np.uint16))):
        assert np.array_equal(first, again)
    assert np.all(code_lengths(np.ones(256, np.int64)) == 8) and np.all(code_lengths(np.ones(256, np.uint8), 8) == 8)
    assert code_lengths([0, 0, 0]).tolist() == [0, 0, 0] and code_lengths([0, 9, 0]).tolist() == [0, 1, 0]


@pytest.mark.parametrize("counts, max_len", [([1, -1], 16), (np.ones((2, 2), np.int64), 16), ([0.5, 1.0], 16),
                                             (np.ones(257, np.int64), 16), (np.ones(256, np.int64), 7),
                                             ([1, 1, 1], 1), ([1, 2], 0), ([1, 2], 17)])
def test_code_lengths_rejects(counts, max_len):
    with pytest.raises(ValueError):
        code_lengths(counts, max_len)


@pytest.mark.parametrize("lengths", [[1, 1, 1], [1, 2, 2, 2], [0, 17], [-1, 1], [[1, 1]], [1.0, 1.0],
                                     [2] * 5, [8] * 257])
def test_bad_lengths_are_refused_everywhere(lengths):
    for call in (lambda: canonical_codes(lengths), lambda: encode([0], lengths),
                 lambda: decode(np.zeros(1, np.uint8), 1, lengths)):
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize("symbols, needle", [([0, 2], "has no code"), ([0, 4], "integers in"), ([-1], "integers in"),
                                             ([0.0], "integers in")])
def test_encode_rejects(symbols, needle):
    with pytest.raises(ValueError, match=needle):
        encode(symbols, [1, 1, 0, 0])


def test_encoded_bits():
    assert encoded_bits([3, 0, 2], [1, 0, 2]) == 7 and encoded_bits([], []) == 0
    with pytest.raises(ValueError, match="no code"):
        encoded_bits([1, 1], [1, 0])


def fast_value_error(call, needle=None):
    t = time.perf_counter()
    with pytest.raises(ValueError, match=needle):
        call()
    assert time.perf_counter() - t < 2.0


@pytest.fixture(scope="module")
def sample():
    rng = np.random.default_rng(1)
    p = 0.7 ** np.arange(40)
    symbols = rng.choice(40, 3001, p=p / p.sum()).astype(np.uint8)
    lengths = code_lengths(np.bincount(symbols, minlength=40))
    packed, n_bits = encode(symbols, lengths)
    assert n_bits % 8 != 0  # there is padding to corrupt
    return symbols, lengths, packed, n_bits


def test_malformed_streams_are_refused(sample):
    symbols, lengths, packed, n_bits = sample
    n = len(symbols)
    fast_value_error(lambda: decode(packed[:-1], n, lengths), "ends")  # truncated
    fast_value_error(lambda: decode(packed, n + 8, lengths), "ends")  # more symbols than the bits hold
    fast_value_error(lambda: decode(packed, 10**12, lengths), "cannot hold")  # absurd count: no long loop
    fast_value_error(lambda: decode(np.append(packed, np.uint8(0)), n, lengths), "more than 7")  # trailing byte
    dirty = packed.copy()
    dirty[-1] |= 1  # the last padding bit
    fast_value_error(lambda: decode(dirty, n, lengths), "not all zero")
    fast_value_error(lambda: decode(packed.astype(np.int16), n, lengths), "1-D uint8")
    fast_value_error(lambda: decode(packed[None], n, lengths), "1-D uint8")
    fast_value_error(lambda: decode(packed, n, np.zeros(40, np.uint8)), "cannot hold")  # no used symbols
    fast_value_error(lambda: decode(packed, -1, lengths), "cannot hold")
    fast_value_error(lambda: decode(packed, 2.5, lengths), "cannot hold")


def reference_decode(bits, n, lengths):
    """Bit by bit with a dict of code strings and the module doc's rules; None where decode must refuse."""
    codes = canonical_codes(lengths)
    table = {as_bits(codes[s], lengths[s]): s for s in range(len(lengths)) if lengths[s]}
    out, cur, i = [], "", 0
    while len(out) < n:
        if i == len(bits) or len(cur) == MAX_LEN:
            return None
        cur, i = cur + bits[i], i + 1
        if cur in table:
            out.append(table[cur])
            cur = ""
    return out if len(bits) - i <= 7 and "1" not in bits[i:] else None


@pytest.mark.parametrize("complete", [True, False], ids=["complete code", "incomplete code"])
def test_flipped_bits_agree_with_a_reference_decoder(complete):
    """Every flip of a coded bit: decode refuses exactly when the bit-by-bit reference does, else returns
    the same (necessarily different) symbols. A complete code parses any bits, so there only a changed
    count that the padding cannot absorb is caught; an incomplete one also meets invalid codes."""
    rng = np.random.default_rng(3)
    p = 0.7 ** np.arange(40)
    symbols = rng.choice(40, 400, p=p / p.sum()).astype(np.uint8)
    symbols[-1] = 5  # a last code with a 1 bit: one symbol too many in a parse leaves it as bad padding
    lengths = code_lengths(np.bincount(symbols, minlength=40))
    if not complete:
        lengths[lengths > 0] += 1  # half the windows start no code
    assert (kraft(lengths) == 1) == complete
    packed, n_bits = encode(symbols, lengths)
    t, refused = time.perf_counter(), 0
    for i in range(n_bits):
        flipped = np.unpackbits(packed)
        flipped[i] ^= 1
        expected = reference_decode("".join(map(str, flipped)), len(symbols), lengths)
        try:
            out = decode(np.packbits(flipped), len(symbols), lengths).tolist()
        except ValueError:
            out, refused = None, refused + 1
        assert out == expected and out != symbols.tolist()
    assert refused > (0 if complete else n_bits // 2) and time.perf_counter() - t < 10.0


def test_invalid_code_is_refused():
    """An incomplete code leaves windows that start no code: 1 → 0, 0 → 10, 11… is invalid."""
    lengths = [2, 1]
    assert decode(np.array([0b01000000], np.uint8), 3, lengths).tolist() == [1, 0, 1]
    fast_value_error(lambda: decode(np.array([0b01100000], np.uint8), 2, lengths), "no valid code at bit 1")
    big = np.zeros(100_000, np.uint8)  # 800,000 symbols 1, then a bad code at the very end
    big[-1] = 0b00000011
    fast_value_error(lambda: decode(big, 800_000, lengths), "no valid code at bit 799998")


def test_lenet_sized_stream_is_fast():
    rng = np.random.default_rng(2)
    p = 0.8 ** np.arange(64)
    symbols = rng.choice(64, 20_000, p=p / p.sum()).astype(np.uint8)
    lengths = code_lengths(np.bincount(symbols, minlength=64))
    t = time.perf_counter()
    for _ in range(5):
        roundtrip(symbols, lengths)
    assert (time.perf_counter() - t) / 5 < 0.25  # milliseconds in fact; generous for loaded CI machines
