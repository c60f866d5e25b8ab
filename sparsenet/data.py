"""A run's data: MNIST / Fashion-MNIST (IDX files), your own arrays (``npz:FILE``), image folders
(``folder:DIR``, ``imagenet``); :func:`open_splits` is the one place a run gets them. Formats, options
and errors: docs/data.md.

Data set names (``TrainConfig.dataset``, ``--dataset``; :func:`parse_dataset`):

* ``mnist``, ``fashion-mnist``: IDX files (gzip-compressed or raw). Data directory, first match wins:
  the ``data_dir`` argument (``--data-dir``), ``$SPARSENET_DATA``, ``./data``. Each file of dataset
  ``<name>`` is looked for in ``<data_dir>/<name>/``, then in the spec's extra directories (e.g.
  Debian's), as ``<file>.gz`` or ``<file>``; missing ones are downloaded, if allowed, from the spec's
  mirrors in turn (with ``SPARSENET_OFFLINE`` set, as the tests do, only ``file://`` ones). Checksums are
  SHA-256 of the *uncompressed* IDX bytes, so a re-compressed copy still verifies; a download is verified
  before it is renamed into place, files on disk when ``verify=True`` (default). A failed download leaves
  no folder behind.
* ``npz:FILE``: ``x_train``, ``y_train``, ``x_test``, ``y_test`` (optionally ``x_val``, ``y_val``) in a
  ``numpy.savez`` file, read with ``allow_pickle=False``; arrays stored uncompressed are memory-mapped.
  Images ``(N, D)``, ``(N, H, W)`` or ``(N, H, W, C)``, uint8 (divided by 255) or float (finite, as they
  are); labels ``(N,)`` integers (or floats that are whole numbers), ``0 .. n_classes - 1``.
* ``folder:DIR``, ``imagenet``: :class:`sparsenet.imagenet.ImageFolder` (``DIR/train/<class>/*``,
  ``DIR/val/<class>/*`` or ``DIR/test/<class>/*``), its preprocessing from the run config's ``preprocess``.

Everything is checked against the network (input size, number of outputs) before a run writes anything.
"""
import contextlib
import functools
import gzip
import hashlib
import http.client
import json
import math
import os
import re
import struct
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy
from numpy.lib import format as npy_format

from .backend import get_array_module, to_device
from .imagenet import DataError, ImageFolder, Preprocess, held_out_split
from .util import SparsenetError, atomic_path, env_flag, progress_bar, whole

DOWNLOAD_TIMEOUT = 30  # seconds, per network operation
_CHUNK = 1 << 16

# IDX type code -> dtype (multi-byte values are big-endian in the file).
_IDX_TYPES = {code: numpy.dtype(t) for code, t in
              ((0x08, "u1"), (0x09, "i1"), (0x0B, ">i2"), (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8"))}


@dataclass(frozen=True)
class DatasetSpec:
    """Where to find a dataset and how to check it: ``files`` maps file name (no ``.gz``; train images,
    train labels, test images, test labels) to SHA-256; a mirror serves ``<mirror><file>.gz``."""
    name: str
    files: dict
    mirrors: tuple = ()
    extra_dirs: tuple = ()
    image_shape: tuple = (28, 28)


def _files(*sha256):
    return dict(zip(("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                     "t10k-labels-idx1-ubyte"), sha256))


DATASETS = {
    "mnist": DatasetSpec(
        "mnist", _files("ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/")),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist", _files("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        extra_dirs=("/usr/share/datasets/fashion-mnist",)),
}


class Dataset(NamedTuple):
    """Images uint8 ``(N, rows, cols)``; labels int64 ``(N,)``."""
    x_train: numpy.ndarray
    y_train: numpy.ndarray
    x_test: numpy.ndarray
    y_test: numpy.ndarray


def resolve_data_dir(data_dir=None):
    """``data_dir`` if given, else ``$SPARSENET_DATA``, else ``./data``."""
    return Path(data_dir or os.environ.get("SPARSENET_DATA") or "data").expanduser()


def _read_bytes(path, gz=None):
    """The uncompressed bytes of ``path``; gzip if ``gz`` (default: name ends in .gz)."""
    gz = str(path).endswith(".gz") if gz is None else gz
    try:
        if gz:
            with gzip.open(path, "rb") as f:
                return f.read()
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        kind = "corrupt or truncated gzip file" if gz else "cannot read file"
        raise DataError(f"{path}: {kind}: {str(e) or type(e).__name__}") from None


def _parse_idx(data, path):
    """The array held by the IDX bytes ``data`` (``path`` is for messages)."""
    if len(data) < 4 or data[:2] != b"\0\0":
        hint = " (looks gzip-compressed; name it .gz)" if data[:2] == b"\x1f\x8b" else ""
        raise DataError(f"{path}: not an IDX file: bad magic number {data[:4].hex()}{hint}")
    code, ndim = data[2], data[3]
    if code not in _IDX_TYPES:
        supported = ", ".join(f"0x{c:02x} {t.name}" for c, t in _IDX_TYPES.items())
        raise DataError(f"{path}: unsupported IDX data type 0x{code:02x} (supported: {supported})")
    if not 1 <= ndim <= 4:
        raise DataError(f"{path}: unsupported IDX dimension count {ndim} (expected 1 to 4)")
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataError(f"{path}: truncated IDX header: {len(data)} bytes, need {offset}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_TYPES[code]
    declared, found = int(numpy.prod(shape)) * dtype.itemsize, len(data) - offset
    if found != declared:
        kind = "truncated IDX file" if found < declared else "trailing bytes after IDX data"
        raise DataError(f"{path}: {kind}: header declares {declared} bytes of data, found {found}")
    arr = numpy.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))  # a writable, native-order copy


def read_idx(path):
    """Read an IDX file (gzip-compressed if its name ends in .gz) into a NumPy array."""
    return _parse_idx(_read_bytes(path), path)


def _check_sha256(data, expected, path):
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise DataError(f"{path}: checksum mismatch: expected sha256 {expected}, got {actual} "
                        "(corrupt, or not the expected release; delete it to re-download)")


def _find(filename, dirs):
    return next((c for d in dirs for c in (d / (filename + ".gz"), d / filename) if c.is_file()), None)


def _download(spec, filename, dest):
    """Fetch ``<mirror><filename>.gz`` into ``dest``, verified; the last failure if none works. A failed (or
    interrupted) download leaves nothing: :func:`~sparsenet.util.atomic_path` removes its file and the
    folders it made, and with downloads disabled no folder is made at all."""
    reason = "no mirrors configured"
    for mirror in spec.mirrors:
        url = mirror + filename + ".gz"
        try:
            if env_flag("SPARSENET_OFFLINE") and not url.startswith("file:"):
                raise OSError("downloads are disabled (SPARSENET_OFFLINE is set)")
            with atomic_path(dest) as tmp, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as r:
                size = r.headers.get("Content-Length")
                with progress_bar(int(size) if size and size.isdigit() else None, filename, unit="B",
                                  unit_scale=True) or contextlib.nullcontext() as bar, open(tmp, "wb") as f:
                    while chunk := r.read(_CHUNK):
                        f.write(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                _check_sha256(_read_bytes(tmp, gz=True), spec.files[filename], url)
            return None
        except (OSError, ValueError, http.client.HTTPException, DataError) as e:
            reason = f"{url}: {e}" if not isinstance(e, DataError) else str(e)
    return reason


def load_dataset(name="mnist", data_dir=None, download=True, verify=True, spec=None):
    """Load a dataset (``spec``, a :class:`DatasetSpec`, overrides ``name``); raises :class:`DataError`."""
    if spec is None:
        if name not in DATASETS:
            raise DataError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")
        spec = DATASETS[name]
    home = resolve_data_dir(data_dir) / spec.name
    dirs = [home, *map(Path, spec.extra_dirs)]
    fix = (f"put the four files (.gz or uncompressed) in {home.absolute()}, or point "
           f"--data-dir / SPARSENET_DATA at a directory containing {spec.name}/")
    paths = []
    for filename in spec.files:
        path = _find(filename, dirs)
        if path is None:
            missing = f"{spec.name}: missing {filename}(.gz), looked in {', '.join(str(d) for d in dirs)}"
            if not download:
                raise DataError(f"{missing}; {fix}")
            path = home / (filename + ".gz")
            reason = _download(spec, filename, path)
            if reason is not None:
                raise DataError(f"{missing}; download failed: {reason}; {fix}")
        paths.append(path)
    arrays = []
    for filename, path in zip(spec.files, paths):
        data = _read_bytes(path)
        if verify:
            _check_sha256(data, spec.files[filename], path)
        arrays.append((path, _parse_idx(data, path)))
    for (px, x), (py, y) in (arrays[:2], arrays[2:]):
        if x.ndim != 3 or y.ndim != 1:
            raise DataError(f"{px}, {py}: expected 3-D images and 1-D labels, got shapes {x.shape} and {y.shape}")
        if len(x) != len(y):
            raise DataError(f"{px}, {py}: {len(x)} images but {len(y)} labels")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise DataError(f"{py}: labels must be in 0..9, found {y.min()}..{y.max()}")
    (_, xr), (_, yr), (_, xt), (_, yt) = arrays
    return Dataset(xr, yr.astype(numpy.int64), xt, yt.astype(numpy.int64))


def to_float(images):
    """uint8 images as float32 in [0, 1] (divided by 255; one float32 copy, no temporary)."""
    out = numpy.asarray(images).astype(numpy.float32)
    out /= numpy.float32(255)
    return out


# ----------------------------------------------------------------------------- data set names
ALL_DATASETS = (*DATASETS, "imagenet")  # the named ones; besides them npz:FILE and folder:DIR
IMAGE_FOLDERS = ("imagenet", "folder")  # read image by image (ImageFolder), not as arrays
DATASET_FORMS = f"{', '.join(ALL_DATASETS)}, npz:FILE.npz or folder:DIR"


def parse_dataset(name):
    """``(kind, path)`` of a data set name: ``("mnist", None)``, ``("fashion-mnist", None)``,
    ``("imagenet", None)``, ``("npz", Path)`` or ``("folder", Path)``; a one-line error for anything else."""
    if isinstance(name, str):
        if name in ALL_DATASETS:
            return name, None
        kind, sep, path = name.partition(":")
        if sep and kind in ("npz", "folder") and path:
            return kind, Path(path).expanduser()
    raise SparsenetError(f"unknown dataset {name!r}: choose from {DATASET_FORMS}")


def check_dataset(name, base=None):
    """``name`` checked (:func:`parse_dataset`), an ``npz:``/``folder:`` path made absolute (relative to the
    folder ``base``, default the working directory) once the file or folder is found; what a run's config
    stores, so its later commands find the data from any working directory."""
    kind, path = parse_dataset(name)
    if path is None:
        return name
    path = Path(os.path.abspath(Path(base or ".").expanduser() / path))
    if not (path.is_file() if kind == "npz" else path.is_dir()):
        raise DataError(f"{path}: no such {'.npz file' if kind == 'npz' else 'folder'} (dataset {name!r})")
    return f"{kind}:{path}"


def fit_images(image_shape, input_shape, what):
    """Check that images of ``image_shape`` (one image: ``(D,)``, ``(H, W)`` or ``(H, W, C)``) feed a network
    taking ``input_shape``: the same number of values, and, for an image network given images, the same
    ``H, W, C`` (``(H, W)`` for one channel); images are then reshaped to ``input_shape`` (row-major)."""
    image_shape, input_shape = tuple(image_shape), tuple(input_shape)
    size, want, shown = math.prod(image_shape), math.prod(input_shape), "x".join(map(str, image_shape))
    if size != want:
        raise DataError(f"{what}: images are {shown} ({size} values), but the network takes inputs of shape "
                        f"{input_shape} ({want} values)")
    if len(image_shape) > 1 and len(input_shape) == 3 and image_shape not in (
            input_shape, input_shape[:2] if input_shape[2] == 1 else None):
        hint = ("; store images channels-last, (N, H, W, C): x.transpose(0, 2, 3, 1)"
                if image_shape == (input_shape[2], *input_shape[:2]) else "")
        raise DataError(f"{what}: images are {shown}, but the network takes {'x'.join(map(str, input_shape))} "
                        f"images{hint}")


# ----------------------------------------------------------------------------- MNIST, Fashion-MNIST
@functools.lru_cache(maxsize=4)
def _float_images(name, data_dir, train_subset):
    """Host arrays of a dataset as float32 in [0, 1], read once per process and kept."""
    ds = load_dataset(name, data_dir)
    n = train_subset or None  # 0: all
    out = (to_float(ds.x_train[:n]), ds.y_train[:n], to_float(ds.x_test), ds.y_test)
    for a in out:
        a.setflags(write=False)
    return {"train": out[:2], "test": out[2:]}


# ----------------------------------------------------------------------------- npz:FILE
class NpzMember(NamedTuple):
    """An array of an .npz file, from its .npy header: ``offset`` is where its data start in the file when
    it is stored uncompressed (memory-mappable), else None; ``start`` is the header's length."""
    shape: tuple
    dtype: numpy.dtype
    fortran: bool
    info: zipfile.ZipInfo
    start: int
    offset: int | None


_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, RuntimeError, zlib.error,
               NotImplementedError)


NPZ_KEYS = tuple(f"{a}_{s}" for s in ("train", "test", "val") for a in "xy")  # the arrays a data set may hold


def npz_members(path):
    """``{key: NpzMember}`` of the data set's ``.npy`` arrays (:data:`NPZ_KEYS`) in the .npz file ``path``,
    from their headers alone (nothing else is read or decompressed; other members are not looked at). Raises
    :class:`DataError` for a file that is not an npz."""
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            out = {}
            for info in zf.infolist():
                if not info.filename.endswith(".npy") or info.filename[:-4] not in NPZ_KEYS:
                    continue
                with zf.open(info) as f:
                    version = npy_format.read_magic(f)
                    shape, fortran, dtype = (npy_format.read_array_header_1_0 if version == (1, 0) else
                                             npy_format.read_array_header_2_0)(f)
                    start = f.tell()
                offset = None
                if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 1:  # plain, not encrypted
                    raw.seek(info.header_offset)
                    head = raw.read(30)  # the local file header: name and extra-field lengths at bytes 26-29
                    if head[:4] == b"PK\x03\x04":
                        offset = info.header_offset + 30 + sum(struct.unpack("<HH", head[26:30])) + start
                out[info.filename[:-4]] = NpzMember(tuple(shape), dtype, fortran, info, start, offset)
            return out
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except _ZIP_ERRORS as e:
        with contextlib.suppress(OSError), open(path, "rb") as f:
            if f.read(6) == b"\x93NUMPY":
                raise DataError(f"{path}: one .npy array, not an .npz data set; save the arrays with "
                                "numpy.savez(FILE, x_train=..., y_train=..., x_test=..., y_test=...)") from None
        raise DataError(f"{path}: not an .npz file (numpy.savez's zip of .npy arrays): "
                        f"{str(e) or type(e).__name__}") from None


def _check_npz(path, members, input_shape):
    """Keys, dtypes and shapes of every split's arrays, from the headers: ``[split, …]`` present."""
    splits = ["train", "test"] + ["val"] * ("x_val" in members or "y_val" in members)
    if missing := [k for s in splits for k in (f"x_{s}", f"y_{s}") if k not in members]:
        with contextlib.suppress(*_ZIP_ERRORS), zipfile.ZipFile(path) as zf:  # every array's name, for the message
            members = {n[:-4]: None for n in zf.namelist() if n.endswith(".npy")}
        raise DataError(f"{path}: no {', '.join(missing)} array (found: {', '.join(sorted(members)) or 'none'}; an "
                        "npz data set holds x_train, y_train, x_test, y_test and optionally x_val, y_val)")
    for s in splits:
        (kx, x), (ky, y) = ((k, members[k]) for k in (f"x_{s}", f"y_{s}"))
        for key, m in ((kx, x), (ky, y)):
            if m.dtype.hasobject:
                raise DataError(f"{path}: {key} is an object array; only plain numeric arrays are read "
                                "(allow_pickle=False: nothing in the file runs)")
        if x.dtype != numpy.uint8 and x.dtype.kind != "f":
            raise DataError(f"{path}: {kx} has dtype {x.dtype}; images must be uint8 (0..255, divided by 255) or "
                            "floating point (used as they are)")
        if y.dtype.kind not in "iuf":
            raise DataError(f"{path}: {ky} has dtype {y.dtype}; labels must be integers (class indices)")
        if not 2 <= len(x.shape) <= 4 or len(y.shape) != 1:
            raise DataError(f"{path}: {kx} has shape {x.shape} and {ky} {y.shape}; expected images (N, D), "
                            "(N, H, W) or (N, H, W, C) and labels (N,)")
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{path}: {kx} has {x.shape[0]} images but {ky} {y.shape[0]} labels")
        if x.shape[0] == 0 or 0 in x.shape:
            raise DataError(f"{path}: {kx} is empty (shape {x.shape})")
        fit_images(x.shape[1:], input_shape, f"{path}: {kx}")
    return splits


def _npz_array(path, m, rows=None):
    """The first ``rows`` (all: None) of member ``m`` of the .npz file ``path``: memory-mapped when stored
    uncompressed, else decompressed and read whole."""
    nbytes = math.prod(m.shape) * m.dtype.itemsize
    try:
        if m.offset is not None and not m.fortran:
            if m.info.file_size != m.start + nbytes or os.path.getsize(path) < m.offset + nbytes:
                raise ValueError(f"{m.info.filename} is truncated")
            return numpy.memmap(path, m.dtype, "r", m.offset, m.shape)[:rows]
        with zipfile.ZipFile(path) as zf, zf.open(m.info) as f:
            return npy_format.read_array(f, allow_pickle=False)[:rows]
    except _ZIP_ERRORS as e:
        raise DataError(f"{path}: cannot read {m.info.filename}: {str(e) or type(e).__name__}") from None


def _npz_labels(y, what):
    """Labels as int64: integers, or floats that are whole numbers, all >= 0."""
    if y.dtype.kind == "f" and (bad := ~(numpy.isfinite(y) & (y == numpy.round(y)))).any():
        raise DataError(f"{what}: labels must be whole numbers (class indices 0, 1, …), found {y[bad][0]}")
    if y.size and (y.min() < 0 or y.max() >= 2**31):
        raise DataError(f"{what}: labels must be class indices 0, 1, …, found {y.min() if y.min() < 0 else y.max()}")
    return y.astype(numpy.int64)


def _npz_images(x, what):
    """Images as float32: uint8 divided by 255, floats as they are (finite after the conversion)."""
    if x.dtype == numpy.uint8:
        return to_float(x)
    with numpy.errstate(over="ignore", invalid="ignore"):
        out = x.astype(numpy.float32)
        if not numpy.isfinite(out).all():
            raise DataError(f"{what}: images hold NaN or infinite values (as float32)")
    return out


@functools.lru_cache(maxsize=4)
def _npz_read(path, stamp, train_subset):
    """``{split: (x float32, y int64)}`` of a checked .npz file (``stamp``: its size and mtime, so a rewritten
    file is read again), read once per process and kept."""
    members, out = npz_members(path), {}
    for s in ("train", "test", "val"):
        if f"x_{s}" in members:
            rows = train_subset or None if s == "train" else None
            x = _npz_images(_npz_array(path, members[f"x_{s}"], rows), f"{path}: x_{s}")
            out[s] = (x, _npz_labels(_npz_array(path, members[f"y_{s}"], rows), f"{path}: y_{s}"))
            for a in out[s]:
                a.setflags(write=False)
    return out


def load_npz(path, input_shape, train_subset=0):
    """``{"train": (x, t), "test": (x, t)}`` (and ``"val"`` when the file has it) on the host: float32 images
    flat as stored, int64 labels; every array checked against ``input_shape`` (:func:`fit_images`) from the
    headers before any data are read."""
    path = Path(path)
    _check_npz(path, npz_members(path), input_shape)
    st = path.stat()
    return _npz_read(str(path.absolute()), (st.st_size, st.st_mtime_ns), train_subset)


# ----------------------------------------------------------------------------- arrays of a data set
def load_split(dataset, input_shape, xp, data_dir=None, train_subset=0, split="both", n_classes=None):
    """``{"train": (x, t), "test": (x, t)}`` (or one of them, ``split``; ``"val"`` for an npz file that has
    it) on the array module ``xp``: float32 images shaped ``(N, *input_shape)``, int64 labels (beyond
    ``n_classes``: an error). ``dataset``: ``mnist``, ``fashion-mnist`` or ``npz:FILE``."""
    whole(train_subset, "train_subset")
    kind, path = parse_dataset(dataset)
    if kind in IMAGE_FOLDERS:
        raise SparsenetError(f"{dataset} is read image by image: use open_splits, not load_split")
    if kind == "npz":
        arrays = load_npz(path, input_shape, train_subset)
    else:
        spec = DATASETS[dataset]
        if math.prod(input_shape) != math.prod(spec.image_shape):  # before reading anything
            raise SparsenetError(f"the network takes inputs of shape {tuple(input_shape)}, but {dataset} images are "
                                 f"{'x'.join(map(str, spec.image_shape))}")
        arrays = _float_images(dataset, str(resolve_data_dir(data_dir).absolute()), train_subset)
        fit_images(arrays["test"][0].shape[1:], input_shape, dataset)
    if split not in ("both", *arrays):
        raise SparsenetError(f"{dataset} has no {split!r} split (it has {', '.join(arrays)})")
    if n_classes is not None and (top := max(int(y.max(initial=0)) for _, y in arrays.values())) >= n_classes:
        raise DataError(f"the network has {n_classes} outputs, but {dataset} has labels up to {top}")
    return {s: (to_device(x.reshape((-1, *input_shape)), xp), to_device(y, xp))
            for s, (x, y) in arrays.items() if split == s or split == "both" and s != "val"}


# ----------------------------------------------------------------------------- splits the run engine reads
class ArraySplit:
    """Images ``x`` (N, …) and labels ``t`` (N,) held on the device (MNIST, npz); batches by index."""

    def __init__(self, x, t):
        self.x, self.t = x, t

    def __len__(self):
        return len(self.x)

    def batches(self, batch_size, rng=None, train=False, xp=None):
        """``(x, t)`` batches in the order ``rng.permutation(N)`` (a NumPy Generator), or as stored."""
        order = get_array_module(self.x).asarray(rng.permutation(len(self))) if rng is not None else None
        for start in range(0, len(self), batch_size):
            idx = slice(start, start + batch_size) if order is None else order[start:start + batch_size]
            yield self.x[idx], self.t[idx]


def imagenet_root(data_dir=None):
    """The ILSVRC-2012 folder: ``data_dir`` (``--data-dir``/``--imagenet``, else ``$SPARSENET_DATA``, else
    ``./data``) when it holds ``train/`` or ``val/``, else its ``imagenet/`` subfolder."""
    root = resolve_data_dir(data_dir)
    return root if (root / "train").is_dir() or (root / "val").is_dir() else root / "imagenet"


def image_preprocess(given, input_shape, dataset):
    """The :class:`~sparsenet.imagenet.Preprocess` of the image-folder data set ``dataset`` (``imagenet`` or
    ``folder:DIR``) for a network taking ``input_shape`` (``(S, S, 1)`` or ``(S, S, 3)``): ``given`` (a run
    config's ``preprocess``, a dict; None: the defaults) over the defaults ``size`` S, ``grayscale`` for one
    channel, and for ``folder:`` data sets ``mode="unit"``, ``resize`` = ``size`` (no crop), ``mirror`` false."""
    shape = tuple(input_shape)
    if len(shape) != 3 or shape[0] != shape[1] or shape[2] not in (1, 3):
        raise SparsenetError(f"{dataset}: image folders feed networks that take square images (S, S, 1) or "
                             f"(S, S, 3); this one takes {shape}")
    given = {} if given is None else given
    if not isinstance(given, dict):
        return Preprocess.from_dict(given)  # its one-line error
    size = given.get("size", shape[0])
    folder = {"mode": "unit", "resize": size, "mirror": False} if dataset != "imagenet" else {}
    merged = {"size": size, "grayscale": shape[2] == 1, **folder, **given}
    if "grayscale" not in given and shape[2] == 1 and merged.get("mode", "caffe") != "unit":
        raise SparsenetError(f"{dataset}: grayscale images (the network takes {shape}) need preprocess mode "
                             f"'unit'; mode {merged.get('mode', 'caffe')!r} normalises RGB images")
    pre = Preprocess.from_dict(merged)
    if (pre.size, pre.size, pre.channels) != shape:
        raise SparsenetError(f"{dataset}: the network takes inputs of shape {shape}, but the preprocessing makes "
                             f"{pre.size}x{pre.size}x{pre.channels} images (preprocess size, grayscale)")
    return pre


def parse_preprocess(text):
    """``--preprocess``: a JSON object, or ``key=value`` pairs (``mode=torch,resize=256,grayscale=true``;
    whole numbers become ints, true/false booleans). Checked with the network by :func:`image_preprocess`."""
    text = text.strip()
    if text.startswith("{"):
        try:
            d = json.loads(text)
        except ValueError as e:
            raise SparsenetError(f"--preprocess is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise SparsenetError("--preprocess must be a JSON object")
        return d
    d = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise SparsenetError(f"--preprocess {text!r}: expected key=value pairs such as mode=unit,resize=32")
        d[key] = int(value) if re.fullmatch(r"[0-9]+", value) else {"true": True, "false": False}.get(
            value.lower(), value)
    return d


def open_splits(config, net, xp, data_dir=None, split="both"):
    """A run's data as ``{"train": …, "test": …}`` (or one, ``split``): :class:`ArraySplit` for MNIST,
    Fashion-MNIST and npz files, :class:`~sparsenet.imagenet.ImageFolder` for ImageNet and ``folder:``
    data sets (test images from ``val/``, else ``test/``; preprocessing :func:`image_preprocess`). Everything
    is checked against ``net`` (input shape, outputs) before this returns. ``config``: dataset, train_subset,
    test_subset (image folders only), preprocess (image folders only)."""
    name = config.get("dataset", "mnist")
    kind, path = parse_dataset(name)
    if kind not in IMAGE_FOLDERS:
        d = load_split(name, net.input_shape, xp, data_dir, config.get("train_subset", 0), split, net.n_classes)
        return {k: ArraySplit(*v) for k, v in d.items()}
    pre = image_preprocess(config.get("preprocess"), net.input_shape, name)
    root = imagenet_root(data_dir) if kind == "imagenet" else path
    folders = {"train": "train", "test": held_out_split(root)}
    out = {s: ImageFolder(root, folders[s], pre, subset=config.get(f"{s}_subset", 0))
           for s in ("train", "test") if split in ("both", s)}
    for f in out.values():
        if f.n_classes > net.n_classes:
            raise DataError(f"the network has {net.n_classes} outputs, but {root} has {f.n_classes} classes")
    return out


def first_images(split, n, xp):
    """The first ``n`` images and labels of a split as arrays (statistics on a sample of ImageNet)."""
    xs, ts = [], []
    for x, t in split.batches(min(n, 64), xp=xp):
        xs.append(x)
        ts.append(t)
        if sum(map(len, ts)) >= n:
            break
    return xp.concatenate(xs)[:n], xp.concatenate(ts)[:n]


def test_arrays(config, net, xp, data_dir=None, limit=1000):
    """The test images and labels of a run's dataset as arrays: all of an array data set (MNIST, npz), the
    first ``limit`` of an image folder's (the per-layer report's activation statistics)."""
    test = open_splits(config, net, xp, data_dir, "test")["test"]
    return (test.x, test.t) if isinstance(test, ArraySplit) else first_images(test, limit, xp)
