"""Deep Compression's storage: pruned, weight-shared layers with Huffman-coded streams.

The encoding ``compressed`` of :mod:`sparsenet.modelfile` (Han, Mao & Dally 2016): each pruned weight
shared by a codebook of ``K ≤ 256`` values (:mod:`sparsenet.quantise`) is stored as

* its **codebook**, ``K`` float32 values;
* its connections' **relative positions** (the codes of :func:`sparsenet.codecs.relative_encode`, 5 bits
  for a linear layer and 8 for a conv, fillers included), Huffman-coded;
* each connection's **codebook index** (in position order), Huffman-coded.

Layout (datasets of a version-2 model file with ``encoding="compressed"``; h5py and NumPy read it)::

    /dense      float32: every parameter that is not a shared weight (biases), flattened, network order
    /codebooks  float32: the codebooks, one after the other (network order)
    /tables     uint8: per shared weight, the Huffman code lengths of its 2**bits position symbols,
                then of its K index symbols (0: a symbol that does not occur)
    /stream     uint8: per shared weight, its Huffman-coded positions, then its indices, each padded
                with zero bits to a whole byte (layout: sparsenet.huffman)
                attrs: counts int64 (n, 6): bits, K, n_codes, n_values, position bytes, index bytes;
                shapes (JSON: the tensor shapes, checked against the network description)

Every prunable weight must be shared (one codebook per layer); ``sparsenet quantise`` does that. The value of
connection ``i`` is ``codebook[index_i]``: a file loads to exactly the network it was written from, codebooks
and codes included, so predictions equal the quantised checkpoint's.
"""
import json

import numpy

from . import h5io, huffman
from .backend import asnumpy
from .codecs import BITS, as_matrix, csr_to_dense, relative_decode, relative_encode
from .util import SparsenetError, checked_cast



def _streams(p, bits):
    """Position codes, index symbols and codebook of a shared weight (row-major over its matrix)."""
    M, codes = as_matrix(asnumpy(p.mask)), as_matrix(asnumpy(p.codes))
    positions, _ = relative_encode(numpy.zeros(M.shape, numpy.float32), bits, M)
    return positions, codes[M != 0].astype(numpy.uint8), asnumpy(p.codebook).astype(numpy.float32)


def encode_layer(p, bits):
    """``(tables, position bytes, index bytes, codebook, n_codes, n_values)`` of one shared weight."""
    positions, idx, codebook = _streams(p, bits)
    K = len(codebook)
    lp = huffman.code_lengths(numpy.bincount(positions, minlength=2 ** bits))
    li = huffman.code_lengths(numpy.bincount(idx, minlength=K))
    (sp, _), (si, _) = huffman.encode(positions, lp), huffman.encode(idx, li)
    return numpy.concatenate([lp, li]), sp, si, codebook, len(positions), len(idx)


def write(f, net, layout):
    """The ``compressed`` datasets of ``net`` (``layout``: modelfile's parameter list) into the open file ``f``."""
    params, dense, parts, counts, shapes = net.params(), [], [], [], []
    for name, kind, shape, prunable in layout:
        p = params[name]
        if not prunable:
            dense.append(asnumpy(p.data).astype(numpy.float32).ravel())
            continue
        if p.codebook is None:
            raise SparsenetError(f"{name} is not weight-shared: the compressed format stores codebook indices "
                                 "(run `sparsenet quantise` first, or export --format relative)")
        tables, sp, si, codebook, n_codes, n_values = encode_layer(p, BITS[kind])
        parts.append((tables, sp, si, codebook))
        counts.append([BITS[kind], len(codebook), n_codes, n_values, len(sp), len(si)])
        shapes.append(list(shape))
    empty_f, empty_u = numpy.zeros(0, numpy.float32), numpy.zeros(0, numpy.uint8)
    h5io.write_dataset(f, "dense", numpy.concatenate(dense + [empty_f]))
    h5io.write_dataset(f, "codebooks", numpy.concatenate([c for *_, c in parts] + [empty_f]))
    h5io.write_dataset(f, "tables", numpy.concatenate([t for t, *_ in parts] + [empty_u]))
    d = h5io.write_dataset(f, "stream", numpy.concatenate([x for _, sp, si, _ in parts for x in (sp, si)] + [empty_u]))
    d.attrs["counts"] = numpy.array(counts, dtype=numpy.int64).reshape(-1, 6)
    h5io.set_text(d, "shapes", json.dumps(shapes, separators=(",", ":")))


def _take(a, start, n, what):
    if start + n > len(a):
        raise ValueError(f"'{what}' ends after {len(a)} entries, the counts call for more")
    return a[start:start + n]


def read(f, layout, dataset):
    """``{name: (W, M, codebook, codes)}`` of every parameter (``codebook``/``codes`` None for dense ones).
    ``dataset(f, key, kinds)`` reads a 1-D dataset checked for dtype kind; ValueError on any inconsistency."""
    dense, books, tables, stream = (dataset(f, k, kind) for k, kind in (
        ("dense", "f"), ("codebooks", "f"), ("tables", "u"), ("stream", "u")))
    for what, a in (("dense", dense), ("codebooks", books)):
        try:
            if a.dtype != numpy.float32:
                raise SparsenetError(f"'{what}' has dtype {a.dtype}, expected float32")
            checked_cast(a, numpy.float32, repr(what))
        except SparsenetError as e:
            raise ValueError(f"{e} (must hold finite float32 values)") from None
    shared = [(name, kind, shape) for name, kind, shape, prunable in layout if prunable]
    counts = numpy.asarray(f["stream"].attrs.get("counts", numpy.zeros((0, 6))), dtype=numpy.int64).reshape(-1, 6)
    if counts.shape[0] != len(shared):
        raise ValueError(f"attribute counts of 'stream' lists {counts.shape[0]} weights, the network has {len(shared)}")
    stored = json.loads(h5io.text_attr(f["stream"], "shapes") or "null")
    if stored != [list(s) for _, _, s in shared]:
        raise ValueError(f"attribute shapes of 'stream' is {stored}, the network description says otherwise")
    out, at = {}, {"dense": 0, "codebooks": 0, "tables": 0, "stream": 0}
    for name, kind, shape, prunable in layout:
        if not prunable:
            size = int(numpy.prod(shape))
            w = _take(dense, at["dense"], size, "dense").reshape(shape)
            out[name] = (w, numpy.ones_like(w), None, None)
            at["dense"] += size
    for (name, kind, shape), (bits, K, n_codes, n_values, nbp, nbi) in zip(shared, counts.tolist()):
        if bits != BITS[kind] or not 1 <= K <= 256 or min(n_codes, n_values, nbp, nbi) < 0:
            raise ValueError(f"{name}: counts out of range (bits {bits}, K {K})")
        book = _take(books, at["codebooks"], K, "codebooks")
        lengths = _take(tables, at["tables"], 2 ** bits + K, "tables")
        sp = _take(stream, at["stream"], nbp, "stream")
        si = _take(stream, at["stream"] + nbp, nbi, "stream")
        at["codebooks"], at["tables"], at["stream"] = at["codebooks"] + K, at["tables"] + 2 ** bits + K, \
            at["stream"] + nbp + nbi
        positions = huffman.decode(sp, n_codes, lengths[:2 ** bits])
        idx = huffman.decode(si, n_values, lengths[2 ** bits:])
        if n_values and int(idx.max()) >= K:
            raise ValueError(f"{name}: index {int(idx.max())} past its codebook of {K}")
        mshape = (shape[0], int(numpy.prod(shape[1:])))
        data, indices, indptr = relative_decode(positions, idx.astype(numpy.float32), mshape, bits)
        codes = csr_to_dense(data, indices, indptr, mshape).astype(numpy.uint8)  # idx placed at its position
        M = csr_to_dense(numpy.ones_like(data), indices, indptr, mshape)
        out[name] = ((book[codes] * M).reshape(shape), M.reshape(shape), book, codes.reshape(shape))
    for key, n in (("dense", len(dense)), ("codebooks", len(books)), ("tables", len(tables)), ("stream", len(stream))):
        if at[key] != n:
            raise ValueError(f"'{key}' has {n} entries, the counts call for {at[key]}")
    return out


def storage_table(net):
    """Deep Compression's per-layer table: for each shared weight, bits per index and per weight after
    quantisation (fixed) and after Huffman coding, and bytes (with biases) before pruning (the original dense
    float32 layer), after pruning (relative indices, float32 values), after quantisation (fixed-width indices,
    codebook) and after coding. ``weights`` and ``density`` are of the original layer (as the paper's)."""
    rows = []
    for l in net.layers:
        p = l.params.get("W")
        if p is None or p.codebook is None:
            continue
        bits = BITS[l.kind]
        tables, sp, si, codebook, n_codes, n_values = encode_layer(p, bits)
        K, b = len(codebook), max(1, int(numpy.ceil(numpy.log2(max(len(codebook), 2)))))
        bias, o = 4 * l.params["b"].size, net.origin.get(l.name, {"weights": p.size, "params": p.size + l.params["b"].size})
        rows.append({"layer": l.name, "weights": o["weights"], "nonzero": n_values, "density": n_values / o["weights"],
                     "codebook": K, "weight_bits": b, "index_bits": bits,
                     "weight_bits_coded": 8 * len(si) / max(n_values, 1), "index_bits_coded": 8 * len(sp) / max(n_values, 1),
                     "dense_bytes": 4 * o["params"], "pruned_bytes": 4 * n_values + -(-bits * n_codes // 8) + bias,
                     "quantised_bytes": -(-(b * n_values + bits * n_codes) // 8) + 4 * K + bias,
                     "coded_bytes": len(sp) + len(si) + 4 * K + len(tables) + bias})
    keys = [k for k in rows[0] if k.endswith("bytes") or k in ("weights", "nonzero")] if rows else []
    total = {"layer": "total", **{k: sum(r[k] for r in rows) for k in keys}}
    if rows:
        total.update(density=total["nonzero"] / total["weights"], **{k: sum(
            r[k] * r["nonzero"] for r in rows) / max(total["nonzero"], 1) for k in (
            "weight_bits", "index_bits", "weight_bits_coded", "index_bits_coded")})
    return {"layers": rows, "total": total}
