"""Model files: a pruned network's weights *and connections* on disk (HDF5, no pickle).

The paper ("Storage") stores a pruned layer sparse, with relative indices of 5 bits (FC)
or 8 bits (conv). :func:`export_model` writes a network in three encodings (the arrays
of :mod:`sparsenet.codecs`), :func:`load_model` reads one back with full validation,
:func:`storage_report` and :func:`export_sizes` say what each costs.

A file records which connections exist; loading never infers a mask from the values (a
surviving weight may have trained to exactly 0.0 and is still a connection). Each weight
is stored as the (rows, cols) matrix its layer multiplies with (:func:`~sparsenet.codecs.as_matrix`).

Model file, version 2 (HDF5)
----------------------------
::

    /                  attrs: format="sparsenet-model", version=2,
                              encoding="dense" | "csr" | "relative",
                              network (JSON: Network.spec(); all layer shapes come from it)
    /params/<l>.b      float32, dense: biases (every parameter that is not prunable)
    /params/<l>.W      dense:    float32 dataset of the weight's own shape
                       csr:      group, attrs shape=(rows, cols), tensor_shape
                                   data    float32 (nnz,)     the connections' values row by
                                                              row, columns ascending
                                   indices int32   (nnz,)     their column
                                   indptr  int32   (rows+1,)  row r is data[indptr[r]:indptr[r+1]]
                       relative: not under /params, but in two streams for all pruned weights:
    /values            float32 (Σ nnz,): each pruned weight's connection values in row-major
                       order, one weight after the other (network order)
    /codes             uint8: each weight's bit-packed relative indices, ⌈n_codes·bits/8⌉
                       bytes apiece, every weight starting on a byte boundary; attributes
                       bits, n_codes, n_values: int64 arrays, one entry per pruned weight;
                       shapes: JSON list of each pruned weight's tensor shape
    /masks/<l>.W       dense only, for a prunable weight whose mask is not all ones: uint8
                       (⌈size/8⌉,), the mask in C order one bit per entry, least significant
                       bit first (``numpy.packbits(M.ravel(), bitorder="little")``, padding
                       bits 0); a weight without one has every connection

``nnz`` counts connections (mask ones), whatever their value: CSR and relative store
exactly the mask's ones, a connection of value 0.0 with the value 0.0, so the stored
structure *is* the mask. (Two streams rather than a group of two datasets per weight:
HDF5 headers cost ~270 bytes a dataset, and the per-weight layout made LeNet-300-100's
file 2.2 KB, 2%, larger.)

Version 1 (files written before connections were stored) has the same layout without
``/masks`` and the ``shapes`` attribute, and stored only non-zero weights. Its rule on
loading: the mask is the stored structure (csr, relative) or ``W ≠ 0`` (dense) — v1 never
stored a surviving weight of value 0.0, so that is all there is. Both versions load.

Container (:mod:`sparsenet.h5io`): HDF5 1.10 object format, no free-space manager, text
as fixed-length bytes; every non-empty dataset is one chunk with a Fletcher-32 checksum;
the sparse streams (``values``, ``codes``, CSR ``data``/``indices``/``indptr``) and the
packed masks are also stored with byte shuffle and deflate (lossless). Dense weights are
not compressed.

Loading validates before allocating: the format tag and version, the network description
(:func:`~sparsenet.model.check_spec`: layer kinds, shapes chaining from input to output,
a size limit), then every stored array against the shape the description declares
(dense dataset shapes, CSR ``shape``/``tensor_shape``, the relative ``shapes`` and
decoded positions that fit the matrix), dtypes, CSR and relative-index structure and
finite values — all before the network is built; then each parameter is installed with
:meth:`~sparsenet.param.Param.load`, which checks the pruning rule (value 0 where the mask
is 0). A problem raises a one-line :class:`SparsenetError` naming the file.

Index overhead (as the paper's 15.6% = 5 bits per 32-bit value) is the index bits over
the value bits: CSR ``32·(nnz + rows + 1) / 32·nnz``; relative ``bits·n_codes / 32·nnz``
(fillers included).
"""
import json
import math
import os
import tempfile
from pathlib import Path

import h5py
import numpy

from . import h5io
from .backend import asnumpy, to_device
from .checkpoint import FORMAT as CHECKPOINT_FORMAT
from .checkpoint import load_checkpoint
from .codecs import (
    as_matrix,
    check_csr,
    csr_from_dense,
    csr_to_dense,
    pack_bits,
    relative_decode,
    relative_encode,
    unpack_bits,
)
from .model import build_network, check_spec
from .util import SparsenetError

FORMAT, VERSION = "sparsenet-model", 2
READABLE = (1, 2)  # the versions load_model reads
ENCODINGS = ("dense", "csr", "relative")
BITS = {"linear": 5, "conv2d": 8}  # relative-index width per layer kind (the paper)


def _layout(spec):
    """``[(name, layer kind, shape, prunable)]`` for every parameter a network description
    declares, in network order, once :func:`~sparsenet.model.check_spec` accepts it (it
    raises SparsenetError otherwise). A layer's weight ``W`` is prunable, its bias is not."""
    shapes = check_spec(spec)
    kinds = {s["name"]: s["kind"] for s in spec["layers"]}
    out = []
    for name, shape in shapes.items():
        layer, key = name.rsplit(".", 1)
        out.append((name, kinds[layer], tuple(shape), key == "W"))
    return out


# ----------------------------------------------------------------------------- storage
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

    Returns ``{"layers": [row, ...], "total": row}``. A row: ``params``, ``weights``
    (prunable entries), ``nonzero`` (surviving weights: connections, mask ones, whatever
    their value), ``density``, ``fillers``, ``dense_bytes``, ``csr_bytes``,
    ``relative_bytes`` (biases dense in all three), ``csr_overhead_pct`` /
    ``relative_overhead_pct`` (index bits over the bits of the surviving weight values)
    and the compression ratios ``ratio_csr``, ``ratio_relative`` (dense bytes over that
    encoding's bytes).
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
    """Bytes on disk of ``net`` exported in each encoding (written to a temporary directory)."""
    with tempfile.TemporaryDirectory() as d:
        sizes = {}
        for enc in ENCODINGS:
            export_model(net, Path(d) / f"{enc}.h5", enc)
            sizes[enc] = os.path.getsize(Path(d) / f"{enc}.h5")
    return sizes


# ----------------------------------------------------------------------------- writing
def _checked_layout(net, path):
    """:func:`_layout` of ``net``'s description, after checking that the description is a
    valid network, that its parameters are the ones it declares and that each obeys the
    pruning rule; a one-line SparsenetError otherwise."""
    params = net.params()
    try:
        layout = _layout(net.spec())
        declared = [(name, shape, prunable) for name, _, shape, prunable in layout]
        have = [(name, tuple(p.data.shape), p.prunable) for name, p in params.items()]
        if have != declared:
            raise SparsenetError(f"its parameters {have} are not the {declared} its description declares")
        for name, p in params.items():
            try:
                p.check()
            except SparsenetError as e:
                raise SparsenetError(f"parameter {name!r}: {e}") from None
    except SparsenetError as e:
        raise SparsenetError(f"{path}: cannot export this network: {e}") from None
    return layout


def export_model(net, path, encoding="relative"):
    """Write ``net``'s parameters and connections to ``path`` (HDF5, atomically) in one of
    :data:`ENCODINGS`.

    Layout and filters: module docstring. A network whose description fails
    :func:`~sparsenet.model.check_spec` (or does not match its parameters) is refused
    with a :class:`SparsenetError` and nothing is written.
    """
    if encoding not in ENCODINGS:
        raise SparsenetError(f"unknown format {encoding!r}: choose from {', '.join(ENCODINGS)}")
    layout, params = _checked_layout(net, path), net.params()
    with h5io.create(path) as f:
        h5io.set_text(f, "format", FORMAT)
        f.attrs["version"] = VERSION
        h5io.set_text(f, "encoding", encoding)
        h5io.set_text(f, "network", json.dumps(net.spec(), separators=(",", ":")))
        group, streams = f.create_group("params"), []
        for name, kind, shape, prunable in layout:
            W, M = asnumpy(params[name].data).astype(numpy.float32), asnumpy(params[name].mask)
            if encoding == "dense" or not prunable:
                h5io.write_dataset(group, name, W)
                if prunable and not M.all():
                    h5io.write_dataset(f.require_group("masks"), name, pack_bits(M, 1), compress=True)
            elif encoding == "csr":
                g = group.create_group(name)
                g.attrs["shape"] = as_matrix(W).shape
                g.attrs["tensor_shape"] = shape
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


# ----------------------------------------------------------------------------- reading
def load_model(path, xp=numpy):
    """Read a model file written by :func:`export_model` (either version) or a training
    checkpoint.

    Returns a :class:`~sparsenet.model.Network` on the array module ``xp`` whose weights
    are exactly the exported ones and whose masks are the stored connections (version 1:
    the rule in the module docstring). Everything is validated before the network is
    allocated (module docstring); a problem raises :class:`SparsenetError` naming the
    file (and the parameter).
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
    try:
        if text is None:
            raise ValueError("attribute 'network' is missing")
        spec = json.loads(text)
        layout = _layout(spec)
    except (SparsenetError, ValueError) as e:
        raise SparsenetError(f"{path}: cannot rebuild the network: {e}") from None
    params = f.get("params")
    if not isinstance(params, h5py.Group):
        raise SparsenetError(f"{path}: group 'params' is missing")
    pruned = [(name, shape) for name, _, shape, prunable in layout if prunable]
    streams = {}
    if encoding == "relative":
        try:
            streams = dict(zip([n for n, _ in pruned], _relative_streams(f, [s for _, s in pruned], version),
                               strict=True))
        except (ValueError, TypeError, OSError) as e:
            raise SparsenetError(f"{path}: relative-index streams: {e}") from None
    arrays = {}
    for name, _, shape, prunable in layout:
        try:
            arrays[name] = _read_weight(f, name, encoding, shape, prunable, version, streams.get(name))
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise SparsenetError(f"{path}: parameter {name!r}: {e}") from None
    try:
        net = build_network(spec, xp=xp)
    except SparsenetError as e:
        raise SparsenetError(f"{path}: cannot rebuild the network: {e}") from None
    for name, p in net.params().items():
        W, M = arrays.pop(name)
        try:
            p.load(to_device(W, xp), to_device(M, xp))
        except SparsenetError as e:
            raise SparsenetError(f"{path}: parameter {name!r}: {e}") from None
    return net


def _member(g, key, cls):
    """``g[key]`` if it exists and is a ``cls`` (h5py.Dataset or h5py.Group)."""
    obj = g.get(key)
    if isinstance(obj, cls):
        return obj
    raise ValueError(f"{'dataset' if cls is h5py.Dataset else 'group'} {key!r} is missing")


def _dataset(g, key, kinds, shape=None):
    """``g[key]`` as a NumPy array after checking that it exists, its dtype kind and shape
    (``shape=None``: any 1-D array). The shape is checked before anything is read."""
    d = _member(g, key, h5py.Dataset)
    if d.dtype.kind not in kinds:
        raise ValueError(f"{key!r} has dtype {d.dtype}, expected {'integers' if 'f' not in kinds else 'float32'}")
    if (d.ndim != 1) if shape is None else (d.shape != tuple(shape)):
        raise ValueError(f"{key!r} has shape {d.shape}, expected {tuple(shape) if shape else '1-D'}")
    return d[()]


def _relative_streams(f, shapes, version):
    """The per-weight ``(bits, n_codes, packed codes, values)`` of a relative file whose
    pruned weights have the declared ``shapes`` (checked against the ``shapes`` attribute
    in version 2)."""
    n = len(shapes)
    d = _member(f, "codes", h5py.Dataset)
    table = [numpy.atleast_1d(d.attrs.get(key, [])).astype(numpy.int64) for key in ("bits", "n_codes", "n_values")]
    if any(t.shape != (n,) for t in table):
        raise ValueError(f"attributes bits, n_codes, n_values of 'codes' must list {n} pruned parameters")
    if version >= 2:
        text = h5io.text_attr(d, "shapes")
        stored = json.loads(text) if text is not None else None
        if stored != [list(s) for s in shapes]:
            raise ValueError(f"attribute shapes of 'codes' is {stored}, expected {[list(s) for s in shapes]} "
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
    return [(int(bits[i]), int(n_codes[i]), codes[cb[i]:cb[i] + nbytes[i]], values[cv[i]:cv[i] + n_values[i]])
            for i in range(n)]


def _read_weight(f, name, encoding, shape, prunable, version, stream=None):
    """``(W, M)``: the float32 value and 0/1 mask of parameter ``name`` (of ``shape``).

    Dense arrays and CSR groups come from ``/params``, a relative weight from its
    ``stream`` (:func:`_relative_streams`); masks as the module docstring says. Raises
    ValueError (or OSError from a damaged file) on any inconsistency.
    """
    if encoding == "dense" or not prunable:
        W = _finite_float32(_dataset(f["params"], name, "f", shape))
        if not prunable:
            return W, numpy.ones_like(W)
        return W, ((W != 0).astype(numpy.float32) if version == 1 else _dense_mask(f, name, shape))
    mshape = (shape[0], math.prod(shape[1:]))
    if encoding == "csr":
        g = _member(f["params"], name, h5py.Group)
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
    W = csr_to_dense(_finite_float32(data), indices, indptr, mshape)
    M = csr_to_dense(numpy.ones_like(data), indices, indptr, mshape)
    return W.reshape(shape), M.reshape(shape)


def _dense_mask(f, name, shape):
    """The mask of prunable weight ``name`` in a version-2 dense file: ``/masks/<name>``
    unpacked, or all ones where the file stores none."""
    masks = f.get("masks")
    if masks is not None and not isinstance(masks, h5py.Group):
        raise ValueError("'masks' is not a group")
    if masks is None or name not in masks:
        return numpy.ones(shape, dtype=numpy.float32)
    try:
        bits = unpack_bits(_dataset(masks, name, "u"), 1, math.prod(shape))
    except ValueError as e:
        raise ValueError(f"mask: {e}") from None
    return bits.reshape(shape).astype(numpy.float32)


def _finite_float32(a):
    if a.dtype != numpy.float32:
        raise ValueError(f"values have dtype {a.dtype}, expected float32")
    if not numpy.all(numpy.isfinite(a)):
        raise ValueError("NaN or infinite values")
    return a
