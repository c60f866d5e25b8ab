"""HDF5 checkpoints: weights, masks, optimiser state, RNG state, epoch and config.

Layout (readable with h5py alone; no pickle anywhere)::

    /                      attrs (text as fixed-length ASCII bytes; str also read):
                                  format="sparsenet-checkpoint", version=1,
                                  network (JSON: Network.spec()), config (JSON),
                                  epoch (int), optimizer (JSON: SGD.state_dict()),
                                  rng (JSON: NumPy bit-generator state, or "null")
    /params/<layer.param>  float32 values, pruned entries exactly 0
    /masks/<layer.param>   uint8, 1 = kept, 0 = pruned
    /velocity/<layer.param> float32 momentum (optional: absent for a bare model)

Files use the HDF5 1.10 object format, whose metadata carries checksums, and every
non-empty dataset is one HDF5 chunk with a Fletcher-32 checksum (:func:`write_dataset`),
so a damaged byte is an error on reading, never a silently different weight or a hang.
Files are written to a temporary name and renamed into place, so a killed run leaves
either the previous checkpoint or the new one. Loading validates everything it reads
and raises :class:`SparsenetError` naming the file and the problem.
"""
import contextlib
import json
from pathlib import Path

import h5py
import numpy

from .backend import asnumpy, to_device
from .model import build_network
from .util import SparsenetError, atomic_path

FORMAT, VERSION = "sparsenet-checkpoint", 1


# HDF5 filters, built into every HDF5 (h5py alone reads the files): a checksum always;
# byte shuffle + deflate (lossless) where ``compress`` asks for it (the sparse streams of
# model files; dense arrays stay raw).
_CHECKSUM = {"fletcher32": True}
_PACKED = {"fletcher32": True, "shuffle": True, "compression": "gzip", "compression_opts": 9}


def write_dataset(g, key, a, compress=False):
    """``g[key] = a`` as one chunk with the filters above. Scalars and empty arrays, which
    HDF5 cannot chunk, are written plain. One chunk: h5py's default chunking would add
    an index of many small chunks (~11 KB on a LeNet-300-100 dense model file)."""
    opts = {**(_PACKED if compress else _CHECKSUM), "chunks": a.shape} if a.ndim and a.size else {}
    return g.create_dataset(key, data=a, track_times=False, **opts)


def save_checkpoint(path, net, optimizer=None, rng=None, epoch=0, config=None):
    """Write ``net`` (and optionally optimiser/RNG state) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        # HDF5 1.10 object format: its object headers carry checksums, so a damaged header
        # is an error on opening (with the 1.8 format one flipped byte made h5py hang)
        with h5py.File(tmp, "w", libver=("v110", "latest")) as f:
            # text as fixed-length (ASCII) bytes, kept in the checksummed object header: a
            # variable-length string lives in HDF5's global heap, which has no checksum,
            # and a damaged heap entry made h5py hang
            f.attrs["format"] = numpy.bytes_(FORMAT)
            f.attrs["version"] = VERSION
            f.attrs["network"] = numpy.bytes_(json.dumps(net.spec()))
            f.attrs["config"] = numpy.bytes_(json.dumps(config or {}))
            f.attrs["epoch"] = int(epoch)
            f.attrs["optimizer"] = numpy.bytes_(json.dumps(optimizer.state_dict() if optimizer else None))
            f.attrs["rng"] = numpy.bytes_(json.dumps(rng.bit_generator.state if rng is not None else None))
            for name, p in net.params().items():
                write_dataset(f, f"params/{name}", asnumpy(p.data))
                write_dataset(f, f"masks/{name}", asnumpy(p.mask).astype(numpy.uint8))
                if optimizer is not None:
                    write_dataset(f, f"velocity/{name}", asnumpy(optimizer.velocity[name]))


class Checkpoint:
    """What :func:`load_checkpoint` returns: ``net`` plus the saved training state."""

    def __init__(self, net, config, epoch, optimizer_state, velocity, rng_state):
        self.net, self.config, self.epoch = net, config, epoch
        self.optimizer_state, self.velocity, self.rng_state = optimizer_state, velocity, rng_state


def _json_attr(f, key, path):
    if key not in f.attrs:
        raise SparsenetError(f"{path}: not a sparsenet checkpoint (attribute {key!r} missing)")
    try:
        return json.loads(f.attrs[key])
    except (TypeError, ValueError) as e:
        raise SparsenetError(f"{path}: attribute {key!r} is not valid JSON ({e})") from None


def _read(f, key, shape, path):
    if key not in f:
        raise SparsenetError(f"{path}: dataset {key!r} is missing")
    d = f[key]
    if not isinstance(d, h5py.Dataset) or tuple(d.shape) != tuple(shape):
        raise SparsenetError(f"{path}: {key!r} has shape {getattr(d, 'shape', None)}, expected {tuple(shape)}")
    a = d[()]
    if not numpy.all(numpy.isfinite(a)):
        raise SparsenetError(f"{path}: {key!r} holds NaN or infinite values")
    return a


def text_attr(f, key):
    """A text attribute (fixed-length bytes, or str as older files have it); None if
    absent or not text."""
    v = f.attrs.get(key)
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    return v if isinstance(v, str) else None


@contextlib.contextmanager
def open_hdf5(path, what="checkpoint"):
    """``with open_hdf5(path) as f``: ``h5py.File(path, "r")``, with h5py's errors as
    :class:`SparsenetError`: the ``what`` file is missing or not readable HDF5 (truncated,
    or not HDF5 at all), or h5py fails inside the block (a damaged header, a checksum
    that does not match: h5py raises KeyError, OSError or RuntimeError)."""
    if not Path(path).is_file():
        raise SparsenetError(f"{path}: no such {what} file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise SparsenetError(f"{path}: not a readable HDF5 file ({e})") from None
    try:
        with f:
            yield f
    except (KeyError, OSError, RuntimeError) as e:
        raise SparsenetError(f"{path}: damaged {what} file ({type(e).__name__}: {e})") from None


def load_checkpoint(path, xp=numpy):
    """Read a checkpoint written by :func:`save_checkpoint` onto the array module ``xp``.

    Checks: the file is HDF5 with the sparsenet format tag; every parameter, mask and
    velocity array is present with the network's shape and finite; masks are 0/1; pruned
    weights (and their momentum) are exactly 0 — a file violating that is rejected rather
    than silently "repaired", because it would mean a pruned connection came back.
    """
    path = Path(path)
    with open_hdf5(path, "checkpoint") as f:
        if text_attr(f, "format") != FORMAT:
            raise SparsenetError(f"{path}: not a sparsenet checkpoint (format tag missing)")
        if int(f.attrs.get("version", -1)) != VERSION:
            raise SparsenetError(f"{path}: checkpoint version {f.attrs.get('version')} is not supported (expected {VERSION})")
        spec = _json_attr(f, "network", path)
        config = _json_attr(f, "config", path)
        opt_state = _json_attr(f, "optimizer", path)
        rng_state = _json_attr(f, "rng", path)
        epoch = int(f.attrs.get("epoch", 0))
        try:
            net = build_network(spec, xp=xp)
        except (SparsenetError, TypeError, ValueError) as e:
            raise SparsenetError(f"{path}: cannot rebuild the network: {e}") from None
        velocity = {}
        for name, p in net.params().items():
            W = _read(f, f"params/{name}", p.data.shape, path).astype(numpy.float32)
            M = _read(f, f"masks/{name}", p.data.shape, path)
            if not numpy.isin(M, (0, 1)).all():
                raise SparsenetError(f"{path}: mask {name!r} holds values other than 0 and 1")
            pruned = M == 0
            if numpy.any(W[pruned] != 0):
                raise SparsenetError(f"{path}: {name!r} has non-zero weights at pruned positions")
            p.data = to_device(W, xp)
            p.mask = to_device(M.astype(numpy.float32), xp)
            if opt_state is not None:
                V = _read(f, f"velocity/{name}", p.data.shape, path).astype(numpy.float32)
                if numpy.any(V[pruned] != 0):
                    raise SparsenetError(f"{path}: momentum of {name!r} is non-zero at pruned positions")
                velocity[name] = to_device(V, xp)
    return Checkpoint(net, config, epoch, opt_state, velocity, rng_state)
