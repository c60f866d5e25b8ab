"""Model files: a pruned network's weights *and connections* on disk (HDF5, no pickle).

The paper ("Storage") stores a pruned layer sparse, with relative indices of 5 bits (FC) or 8 bits (conv).
:func:`export_model` writes a network in one of three encodings (the arrays of :mod:`sparsenet.codecs`),
:func:`load_model` reads one back with full validation, :func:`storage_report` and :func:`export_sizes` say
what each costs. A file records which connections exist; a surviving weight of value 0.0 is still one.
Each weight is stored as the (rows, cols) matrix its layer multiplies with (:func:`~sparsenet.codecs.as_matrix`).

Model file, version 2 (HDF5)::

    /              attrs: format="sparsenet-model", version=2, encoding="dense" | "csr" | "relative",
                          network (JSON: Network.spec(); all layer shapes come from it)
    /params/<l>.b  float32, dense: biases (every parameter that is not prunable)
    /params/<l>.W  dense:    float32 dataset of the weight's own shape
                   csr:      group, attrs shape=(rows, cols), tensor_shape; datasets data float32 (nnz,),
                             indices int32 (nnz,), indptr int32 (rows+1,) (the CSR of sparsenet.codecs)
                   relative: not under /params, but in two streams for all pruned weights (network order):
    /values        float32 (Σ nnz,): each pruned weight's connection values in row-major order
    /codes         uint8: each weight's bit-packed relative indices, ⌈n_codes·bits/8⌉ bytes, byte-aligned;
                   attrs bits, n_codes, n_values (int64, one per pruned weight), shapes (JSON: tensor shapes)
    /masks/<l>.W   dense only, a prunable weight's mask unless all ones: uint8 (⌈size/8⌉,),
                   ``numpy.packbits(M.ravel(), bitorder="little")``
    compressed:    weight-shared layers, Huffman-coded (Deep Compression): /dense, /codebooks, /tables,
                   /stream, laid out in :mod:`sparsenet.compressed`

``nnz`` counts connections (mask ones) whatever their value, so the stored sparse structure *is* the mask.
(Two streams, not two datasets per weight: HDF5 headers cost ~270 bytes a dataset.) Version 1 has no
``/masks`` or ``shapes`` and stored only non-zero weights: its mask is the stored structure (csr,
relative) or ``W ≠ 0`` (dense). Both versions load.

Container (:mod:`sparsenet.h5io`): HDF5 1.10, every non-empty dataset one chunk with a Fletcher-32
checksum; the sparse streams and packed masks also shuffled and deflated; dense weights not compressed.

Loading validates everything (format, version, :func:`~sparsenet.model.check_spec` of the description,
every array's shape, dtype and structure, finite values) before allocating, then the pruning rule
(:meth:`~sparsenet.param.Param.load`); a problem raises a one-line :class:`SparsenetError` naming the file.

Index overhead (the paper's 15.6% = 5 bits per 32-bit value) is index bits over value bits: CSR
``32·(nnz + rows + 1) / 32·nnz``, relative ``bits·n_codes / 32·nnz`` (fillers included).
"""
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy

from . import compressed, h5io
from .backend import asnumpy, to_device
from .checkpoint import FORMAT as CHECKPOINT_FORMAT
from .checkpoint import load_checkpoint
from .codecs import (BITS, as_matrix, check_csr, csr_from_dense, csr_to_dense, pack_bits, relative_decode,
                     relative_encode, unpack_bits)
from .model import build_network, check_spec
from .util import SparsenetError, checked_cast

FORMAT, VERSION = "sparsenet-model", 2
READABLE = (1, 2)  # the versions load_model reads
LOSSLESS = ("dense", "csr", "relative")  # store any network exactly
ENCODINGS = (*LOSSLESS, "compressed")  # compressed (Deep Compression, sparsenet.compressed): weight-shared networks


def _layout(spec):
    """``[(name, layer kind, shape, prunable)]`` of every parameter a network description declares, in
    network order, once :func:`~sparsenet.model.check_spec` accepts it (SparsenetError otherwise)."""
    shapes = check_spec(spec)
    kinds = {s["name"]: s["kind"] for s in spec["layers"]}
    return [(name, kinds[name.rsplit(".", 1)[0]], tuple(shape), name.endswith(".W"))  # weights W are prunable
            for name, shape in shapes.items()]


@contextmanager
def _prefixed(prefix, errors=(SparsenetError,)):
    """Re-raise ``errors`` from the block as a one-line SparsenetError ``prefix + message``."""
    try:
        yield
    except errors as e:
        raise SparsenetError(f"{prefix}{e}") from None


def _param_cost(p, kind):
    """Bytes and index bits of one parameter in each encoding (a prunable one stored sparse)."""
    W = asnumpy(p.data)
    c = {"params": W.size, "dense_bytes": 4 * W.size, "csr_bytes": 4 * W.size, "relative_bytes": 4 * W.size,
         "weights": 0, "nonzero": 0, "fillers": 0, "csr_index_bits": 0, "relative_index_bits": 0}
    if p.prunable:
        A = as_matrix(W)
        nnz, bits = p.nonzero(), BITS[kind]
        n_codes = len(relative_encode(A, bits, as_matrix(asnumpy(p.mask)))[0])
        c.update(weights=A.size, nonzero=nnz, fillers=n_codes - nnz,
                 csr_bytes=4 * (2 * nnz + A.shape[0] + 1), relative_bytes=4 * nnz + -(-bits * n_codes // 8),
                 csr_index_bits=32 * (nnz + A.shape[0] + 1), relative_index_bits=bits * n_codes)
    return c


def storage_report(net):
    """Bytes of the parameters in each encoding, per layer and in total (payload, no HDF5 overhead).

    Returns ``{"layers": [row, ...], "total": row}``. A row: ``params``, ``weights`` (prunable entries),
    ``nonzero`` (connections: mask ones, whatever their value), ``density``, ``fillers``, ``dense_bytes``,
    ``csr_bytes``, ``relative_bytes`` (biases dense in all three), ``csr_overhead_pct`` / ``relative_overhead_pct``
    (index bits over the surviving values' bits), ``ratio_csr``, ``ratio_relative`` (dense over encoded bytes).
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


def export_sizes(net):
    """Bytes on disk of ``net`` exported in each encoding (written to a temporary directory); ``compressed``
    only when every prunable weight is shared (quantised)."""
    shared = all(p.codebook is not None for p in net.params().values() if p.prunable)
    encodings = ENCODINGS if shared else LOSSLESS
    with tempfile.TemporaryDirectory() as d:
        for enc in encodings:
            export_model(net, Path(d) / f"{enc}.h5", enc)
        return {enc: os.path.getsize(Path(d) / f"{enc}.h5") for enc in encodings}


def export_model(net, path, encoding="relative"):
    """Write ``net``'s parameters and connections to ``path`` (HDF5, atomically) in one of :data:`ENCODINGS`.

    Layout and filters: module docstring. A network whose description fails :func:`~sparsenet.model.check_spec`,
    does not match its parameters, breaks the pruning rule or holds values float32 cannot (NaN, inf, beyond its
    range) is refused (:class:`SparsenetError`, nothing written), so no export makes a file that will not load.
    """
    if encoding not in ENCODINGS:
        raise SparsenetError(f"unknown format {encoding!r}: choose from {', '.join(ENCODINGS)}")
    params = net.params()
    with _prefixed(f"{path}: cannot export this network: "):
        layout = _layout(net.spec())
        declared = [(name, shape, prunable) for name, _, shape, prunable in layout]
        have = [(name, tuple(p.data.shape), p.prunable) for name, p in params.items()]
        if have != declared:
            raise SparsenetError(f"its parameters {have} are not the {declared} its description declares")
        for name, p in params.items():
            with _prefixed(f"parameter {name!r}: "):
                p.check()
                checked_cast(asnumpy(p.data), numpy.float32, "value")  # what load_model would refuse
    with h5io.create(path) as f:
        h5io.set_text(f, "format", FORMAT)
        f.attrs["version"] = VERSION
        h5io.set_text(f, "encoding", encoding)
        h5io.set_text(f, "network", json.dumps(net.spec(), separators=(",", ":")))
        if encoding == "compressed":
            return compressed.write(f, net, layout)
        group, streams = f.create_group("params"), []
        for name, kind, shape, prunable in layout:
            W, M = asnumpy(params[name].data).astype(numpy.float32), asnumpy(params[name].mask)
            if encoding == "dense" or not prunable:
                h5io.write_dataset(group, name, W)
                if prunable and not M.all():
                    h5io.write_dataset(f.require_group("masks"), name, pack_bits(M, 1), compress=True)
            elif encoding == "csr":
                g = group.create_group(name)
                g.attrs["shape"], g.attrs["tensor_shape"] = as_matrix(W).shape, shape
                for key, a in zip(("data", "indices", "indptr"), csr_from_dense(as_matrix(W), as_matrix(M)),
                                  strict=True):
                    h5io.write_dataset(g, key, a, compress=True)
            else:
                streams.append((BITS[kind], shape, *relative_encode(as_matrix(W), BITS[kind], as_matrix(M))))
        if encoding == "relative":
            _write_streams(f, streams)


def _write_streams(f, streams):
    """``/values`` and ``/codes`` of a relative file from ``[(bits, shape, codes, values)]``."""
    empty = numpy.zeros(0, dtype=numpy.float32)
    h5io.write_dataset(f, "values", numpy.concatenate([v for *_, v in streams] + [empty]), compress=True)
    d = h5io.write_dataset(f, "codes", numpy.concatenate([pack_bits(c, b) for b, _, c, _ in streams]
                                                         + [empty.view(numpy.uint8)]), compress=True)
    for key, column in (("bits", [b for b, *_ in streams]), ("n_codes", [len(c) for _, _, c, _ in streams]),
                        ("n_values", [len(v) for *_, v in streams])):
        d.attrs[key] = numpy.array(column, dtype=numpy.int64)
    h5io.set_text(d, "shapes", json.dumps([list(s) for _, s, _, _ in streams], separators=(",", ":")))


def load_model(path, xp=numpy):
    """Read a model file written by :func:`export_model` (either version) or a training checkpoint.

    Returns a :class:`~sparsenet.model.Network` on the array module ``xp`` whose weights are exactly the
    exported ones and whose masks the stored connections (version 1: module docstring). Everything is
    validated first; a problem raises :class:`SparsenetError` naming the file (and the parameter).
    """
    path = Path(path)
    with h5io.open_file(path, "model") as f:
        fmt = h5io.text_attr(f, "format")
        if fmt == FORMAT:
            return _read_model(f, path, xp)
    if fmt == CHECKPOINT_FORMAT:
        return load_checkpoint(path, xp).net
    raise SparsenetError(f"{path}: not a sparsenet model file or checkpoint (format tag missing)")


def _read_model(f, path, xp):
    version = f.attrs.get("version")
    if not isinstance(version, int | numpy.integer) or version not in READABLE:
        raise SparsenetError(f"{path}: model file version {version} is not supported "
                             f"(expected {' or '.join(map(str, READABLE))})")
    encoding = h5io.text_attr(f, "encoding")
    if encoding not in ENCODINGS:
        raise SparsenetError(f"{path}: unknown encoding {encoding!r}")
    text = h5io.text_attr(f, "network")
    with _prefixed(f"{path}: cannot rebuild the network: ", (SparsenetError, ValueError)):
        if text is None:
            raise ValueError("attribute 'network' is missing")
        spec = json.loads(text)
        layout = _layout(spec)
    if encoding == "compressed":
        with _prefixed(f"{path}: compressed streams: ", (ValueError, TypeError, KeyError, OSError)):
            arrays = compressed.read(f, layout, _dataset)
        return _build(spec, arrays, path, xp)
    if not isinstance(f.get("params"), h5py.Group):
        raise SparsenetError(f"{path}: group 'params' is missing")
    streams, arrays = {}, {}
    if encoding == "relative":
        with _prefixed(f"{path}: relative-index streams: ", (ValueError, TypeError, OSError)):
            streams = _relative_streams(f, layout, version)
    for name, _, shape, prunable in layout:
        with _prefixed(f"{path}: parameter {name!r}: ", (ValueError, TypeError, KeyError, OSError)):
            arrays[name] = _read_weight(f, name, encoding, shape, prunable, version, streams.get(name))
    return _build(spec, arrays, path, xp)


def _build(spec, arrays, path, xp):
    """The network of ``spec`` holding ``arrays`` (``{name: (W, M[, codebook, codes])}``), checked by Param."""
    with _prefixed(f"{path}: cannot rebuild the network: "):
        net = build_network(spec, xp=xp)
    for name, p in net.params().items():
        W, M, *shared = arrays.pop(name)
        with _prefixed(f"{path}: parameter {name!r}: "):
            p.load(to_device(W, xp), to_device(M, xp))
            if shared and shared[0] is not None:
                p.share(to_device(shared[0], xp), to_device(shared[1], xp))
    return net


def _member(g, key, cls):
    """``g[key]`` if it exists and is a ``cls`` (h5py.Dataset or h5py.Group)."""
    if isinstance(obj := g.get(key), cls):
        return obj
    raise ValueError(f"{'dataset' if cls is h5py.Dataset else 'group'} {key!r} is missing")


def _dataset(g, key, kinds, shape=None):
    """``g[key]`` as a NumPy array, its dtype kind and shape (``None``: any 1-D) checked before reading."""
    d = _member(g, key, h5py.Dataset)
    if d.dtype.kind not in kinds:
        raise ValueError(f"{key!r} has dtype {d.dtype}, expected {'integers' if 'f' not in kinds else 'float32'}")
    if (d.ndim != 1) if shape is None else (d.shape != tuple(shape)):
        raise ValueError(f"{key!r} has shape {d.shape}, expected {tuple(shape) if shape else '1-D'}")
    return d[()]


def _relative_streams(f, layout, version):
    """``{name: (bits, n_codes, packed codes, values)}`` of each pruned weight of a relative file, its
    shape as ``layout`` declares (and, in version 2, as the ``shapes`` attribute says)."""
    names = [name for name, _, _, prunable in layout if prunable]
    shapes = [list(shape) for _, _, shape, prunable in layout if prunable]
    d = _member(f, "codes", h5py.Dataset)
    table = [numpy.atleast_1d(d.attrs.get(key, [])).astype(numpy.int64) for key in ("bits", "n_codes", "n_values")]
    if any(t.shape != (len(names),) for t in table):
        raise ValueError(f"attributes bits, n_codes, n_values of 'codes' must list {len(names)} pruned parameters")
    if version >= 2:
        text = h5io.text_attr(d, "shapes")
        stored = json.loads(text) if text is not None else None
        if stored != shapes:
            raise ValueError(f"attribute shapes of 'codes' is {stored}, expected {shapes} "
                             f"(from the network description)")
    bits, n_codes, n_values = table
    if (bits < 1).any() or (bits > 8).any() or (n_codes < 0).any() or (n_values < 0).any():
        raise ValueError("attributes of 'codes' out of range (bits 1..8, counts >= 0)")
    codes, values = _dataset(f, "codes", "u"), _dataset(f, "values", "f")
    nbytes = -(-n_codes * bits // 8)
    if len(codes) != nbytes.sum() or len(values) != n_values.sum():
        raise ValueError(f"'codes' has {len(codes)} bytes and 'values' {len(values)} entries, "
                         f"the attributes of 'codes' call for {nbytes.sum()} and {n_values.sum()}")
    cb, cv = numpy.cumsum(nbytes) - nbytes, numpy.cumsum(n_values) - n_values
    return {name: (int(bits[i]), int(n_codes[i]), codes[cb[i]:cb[i] + nbytes[i]],
                   values[cv[i]:cv[i] + n_values[i]]) for i, name in enumerate(names)}


def _read_weight(f, name, encoding, shape, prunable, version, stream=None):
    """``(W, M)``: float32 value and 0/1 mask of parameter ``name`` (of ``shape``), from ``/params`` or a
    relative ``stream`` (:func:`_relative_streams`). ValueError (or OSError if damaged) on any inconsistency."""
    if encoding == "dense" or not prunable:
        W = _finite_float32(_dataset(f["params"], name, "f", shape))
        if not prunable or version == 1:  # version 1: the mask is W != 0
            return W, ((W != 0) if prunable else numpy.ones_like(W)).astype(numpy.float32)
        masks = f.get("masks")
        if masks is not None and not isinstance(masks, h5py.Group):
            raise ValueError("'masks' is not a group")
        if masks is None or name not in masks:
            return W, numpy.ones_like(W)
        try:
            bits = unpack_bits(_dataset(masks, name, "u"), 1, math.prod(shape))
        except ValueError as e:
            raise ValueError(f"mask: {e}") from None
        return W, bits.reshape(shape).astype(numpy.float32)
    mshape = (shape[0], math.prod(shape[1:]))
    if encoding == "csr":
        g = _member(f["params"], name, h5py.Group)
        for key, want in (("shape", mshape), ("tensor_shape", tuple(shape))):
            got = tuple(numpy.atleast_1d(g.attrs.get(key, ())).tolist())
            if got != want:
                raise ValueError(f"attribute {key} is {got}, expected {want} (from the network description)")
        data, indices, indptr = _dataset(g, "data", "f"), _dataset(g, "indices", "iu"), _dataset(g, "indptr", "iu")
        check_csr(data, indices, indptr, mshape)
    else:
        bits, n_codes, packed, values = stream
        data, indices, indptr = relative_decode(unpack_bits(packed, bits, n_codes), values, mshape, bits)
    W = csr_to_dense(_finite_float32(data), indices, indptr, mshape)
    M = csr_to_dense(numpy.ones_like(data), indices, indptr, mshape)
    return W.reshape(shape), M.reshape(shape)


def _finite_float32(a):
    if a.dtype != numpy.float32:
        raise ValueError(f"values have dtype {a.dtype}, expected float32")
    try:
        return checked_cast(a, numpy.float32, "values")
    except SparsenetError as e:
        raise ValueError(str(e)) from None
