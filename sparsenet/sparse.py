"""Sparse storage and sparse inference: pruning made real on disk and in time.

PAPER.md ("Storage") stores a pruned layer sparse, with *relative* indices of 5 bits
(FC) or 8 bits (conv). This module writes model files in three encodings, reads them
back with full validation, reports what each costs, and runs pruned layers as sparse
matrix products (``scipy.sparse`` on the CPU, ``cupyx.scipy.sparse`` on the GPU).

Weights as matrices
-------------------
Every weight is stored as the 2-D matrix its layer multiplies with: ``rows = W.shape[0]``
(output neuron, or conv filter) and ``cols = prod(W.shape[1:])`` in C order. A Linear
``W`` (out, in) is itself; a Conv2d ``W`` (F, kh, kw, C) becomes (F, kh·kw·C), the
im2col GEMM's operand. The stored pattern is the non-zeros of ``W`` (= ``W ⊙ M``).

Model file (HDF5, no pickle)
----------------------------
::

    /                  attrs: format="sparsenet-model", version=1,
                              encoding="dense" | "csr" | "relative",
                              network (JSON: Network.spec(); all layer shapes come from it)
    /params/<l>.b      float32, dense: biases (every parameter that is not prunable)
    /params/<l>.W      dense:    float32 dataset of the weight's own shape
                       csr:      group, attrs shape=(rows, cols), tensor_shape
                                   data    float32 (nnz,)     non-zeros row by row, columns ascending
                                   indices int32   (nnz,)     their column
                                   indptr  int32   (rows+1,)  row r is data[indptr[r]:indptr[r+1]]
                       relative: not under /params, but in two streams for all pruned weights:
    /values            float32 (Σ nnz,): each pruned weight's non-zeros in row-major order,
                       one weight after the other (network order)
    /codes             uint8: each weight's bit-packed relative indices, ⌈n_codes·bits/8⌉
                       bytes apiece, every weight starting on a byte boundary; attributes
                       bits, n_codes, n_values: int64 arrays, one entry per pruned weight

(Two streams rather than a group of two datasets per weight: HDF5 headers cost ~270
bytes a dataset, and the per-weight layout made LeNet-300-100's file 2.2 KB, 2%, larger.)

Filters (:func:`sparsenet.checkpoint.write_dataset`): every non-empty dataset is one chunk
with a Fletcher-32 checksum; the sparse streams (``values``, ``codes``, CSR
``data``/``indices``/``indptr``) are also stored with HDF5's byte shuffle and deflate
(lossless; h5py decodes them transparently). Dense arrays are not compressed.

The relative stream runs over the *flattened* matrix, as in the paper (no indptr; a
position ``p`` is row ``p // cols``, column ``p % cols``). With ``F = 2**bits − 1``::

    cursor = −1
    for c in codes:
        if c == F:  cursor += F                       # filler zero: skips F zeros, no value
        else:       cursor += c + 1; W.flat[cursor] = next value

so a stored non-zero records how many zeros precede it since the previous entry
(0 … F−1), and a gap of ``s`` zeros costs ``s // F`` fillers. The paper stores a filler
as a zero *value*; with float32 values (no codebook: that is Deep Compression) that
would cost 32 + bits bits, so the top code is reserved for it instead and a filler
costs ``bits`` bits. Bit packing: code ``k`` fills stream bits ``k·bits … k·bits+bits−1``
least significant bit first; stream bit ``i`` is bit ``i % 8`` of byte ``i // 8``
(``numpy.packbits(bitorder="little")``); the padding bits of the last byte are 0.

Index overhead (as the paper's 15.6% = 5 bits per 32-bit value) is the index bits over
the value bits: CSR ``32·(nnz + rows + 1) / 32·nnz``; relative ``bits·n_codes / 32·nnz``
(fillers included).

Sparse inference
----------------
:class:`SparseNetwork` wraps a :class:`~sparsenet.model.Network` for inference and runs
each Linear/Conv2d either dense (``X W₂ᵀ``, BLAS) or sparse (``(W_csr Xᵀ)ᵀ``; one SpMV
``W_csr x`` for a single row), chosen per layer and call by :func:`prefer_sparse`.
"""
import json
import math
import os
import tempfile
from pathlib import Path

import h5py
import numpy

from . import layers as L
from .backend import asnumpy, get_array_module, sparse_module, to_device
from .checkpoint import FORMAT as CHECKPOINT_FORMAT
from .checkpoint import load_checkpoint, open_hdf5, text_attr, write_dataset
from .model import build_network
from .util import SparsenetError, atomic_path

FORMAT, VERSION = "sparsenet-model", 1
ENCODINGS = ("dense", "csr", "relative")
BITS = {"linear": 5, "conv2d": 8}  # relative-index width per layer kind (PAPER.md)


# ----------------------------------------------------------------------------- encodings
def as_matrix(W):
    """The (rows, cols) matrix view of a weight: ``W.reshape(W.shape[0], −1)``."""
    return W.reshape(W.shape[0], -1)


def csr_from_dense(A):
    """CSR arrays of the non-zeros of a 2-D array (−0.0 counts as zero).

    Returns ``(data float32 (nnz,), indices int32 (nnz,), indptr int32 (rows+1,))``
    with the columns of each row ascending, as ``scipy.sparse.csr_matrix`` expects.
    """
    A = numpy.asarray(A, dtype=numpy.float32)
    rows, cols = numpy.nonzero(A)
    indptr = numpy.zeros(A.shape[0] + 1, dtype=numpy.int32)
    numpy.cumsum(numpy.bincount(rows, minlength=A.shape[0]), out=indptr[1:])
    return A[rows, cols], cols.astype(numpy.int32), indptr


def csr_to_dense(data, indices, indptr, shape):
    """Inverse of :func:`csr_from_dense` (after :func:`check_csr`): a float32 (rows, cols) array."""
    A = numpy.zeros(shape, dtype=numpy.float32)
    rows = numpy.repeat(numpy.arange(shape[0]), numpy.diff(indptr))
    A[rows, indices] = data
    return A


def check_csr(data, indices, indptr, shape):
    """Raise ValueError unless the arrays form a canonical CSR matrix of ``shape``.

    Canonical: ``len(indptr) = rows + 1``, ``indptr[0] = 0``, ``indptr[-1] = nnz =
    len(data) = len(indices)``, indptr non-decreasing, columns in ``[0, cols)`` and
    strictly increasing within a row (a duplicate would be summed, silently).
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
    codes = numpy.asarray(codes, dtype=numpy.uint8)
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


def relative_encode(A, bits):
    """Relative-index encoding of the non-zeros of ``A`` over its flattened positions.

    Returns ``(codes, values)``: ``codes`` uint8 (n_codes,), not yet packed, each
    ``< 2**bits``; ``values`` float32 (nnz,). A non-zero preceded by ``s`` zeros (since
    the previous non-zero, or the start) is ``s // F`` filler codes ``F = 2**bits − 1``
    followed by the code ``s % F`` (layout: module doc).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = numpy.asarray(A, dtype=numpy.float32).ravel()
    pos = numpy.flatnonzero(flat)
    F = (1 << bits) - 1
    gaps = numpy.diff(pos, prepend=-1) - 1
    fill = gaps // F
    ends = numpy.cumsum(fill + 1) - 1  # index of each real code in the stream
    codes = numpy.full(int(ends[-1]) + 1 if len(ends) else 0, F, dtype=numpy.uint8)
    codes[ends] = gaps % F
    return codes, flat[pos]


def relative_decode(codes, values, shape, bits):
    """Inverse of :func:`relative_encode`: CSR ``(data, indices, indptr)`` of a ``shape`` matrix.

    Raises ValueError when a code is out of range, the number of non-filler codes is not
    ``len(values)``, or a position falls past the end of the matrix.
    """
    rows, cols = shape
    F = (1 << bits) - 1
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
    r = pos // cols
    indptr = numpy.zeros(rows + 1, dtype=numpy.int32)
    numpy.cumsum(numpy.bincount(r, minlength=rows), out=indptr[1:])
    return numpy.asarray(values), (pos % cols).astype(numpy.int32), indptr


# ----------------------------------------------------------------------------- storage
def _weights(net):
    """``(name, layer kind, Param)`` for every parameter, in network order."""
    return [(f"{l.name}.{k}", l.kind, p) for l in net.layers for k, p in l.params.items()]


def _param_cost(p, kind):
    """Bytes and index bits of one parameter in each encoding (a prunable one stored sparse)."""
    W = asnumpy(p.data)
    c = {"params": W.size, "dense_bytes": 4 * W.size, "csr_bytes": 4 * W.size, "relative_bytes": 4 * W.size,
         "weights": 0, "nonzero": 0, "fillers": 0, "csr_index_bits": 0, "relative_index_bits": 0}
    if p.prunable:
        A = as_matrix(W)
        nnz, bits = int(numpy.count_nonzero(A)), BITS[kind]
        n_codes = len(relative_encode(A, bits)[0])
        c.update(weights=A.size, nonzero=nnz, fillers=n_codes - nnz,
                 csr_bytes=4 * (2 * nnz + A.shape[0] + 1), relative_bytes=4 * nnz + -(-bits * n_codes // 8),
                 csr_index_bits=32 * (nnz + A.shape[0] + 1), relative_index_bits=bits * n_codes)
    return c


def storage_report(net):
    """Bytes of the parameters in each encoding, per layer and in total (payload, no HDF5 overhead).

    Returns ``{"layers": [row, ...], "total": row}``. A row: ``params``, ``weights``
    (prunable entries), ``nonzero`` (surviving weights), ``density``, ``fillers``,
    ``dense_bytes``, ``csr_bytes``, ``relative_bytes`` (biases dense in all three),
    ``csr_overhead_pct`` / ``relative_overhead_pct`` (index bits over the bits of the
    non-zero weight values) and the compression ratios ``ratio_csr``, ``ratio_relative``
    (dense bytes over that encoding's bytes).
    """
    rows = []
    for l in net.layers:
        costs = [_param_cost(p, l.kind) for p in l.params.values()]
        if costs:
            rows.append({"layer": l.name, **{k: sum(c[k] for c in costs) for k in costs[0]}})
    total = {"layer": "total", **{k: sum(r[k] for r in rows) for k in rows[0] if k != "layer"}}
    for r in rows + [total]:
        r["density"] = r["nonzero"] / r["weights"] if r["weights"] else 1.0
        for enc in ("csr", "relative"):
            bits = r.pop(f"{enc}_index_bits")
            r[f"{enc}_overhead_pct"] = 100.0 * bits / (32 * r["nonzero"]) if r["nonzero"] else 0.0
            r[f"ratio_{enc}"] = r["dense_bytes"] / r[f"{enc}_bytes"]
    return {"layers": rows, "total": total}


def export_model(net, path, encoding="relative"):
    """Write ``net``'s parameters to ``path`` (HDF5, atomically) in one of :data:`ENCODINGS`.

    Layout and filters: module docstring. Files use the HDF5 1.10 object format and no
    free-space manager, so a file is its (compressed) payload plus a few hundred bytes per
    HDF5 object.
    """
    if encoding not in ENCODINGS:
        raise SparsenetError(f"unknown format {encoding!r}: choose from {', '.join(ENCODINGS)}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w", libver=("v110", "latest"), fs_strategy="none") as f:
        # fixed-length strings: a variable-length one costs a 4 KiB global heap
        f.attrs["format"] = numpy.bytes_(FORMAT)
        f.attrs["version"] = VERSION
        f.attrs["encoding"] = numpy.bytes_(encoding)
        f.attrs["network"] = numpy.bytes_(json.dumps(net.spec(), separators=(",", ":")))
        params, streams = f.create_group("params"), []
        for name, kind, p in _weights(net):
            W = asnumpy(p.data).astype(numpy.float32)
            if encoding == "dense" or not p.prunable:
                write_dataset(params, name, W)
            elif encoding == "csr":
                g = params.create_group(name)
                g.attrs["shape"] = as_matrix(W).shape
                g.attrs["tensor_shape"] = W.shape
                for key, a in zip(("data", "indices", "indptr"), csr_from_dense(as_matrix(W)), strict=True):
                    write_dataset(g, key, a, compress=True)
            else:
                streams.append((BITS[kind], *relative_encode(as_matrix(W), BITS[kind])))
        if encoding == "relative":
            write_dataset(f, "values", numpy.concatenate([v for *_, v in streams] + [_EMPTY]), compress=True)
            d = write_dataset(f, "codes", numpy.concatenate([pack_bits(c, b) for b, c, _ in streams]
                                                            + [_EMPTY.view(numpy.uint8)]), compress=True)
            for key, column in (("bits", [b for b, _, _ in streams]), ("n_codes", [len(c) for _, c, _ in streams]),
                                ("n_values", [len(v) for *_, v in streams])):
                d.attrs[key] = numpy.array(column, dtype=numpy.int64)


_EMPTY = numpy.zeros(0, dtype=numpy.float32)


def _member(g, key, cls):
    """``g[key]`` if it exists and is a ``cls`` (h5py.Dataset or h5py.Group)."""
    obj = g.get(key)
    if isinstance(obj, cls):
        return obj
    raise ValueError(f"{'dataset' if cls is h5py.Dataset else 'group'} {key!r} is missing")


def _dataset(g, key, kinds, shape=None):
    """``g[key]`` as a NumPy array after checking that it exists, its dtype kind and shape
    (``shape=None``: any 1-D array)."""
    d = _member(g, key, h5py.Dataset)
    if d.dtype.kind not in kinds:
        raise ValueError(f"{key!r} has dtype {d.dtype}, expected {'integers' if 'f' not in kinds else 'float32'}")
    if (d.ndim != 1) if shape is None else (d.shape != tuple(shape)):
        raise ValueError(f"{key!r} has shape {d.shape}, expected {tuple(shape) if shape else '1-D'}")
    return d[()]


def _relative_streams(f, n):
    """The ``n`` per-parameter ``(bits, n_codes, packed codes, values)`` of a relative file."""
    d = _member(f, "codes", h5py.Dataset)
    table = [numpy.atleast_1d(d.attrs.get(key, [])).astype(numpy.int64) for key in ("bits", "n_codes", "n_values")]
    if any(t.shape != (n,) for t in table):
        raise ValueError(f"attributes bits, n_codes, n_values of 'codes' must list {n} pruned parameters")
    bits, n_codes, n_values = table
    if (bits < 1).any() or (bits > 8).any() or (n_codes < 0).any() or (n_values < 0).any():
        raise ValueError("attributes of 'codes' out of range (bits 1..8, counts >= 0)")
    codes, values = _dataset(f, "codes", "u"), _dataset(f, "values", "f")
    nbytes = -(-n_codes * bits // 8)
    if len(codes) != nbytes.sum() or len(values) != n_values.sum():
        raise ValueError(f"'codes' has {len(codes)} bytes and 'values' {len(values)} entries, "
                         f"the attributes of 'codes' call for {nbytes.sum()} and {n_values.sum()}")
    cb, cv = numpy.cumsum(nbytes) - nbytes, numpy.cumsum(n_values) - n_values
    return [(int(bits[i]), int(n_codes[i]), codes[cb[i]:cb[i] + nbytes[i]], values[cv[i]:cv[i] + n_values[i]])
            for i in range(n)]


def _read_weight(params, name, encoding, shape, prunable, stream=None):
    """The float32 array of parameter ``name`` (of ``shape``).

    Dense and CSR arrays come from the ``/params`` group; a relative one from its
    ``stream`` (:func:`_relative_streams`). Raises ValueError (or OSError from a
    damaged file) on any inconsistency.
    """
    if encoding == "dense" or not prunable:
        return _finite_float32(_dataset(params, name, "f", shape))
    mshape = (shape[0], math.prod(shape[1:]))
    if encoding == "csr":
        g = _member(params, name, h5py.Group)
        for key, want in (("shape", mshape), ("tensor_shape", tuple(shape))):
            got = tuple(numpy.atleast_1d(g.attrs.get(key, ())).tolist())
            if got != want:
                raise ValueError(f"attribute {key} is {got}, expected {want} (from the network description)")
        data = _dataset(g, "data", "f")
        indices, indptr = _dataset(g, "indices", "iu"), _dataset(g, "indptr", "iu")
        check_csr(data, indices, indptr, mshape)
    else:
        bits, n_codes, packed, values = stream
        data, indices, indptr = relative_decode(unpack_bits(packed, bits, n_codes), values, mshape, bits)
    return csr_to_dense(_finite_float32(data), indices, indptr, mshape).reshape(shape)


def _finite_float32(a):
    if a.dtype != numpy.float32:
        raise ValueError(f"values have dtype {a.dtype}, expected float32")
    if not numpy.all(numpy.isfinite(a)):
        raise ValueError("NaN or infinite values")
    return a


def load_model(path, xp=numpy):
    """Read a model file written by :func:`export_model` (or a training checkpoint).

    Returns a :class:`~sparsenet.model.Network` on the array module ``xp`` whose weights
    are exactly the exported ones (pruned entries 0, masks = ``W ≠ 0``). Everything is
    validated (format tag and version, the network description, every dataset's
    presence, dtype and shape, CSR and relative-index structure, finite values); a
    problem raises :class:`SparsenetError` naming the file and the parameter.
    """
    path = Path(path)
    with open_hdf5(path, "model") as f:
        fmt = text_attr(f, "format")
        if fmt == FORMAT:
            return _read_model(f, path, xp)
    if fmt == CHECKPOINT_FORMAT:
        return load_checkpoint(path, xp).net
    raise SparsenetError(f"{path}: not a sparsenet model file or checkpoint (format tag missing)")


def _read_model(f, path, xp):
    version = f.attrs.get("version")
    if not isinstance(version, int | numpy.integer) or version != VERSION:
        raise SparsenetError(f"{path}: model file version {f.attrs.get('version')} is not supported (expected {VERSION})")
    encoding = text_attr(f, "encoding")
    if encoding not in ENCODINGS:
        raise SparsenetError(f"{path}: unknown encoding {encoding!r}")
    try:
        net = build_network(json.loads(text_attr(f, "network")), xp=xp)
    except (SparsenetError, TypeError, ValueError, MemoryError) as e:
        raise SparsenetError(f"{path}: cannot rebuild the network: {e!r}") from None
    params = f.get("params")
    if not isinstance(params, h5py.Group):
        raise SparsenetError(f"{path}: group 'params' is missing")
    pruned = [name for name, _, p in _weights(net) if p.prunable]
    streams = {}
    if encoding == "relative":
        try:
            streams = dict(zip(pruned, _relative_streams(f, len(pruned)), strict=True))
        except (ValueError, TypeError, OSError) as e:
            raise SparsenetError(f"{path}: relative-index streams: {e}") from None
    for name, _, p in _weights(net):
        try:
            W = _read_weight(params, name, encoding, p.data.shape, p.prunable, streams.get(name))
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise SparsenetError(f"{path}: parameter {name!r}: {e}") from None
        p.data = to_device(W, xp)
        p.mask = to_device((W != 0).astype(numpy.float32), xp) if p.prunable else xp.ones_like(p.data)
    return net


def export_sizes(net):
    """Bytes on disk of ``net`` exported in each encoding (written to a temporary directory)."""
    with tempfile.TemporaryDirectory() as d:
        sizes = {}
        for enc in ENCODINGS:
            export_model(net, Path(d) / f"{enc}.h5", enc)
            sizes[enc] = os.path.getsize(Path(d) / f"{enc}.h5")
    return sizes


def prune_at_random(net, density, seed=0):
    """Give every prunable parameter a random mask keeping a ``density[layer]`` fraction.

    For tests and benchmarks that need a pruned network of given per-layer densities
    (PAPER.md, Tables 2–3) without training it; magnitude pruning lives elsewhere.
    Pruned weights are set to exactly 0, so ``W == W ⊙ M`` holds. Returns ``net``.
    """
    rng = numpy.random.default_rng(seed)
    xp = net.xp
    for name, p in net.params().items():
        if p.prunable:
            p.mask = xp.asarray((rng.random(p.data.shape) < density[name.split(".")[0]]).astype(numpy.float32))
            p.data *= p.mask
    return net


# ----------------------------------------------------------------------------- inference
def prefer_sparse(density, rows, n_weights, xp=numpy):
    """Whether a product ``X W₂ᵀ`` runs faster with W₂ as CSR (measured rule, README).

    ``density``: W₂'s non-zero fraction; ``rows``: rows of X (the batch size for a
    Linear, N·Ho·Wo for a Conv2d); ``n_weights``: W₂'s size.

    CPU (``benchmarks/bench_sparse.py --sweep``, 2-core EPYC, OpenBLAS with its default
    two threads, scipy on one): scipy's CSR kernels cost about 0.5–1 ns per stored
    weight and row of X, plus a few µs per call; a dense GEMV about 0.05–0.1 ns per
    weight while W₂ stays in cache, more once it streams from memory; a dense GEMM
    (several rows) much less per weight and row. Hence:

    * one row: sparse at density ≤ 10% for ≥ 4M weights (W₂ streams from memory: 1.3×
      at 10%, 0.7× at 20%), ≤ 3% for ≥ 100K weights (a 1024×1024 layer gains 1.9× at
      2% and loses at 5%), and never for smaller layers (call overhead);
    * 2–64 rows: sparse at density ≤ 5% when rows × weights ≥ 1M (1.3–3.2× at 5%,
      about even at 10%);
    * more rows: BLAS's GEMM is at its best; sparse at ≤ 2% when rows × weights ≥ 1M.

    GPU (``cupyx.scipy.sparse``): not measured (no GPU on the development machine); a
    conservative guess, sparse only for one row, ≥ 1M weights and density ≤ 10%.
    """
    if xp is not numpy:
        return rows == 1 and n_weights >= 1_000_000 and density <= 0.10
    if rows == 1:
        return n_weights >= 100_000 and density <= (0.10 if n_weights >= 4_000_000 else 0.03)
    return density <= (0.05 if rows <= 64 else 0.02) and rows * n_weights >= 1_000_000


def layer_operand(layer, x):
    """The dense operand ``X`` (M, K) of a Linear/Conv2d's product ``X W₂ᵀ`` and the shape
    its (M, F) result takes: x itself for a Linear (shape None), the im2col rows
    (N·Ho·Wo, kh·kw·C) for a Conv2d (shape (N, Ho, Wo, F))."""
    if isinstance(layer, L.Linear):
        return x, None
    F, kh, kw, _ = layer.params["W"].data.shape
    cols = L.im2col(x, kh, kw, layer.stride, layer.pad)
    N, Ho, Wo = cols.shape[:3]
    return cols.reshape(N * Ho * Wo, -1), (N, Ho, Wo, F)


def sparse_matmul_t(W_csr, X):
    """``Y = X Wᵀ`` for dense X (M, K) and sparse W (F, K) → (M, F).

    M = 1 runs one sparse matrix-vector product ``W x``; otherwise ``(W Xᵀ)ᵀ``.
    """
    if X.shape[0] == 1:
        return (W_csr @ X[0])[None, :]
    return (W_csr @ X.T).T


class SparseNetwork:
    """Inference with pruned layers as sparse matrix products.

    ``mode``: ``"auto"`` picks dense or sparse per layer and call by
    :func:`prefer_sparse`; ``"dense"`` / ``"sparse"`` force one for every Linear/Conv2d.
    Each such layer keeps its dense matrix ``W₂`` (F, K) and its CSR copy; other layers
    run their ordinary forward pass. Predictions equal the dense network's (the same
    products, summed in another order: logits agree to float32 rounding).
    """

    def __init__(self, net, mode="auto"):
        if mode not in ("auto", "dense", "sparse"):
            raise SparsenetError(f"unknown inference mode {mode!r}: use auto, dense or sparse")
        self.net, self.mode, self.xp = net, mode, net.xp
        sp = sparse_module(self.xp)
        self.mats = {}
        for l in net.layers:
            if isinstance(l, L.Linear | L.Conv2d):
                W2 = as_matrix(l.params["W"].data)
                data, indices, indptr = csr_from_dense(asnumpy(W2))
                csr = sp.csr_matrix(tuple(to_device(a, self.xp) for a in (data, indices, indptr)), shape=W2.shape)
                self.mats[l.name] = (W2, csr, len(data) / W2.size if W2.size else 1.0)

    def plan(self, batch_size):
        """``{layer: "sparse" | "dense"}`` for a batch of ``batch_size`` inputs."""
        out, shape = {}, self.net.input_shape
        for l in self.net.layers:
            if l.name in self.mats:
                rows = batch_size * (math.prod(l.output_shape(shape)[:2]) if l.kind == "conv2d" else 1)
                out[l.name] = "sparse" if self._sparse(l.name, rows) else "dense"
            shape = l.output_shape(shape)
        return out

    def _sparse(self, name, rows):
        if self.mode != "auto":
            return self.mode == "sparse"
        W2, _, density = self.mats[name]
        return prefer_sparse(density, rows, W2.size, self.xp)

    def _product(self, name, X):
        W2, csr, _ = self.mats[name]
        return sparse_matmul_t(csr, X) if self._sparse(name, X.shape[0]) else X @ W2.T

    def forward(self, x):
        """Logits for a batch ``x`` (N, *input_shape)."""
        for l in self.net.layers:
            if l.name in self.mats:
                X, shape = layer_operand(l, x)
                y = self._product(l.name, X) + l.params["b"].data
                x = y if shape is None else y.reshape(shape)
            else:
                x = l.forward(x)
                l.cache = None
        return x

    def predict(self, x, batch_size=1000):
        """Predicted class of every row of ``x``, in batches of ``batch_size``."""
        xp = get_array_module(x)
        out = [self.forward(x[i:i + batch_size]).argmax(axis=1) for i in range(0, len(x), batch_size)]
        return xp.concatenate(out) if out else xp.zeros(0, dtype=numpy.int64)
