"""The HDF5 container shared by checkpoints and model files (no pickle anywhere).

:func:`create` writes to a temporary name renamed into place at the end, in the HDF5 1.10
object format (checksummed headers), with no free-space manager and text attributes as
fixed-length bytes (kept in the checksummed header; a damaged variable-length string in
the global heap made h5py hang). :func:`write_dataset` stores each array as one chunk with
a Fletcher-32 checksum, so a damaged byte is an error, never a different weight.
:func:`open_file` turns h5py's errors into one-line errors (:class:`SparsenetError`).
"""
import contextlib
import json
from pathlib import Path

import h5py
import numpy

from .util import SparsenetError, atomic_path, checked_cast

# Filters built into every HDF5 (h5py alone reads the files): a checksum always; byte
# shuffle + deflate (lossless) where ``compress`` asks for it (sparse streams).
_CHECKSUM = {"fletcher32": True}
_PACKED = {"fletcher32": True, "shuffle": True, "compression": "gzip", "compression_opts": 6}  # 9: 16x slower, 0.4% smaller


@contextlib.contextmanager
def create(path):
    """``with create(path) as f``: a new HDF5 file, renamed onto ``path`` on success."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w", libver=("v110", "latest"), fs_strategy="none") as f:
        yield f


def write_dataset(g, key, a, compress=False):
    """``g[key] = a`` as one chunk with the filters above. Scalars and empty arrays, which
    HDF5 cannot chunk, are written plain. One chunk: h5py's default chunking would add
    an index of many small chunks (~11 KB on a LeNet-300-100 dense model file)."""
    a = numpy.asarray(a)
    opts = {**(_PACKED if compress else _CHECKSUM), "chunks": a.shape} if a.ndim and a.size else {}
    return g.create_dataset(key, data=a, track_times=False, **opts)


def set_text(obj, key, text):
    """A text attribute as fixed-length bytes (see the module docstring)."""
    obj.attrs[key] = numpy.bytes_(text)


def text_attr(obj, key):
    """A text attribute (fixed-length bytes, or str as older files have it); None if absent or not text."""
    v = obj.attrs.get(key)
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    return v if isinstance(v, str) else None


def json_attr(obj, key, path, what="file"):
    """The JSON value of text attribute ``key``; a one-line error if absent or invalid."""
    text = text_attr(obj, key)
    if text is None:
        raise SparsenetError(f"{path}: not a sparsenet {what} (attribute {key!r} missing)")
    try:
        return json.loads(text)
    except ValueError as e:
        raise SparsenetError(f"{path}: attribute {key!r} is not valid JSON ({e})") from None


def read_array(g, key, path, shape=None, kinds="fiub", dtype=None, exact=False):
    """Dataset ``g[key]`` as a NumPy array of ``dtype`` (default: as stored), checked: present, a
    dataset, of ``shape`` (if given), of a dtype kind in ``kinds``, then converted and checked by
    :func:`sparsenet.util.checked_cast` (finite and in range *after* the conversion; ``exact``: no
    value changed by it)."""
    d = g.get(key)
    if not isinstance(d, h5py.Dataset):
        raise SparsenetError(f"{path}: dataset {key!r} is missing")
    if shape is not None and tuple(d.shape) != tuple(shape):
        raise SparsenetError(f"{path}: {key!r} has shape {tuple(d.shape)}, expected {tuple(shape)}")
    if d.dtype.kind not in kinds:
        raise SparsenetError(f"{path}: {key!r} has dtype {d.dtype}")
    a = d[()]
    return checked_cast(a, a.dtype if dtype is None else dtype, f"{path}: {key!r}", exact)


@contextlib.contextmanager
def open_file(path, what="checkpoint"):
    """``with open_file(path) as f``: ``h5py.File(path, "r")``, with h5py's errors as :class:`SparsenetError`:
    the ``what`` file is missing or not readable HDF5 (truncated, or not HDF5 at all), or h5py fails inside
    the block (a damaged header, a checksum that does not match: h5py raises KeyError, OSError or RuntimeError)."""
    if not Path(path).is_file():
        hint = f" (a run folder? try {Path(path) / 'checkpoint.h5'})" if Path(path).is_dir() else ""
        raise SparsenetError(f"{path}: no such {what} file{hint}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise SparsenetError(f"{path}: not a readable HDF5 file ({e})") from None
    try:
        with f:
            yield f
    except (KeyError, OSError, RuntimeError) as e:
        raise SparsenetError(f"{path}: damaged {what} file ({type(e).__name__}: {e})") from None
