"""MNIST / Fashion-MNIST loader for the IDX file format (gzip-compressed or raw).

Data directory, first match wins: the ``data_dir`` argument (``--data-dir``), ``$SPARSENET_DATA``,
``./data``. Each file of dataset ``<name>`` is looked for in ``<data_dir>/<name>/``, then in the
spec's extra directories (e.g. Debian's), as ``<file>.gz`` or ``<file>``; missing ones are
downloaded, if allowed, from the spec's mirrors in turn (with ``SPARSENET_OFFLINE`` set, as the
tests do, only ``file://`` ones). Checksums are SHA-256 of the *uncompressed* IDX bytes, so a
re-compressed copy still verifies; a download is verified before it is renamed into place, files
on disk when ``verify=True`` (default).
"""
import contextlib
import functools
import gzip
import math
import hashlib
import http.client
import os
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy

from .backend import get_array_module, to_device
from .util import SparsenetError, atomic_path, env_flag, progress_bar

DOWNLOAD_TIMEOUT = 30  # seconds, per network operation
_CHUNK = 1 << 16

# IDX type code -> dtype (multi-byte values are big-endian in the file).
_IDX_TYPES = {code: numpy.dtype(t) for code, t in
              ((0x08, "u1"), (0x09, "i1"), (0x0B, ">i2"), (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8"))}


class DataError(SparsenetError):
    """A data file is missing, unreadable, malformed or fails its checksum."""


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
    """Fetch ``<mirror><filename>.gz`` into ``dest``, verified; the last failure if none works."""
    reason = "no mirrors configured"
    for mirror in spec.mirrors:
        url = mirror + filename + ".gz"
        try:
            with atomic_path(dest) as tmp:
                if env_flag("SPARSENET_OFFLINE") and not url.startswith("file:"):
                    raise OSError("downloads are disabled (SPARSENET_OFFLINE is set)")
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as r:
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
    """uint8 images as float32 in [0, 1] (divided by 255)."""
    return numpy.asarray(images).astype(numpy.float32) / numpy.float32(255)


@functools.lru_cache(maxsize=4)
def _float_images(name, data_dir, train_subset):
    """Host arrays of a dataset as float32 in [0, 1], read once per process and kept."""
    ds = load_dataset(name, data_dir)
    n = train_subset or None  # 0: all
    out = (to_float(ds.x_train[:n]), ds.y_train[:n], to_float(ds.x_test), ds.y_test)
    for a in out:
        a.setflags(write=False)
    return out


def load_split(dataset, input_shape, xp, data_dir=None, train_subset=0, split="both", n_classes=None):
    """``{"train": (x, t), "test": (x, t)}`` (or one of them, ``split``) on the array module ``xp``:
    float32 images in [0, 1] shaped ``(N, *input_shape)``, int64 labels (beyond ``n_classes``: an error)."""
    if not isinstance(train_subset, int) or train_subset < 0:
        raise SparsenetError(f"train_subset must be a whole number >= 0, got {train_subset!r}")
    spec = DATASETS.get(dataset)
    if spec is not None and math.prod(input_shape) != math.prod(spec.image_shape):  # before reading anything
        raise SparsenetError(f"the network takes inputs of shape {tuple(input_shape)}, but {dataset} images are "
                             f"{'x'.join(map(str, spec.image_shape))}")
    xr, yr, xt, yt = _float_images(dataset, str(resolve_data_dir(data_dir).absolute()), train_subset)
    size = math.prod(xt.shape[1:])
    if math.prod(input_shape) != size:
        raise SparsenetError(f"the network takes inputs of shape {tuple(input_shape)}, but {dataset} images are "
                             f"{'x'.join(map(str, xt.shape[1:]))} ({size} values)")
    if n_classes is not None and (top := max(int(yr.max(initial=0)), int(yt.max(initial=0)))) >= n_classes:
        raise SparsenetError(f"the network has {n_classes} outputs, but {dataset} has labels up to {top}")
    return {s: (to_device(x.reshape((-1, *input_shape)), xp), to_device(y, xp))
            for s, x, y in (("train", xr, yr), ("test", xt, yt)) if split in ("both", s)}


# ----------------------------------------------------------------------------- splits the run engine reads
ALL_DATASETS = (*DATASETS, "imagenet")


class ArraySplit:
    """Images ``x`` (N, …) and labels ``t`` (N,) held on the device (MNIST); batches by index."""

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


def open_splits(config, net, xp, data_dir=None, split="both"):
    """A run's data as ``{"train": …, "test": …}`` (or one, ``split``): :class:`ArraySplit` for the IDX
    datasets, :class:`sparsenet.imagenet.ImageFolder` (its ``preprocess`` from ``config``) for ImageNet.
    ``config``: dataset, train_subset, test_subset (ImageNet only), preprocess."""
    name = config.get("dataset", "mnist")
    if name != "imagenet":
        d = load_split(name, net.input_shape, xp, data_dir, config.get("train_subset", 0), split, net.n_classes)
        return {k: ArraySplit(*v) for k, v in d.items()}
    from .imagenet import ImageFolder, Preprocess

    pre = Preprocess.from_dict(config.get("preprocess") or {"size": net.input_shape[0]})
    if (pre.size, pre.size, 3) != tuple(net.input_shape):
        raise SparsenetError(f"the network takes inputs of shape {tuple(net.input_shape)}, but the ImageNet "
                             f"preprocessing crops {pre.size}x{pre.size}x3")
    return {s: ImageFolder(imagenet_root(data_dir), "train" if s == "train" else "val", pre,
                           subset=config.get(f"{s}_subset", 0)) for s in ("train", "test") if split in ("both", s)}


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
    """The test images and labels of a run's dataset as arrays: all of an IDX dataset, the first
    ``limit`` of ImageNet's validation set (the per-layer report's activation statistics)."""
    test = open_splits(config, net, xp, data_dir, "test")["test"]
    return (test.x, test.t) if isinstance(test, ArraySplit) else first_images(test, limit, xp)
