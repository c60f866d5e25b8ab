"""Images from a folder tree (ILSVRC-2012 / ImageNet, or any ``folder:DIR`` data set), preprocessing
(Caffe, torchvision, or plain [0, 1] values; RGB or grayscale), top-k errors; and :class:`DataError`.

Layout under a root ``DIR`` (image files: .JPEG, .jpg, .jpeg or .png, any case; hidden entries ignored):

* ``DIR/train/<class>/*.JPEG``: class ``i`` is the ``i``-th class folder name in sorted order (ImageNet's
  class folders are its wnids);
* ``DIR/val/<class>/*.JPEG`` or ``DIR/test/<class>/*.JPEG`` (classes through the train folders when
  ``DIR/train`` exists, else the sorted val/test folders), or flat ``DIR/val/*.JPEG`` with a label file in
  ``DIR/val`` or ``DIR`` (first found): Caffe's ``val.txt`` (``ILSVRC2012_val_00000001.JPEG 65`` per
  line, class indices) or Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the id is the
  file name without extension, the prediction string starts with the wnid).

File order: classes in index order, each class's files sorted by name (flat val: sorted by name).
Decoding needs Pillow (``pip install Pillow``), imported only when images are read. This module imports
nothing else of the package's data code, so :mod:`sparsenet.data` imports it (and its :class:`DataError`)
at the top, without an import cycle.
"""
import collections
import csv
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy

from .backend import get_array_module, to_device
from .util import SparsenetError, whole

EXTS = (".jpeg", ".jpg", ".png")
MODES = ("caffe", "torch", "unit")
SPLITS = ("train", "val", "test")
CAFFE_MEAN_BGR = numpy.array([104, 117, 123], numpy.float32)
TORCH_MEAN = numpy.array([0.485, 0.456, 0.406], numpy.float32)
TORCH_STD = numpy.array([0.229, 0.224, 0.225], numpy.float32)
_BAD_IMAGE = (OSError, ValueError, SyntaxError, EOFError)  # what PIL raises on corrupt or non-image files


class DataError(SparsenetError):
    """A data file is missing, unreadable, malformed or fails its checksum (also :mod:`sparsenet.data`'s)."""


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise SparsenetError("reading images needs Pillow: pip install Pillow "
                             "(or pip install -e '.[imagenet]' in a sparsenet checkout)") from None
    return Image


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a float32 ``(size, size, C)`` NHWC network input, ``C = 3`` (RGB) or, with
    ``grayscale``, 1 (PIL's ``L``: ``0.299 R + 0.587 G + 0.114 B``). ``a``: the decoded image, resized
    with PIL's bilinear filter (antialiased when shrinking), as float32 values 0..255; ``c`` indexes channels.

    * ``mode="caffe"`` (BVLC AlexNet, ONNX zoo bvlcalexnet): squash to ``resize × resize`` (as Caffe's
      convert_imageset), then BGR minus the mean: ``x[..., c] = a[..., 2 - c] - (104, 117, 123)[c]``;
    * ``mode="torch"`` (torchvision/timm VGG-16, ONNX zoo vgg16): shorter side to ``resize``, the longer
      to ``int(resize * long / short)`` (torchvision's rule), then
      ``x[..., c] = (a[..., c] / 255 - (0.485, 0.456, 0.406)[c]) / (0.229, 0.224, 0.225)[c]``;
    * ``mode="unit"`` (any network trained on [0, 1] pixels, as the MNIST ones): squash to
      ``resize × resize`` as caffe mode, then ``x = a / 255``. The only mode for ``grayscale`` images.

    Then a ``size × size`` crop of the resized ``H × W`` image: evaluation takes the centre, top
    ``(H - size) // 2`` in caffe and unit modes (Caffe's) and ``round((H - size) / 2)`` in torch mode
    (torchvision's), likewise left; training takes top ``floor(u0 * (H - size + 1))``, left
    ``floor(u1 * (W - size + 1))`` and, if ``mirror``, mirrors (``x[:, ::-1]``) when ``u2 < 0.5``, for
    uniforms ``u0, u1, u2`` in [0, 1) (Caffe's training transform; in torch mode too: a fixed-scale crop as
    VGG's S = 256, not torchvision's RandomResizedCrop)."""
    mode: str = "caffe"
    size: int = 227
    resize: int = 256
    grayscale: bool = False
    mirror: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise SparsenetError(f"preprocess mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        whole(self.size, "preprocess size", 1)
        whole(self.resize, "preprocess resize", 1)
        if self.resize < self.size:
            raise SparsenetError(f"preprocess resize ({self.resize}) must be >= size ({self.size})")
        for key in ("grayscale", "mirror"):
            if not isinstance(getattr(self, key), bool):
                raise SparsenetError(f"preprocess {key} must be true or false, got {getattr(self, key)!r}")
        if self.grayscale and self.mode != "unit":
            raise SparsenetError(f"preprocess grayscale needs mode 'unit' (the {self.mode} normalisation is for "
                                 "RGB images)")

    @property
    def channels(self):
        """Channels of the network input: 1 (grayscale) or 3 (RGB)."""
        return 1 if self.grayscale else 3

    @classmethod
    def from_dict(cls, d):
        """From a dict such as :meth:`to_dict` makes (missing keys take their defaults)."""
        names = [f.name for f in fields(cls)]
        if not isinstance(d, dict) or set(d) - set(names):
            raise SparsenetError(f"preprocess must be a dict with keys among {', '.join(names)}, got {d!r}")
        return cls(**d)

    def to_dict(self):
        """``{"mode", "size", "resize", "grayscale", "mirror"}``, JSON-able."""
        return asdict(self)

    def resized(self, w, h):
        """``(width, height)`` an image of ``w × h`` pixels is resized to before cropping."""
        if self.mode != "torch":
            return self.resize, self.resize
        short, long = sorted((w, h))
        return (self.resize, int(self.resize * long / short))[:: 1 if w <= h else -1]


def load_image(path, pre=Preprocess(), u=None, out=None):
    """Image file ``path`` as float32 ``(size, size, C)`` (written into ``out`` if given): centre crop,
    or with ``u = (u0, u1, u2)`` the training crop and mirror (see :class:`Preprocess`). Every colour
    mode (grayscale, CMYK, palette, RGBA) is converted to RGB, or with ``pre.grayscale`` to PIL's ``L``;
    a file PIL cannot read is a :class:`DataError`."""
    Image, s = _pil(), pre.size
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):  # 16-bit grey: to 8 bits (convert would clip)
                im = Image.fromarray((numpy.asarray(im, dtype=numpy.uint32) // 257).astype(numpy.uint8))
            elif im.mode in ("I", "F"):
                raise DataError(f"{path}: a {'32-bit integer' if im.mode == 'I' else 'floating-point'} image; "
                                "convert it to 8 or 16 bits per channel")
            im = im.convert("L" if pre.grayscale else "RGB")
        w, h = pre.resized(*im.size)
        a = numpy.asarray(im.resize((w, h), Image.BILINEAR)).reshape(h, w, pre.channels)
    except (*_BAD_IMAGE, Image.DecompressionBombError) as e:
        unknown = isinstance(e, Image.UnidentifiedImageError)
        why = "not an image file PIL knows" if unknown else f"{type(e).__name__}: {e}"
        raise DataError(f"{path}: cannot read image ({why})") from None
    dh, dw = a.shape[0] - s, a.shape[1] - s
    if u is None:
        top, left, flip = ((dh // 2, dw // 2) if pre.mode != "torch" else (round(dh / 2), round(dw / 2))) + (False,)
    else:
        top, left, flip = int(u[0] * (dh + 1)), int(u[1] * (dw + 1)), pre.mirror and u[2] < 0.5
    a = a[top:top + s, left:left + s, :].astype(numpy.float32)
    a = a[:, ::-1] if flip else a
    x = (a[..., ::-1] - CAFFE_MEAN_BGR if pre.mode == "caffe" else a / numpy.float32(255) if pre.mode == "unit"
         else (a / numpy.float32(255) - TORCH_MEAN) / TORCH_STD)
    if out is None:
        return x
    out[...] = x
    return out


def _scandir(d, dirs):
    """Sorted names of the visible sub-folders (``dirs``) or image files of folder ``d``."""
    with os.scandir(d) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and (
            e.is_dir() if dirs else e.is_file() and os.path.splitext(e.name)[1].lower() in EXTS))


def _label_file(root, d, files, wnids):
    """Labels of the flat images ``files`` of folder ``d``, from val.txt or LOC_val_solution.csv;
    returns ``(labels, wnids)`` (wnids None when only class indices are known)."""
    found = [p for n in ("val.txt", "LOC_val_solution.csv") for p in (d / n, root / n) if p.is_file()]
    if not found:
        raise DataError(f"{d}: images but no class folders and no label file (val.txt or LOC_val_solution.csv "
                        f"in {d} or {root})")
    path, entries = found[0], []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if path.suffix == ".txt":
        for no, parts in enumerate((line.split() for line in lines), 1):
            if parts and (len(parts) != 2 or not re.fullmatch(r"-?[0-9]+", parts[1])):
                raise DataError(f"{path}:{no}: expected '<file name> <class index>', got {' '.join(parts)!r}")
            entries += [(no, parts[0], int(parts[1]))] if parts else []
        key = lambda f: f
    else:
        rows = list(csv.reader(lines))
        if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
            raise DataError(f"{path}: expected the header 'ImageId,PredictionString'")
        for no, row in enumerate(rows[1:], 2):
            if row and (len(row) < 2 or not row[1].split()):
                raise DataError(f"{path}:{no}: expected '<image id>,<wnid> ...', got {','.join(row)!r}")
            entries += [(no, row[0].strip(), row[1].split()[0])] if row else []
        wnids = wnids or sorted({w for _, _, w in entries})
        index = {w: i for i, w in enumerate(wnids)}
        if bad := sorted({w for _, _, w in entries if w not in index}):
            raise DataError(f"{path}: {len(bad)} wnids not among the {len(wnids)} train classes, e.g. {bad[0]}")
        entries = [(no, k, index[w]) for no, k, w in entries]
        key = lambda f: os.path.splitext(f)[0]
    named = {}
    for no, k, v in entries:
        if k in named:
            raise DataError(f"{path}:{no}: {k} is listed twice")
        named[k] = v
    by_key = {key(f): f for f in files}
    if unknown := sorted(k for k in named if k not in by_key):
        raise DataError(f"{path}: names {len(unknown)} files not in {d}, e.g. {unknown[0]}")
    if unlabelled := [f for k, f in by_key.items() if k not in named]:
        raise DataError(f"{d}: {len(unlabelled)} images have no label in {path}, e.g. {unlabelled[0]}")
    labels = numpy.array([named[key(f)] for f in files], numpy.int64)
    n = len(wnids) if wnids else int(labels.max()) + 1
    if (bad := numpy.flatnonzero((labels < 0) | (labels >= n))).size:
        raise DataError(f"{path}: label {labels[bad[0]]} of {files[bad[0]]} is out of range 0..{n - 1} ({n} classes)")
    return labels, wnids


def scan(root, split):
    """``(paths, labels, wnids)`` of a split (``train``, ``val`` or ``test``: the sub-folder) in file order:
    paths (str), int64 labels, the class names (ImageNet's wnids; None for a flat val with val.txt and no
    train folder)."""
    root = Path(root).expanduser()
    if split not in SPLITS:
        raise SparsenetError(f"split must be train, val or test, got {split!r}")
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (expected a folder with train/ and val/ in it)")
    d = root / split
    if not d.is_dir():
        raise DataError(f"{root}: no {split}/ folder (expected {d}/<class>/*.JPEG)")
    train = _scandir(root / "train", True) if (root / "train").is_dir() else []
    classes = train if split == "train" else _scandir(d, True)
    if not classes:
        files = _scandir(d, False)
        if split == "train" or not files:
            raise DataError(f"{d}: no class folders (expected {d}/<class>/*.JPEG)")
        labels, wnids = _label_file(root, d, files, train or None)
        return [str(d / f) for f in files], labels, wnids
    wnids = train or classes
    index = {w: i for i, w in enumerate(wnids)}
    if bad := [w for w in classes if w not in index]:
        raise DataError(f"{d}: {len(bad)} class folders not among the {len(wnids)} train classes, e.g. {bad[0]}")
    paths, labels = [], []
    for w in classes:
        if not (files := _scandir(d / w, False)):
            raise DataError(f"{d / w}: no images (.JPEG, .jpg, .jpeg or .png)")
        paths += [str(d / w / f) for f in files]
        labels += [index[w]] * len(files)
    return paths, numpy.array(labels, numpy.int64), wnids


def subset_indices(labels, n):
    """Indices (ascending) of the first ``n`` images when the classes take turns: image 0 of every class
    in class order, then image 1 of every class, ... (images of a class in file order); all if n == 0."""
    labels = numpy.asarray(labels)
    if n == 0 or n >= len(labels):
        return numpy.arange(len(labels))
    order = numpy.argsort(labels, kind="stable")
    rank = numpy.empty(len(labels), numpy.int64)
    rank[order] = numpy.arange(len(labels)) - numpy.searchsorted(labels[order], labels[order])
    return numpy.sort(numpy.lexsort((labels, rank))[:n])


def held_out_split(root):
    """The sub-folder of ``root`` that holds the images a run is tested on: ``val`` when it exists, else ``test``."""
    root = Path(root).expanduser()
    return "test" if (root / "test").is_dir() and not (root / "val").is_dir() else "val"


class ImageFolder:
    """One split (``"train"``, ``"val"`` or ``"test"``) of an image folder (ILSVRC-2012's, or any with class
    folders), see the module doc: ``paths`` (str), ``labels`` int64 ``(N,)``, ``wnids`` (the class names),
    ``n_classes``; ``subset=N > 0`` keeps :func:`subset_indices` (a class-balanced first N, in file order).
    Images are decoded by ``workers`` threads (default ``min(8, os.cpu_count())``)."""

    def __init__(self, root, split="train", preprocess=Preprocess(), subset=0, workers=None):
        _pil()
        self.root, self.split = Path(root), split
        self.preprocess = preprocess if isinstance(preprocess, Preprocess) else Preprocess.from_dict(preprocess)
        self.workers = whole(workers, "workers", 1) if workers is not None else min(8, os.cpu_count() or 1)
        paths, labels, self.wnids = scan(root, split)
        self.n_classes = len(self.wnids) if self.wnids else int(labels.max()) + 1
        keep = subset_indices(labels, whole(subset, "subset"))
        self.paths, self.labels = [paths[i] for i in keep], labels[keep]

    def __len__(self):
        return len(self.paths)

    def __repr__(self):
        return f"ImageFolder({str(self.root)!r}, {self.split!r}: {len(self)} images, {self.n_classes} classes)"

    def batches(self, batch_size, rng=None, train=False, xp=numpy, prefetch=2):
        """Iterator of ``(x, t)`` on ``xp``: float32 ``(n, size, size, C)`` (``C``: ``preprocess.channels``),
        int64 ``(n,)``, ``n <= batch_size``, every image once. Order: ``rng.permutation(N)`` given a numpy
        Generator ``rng``, else file order. ``train``: random crops and mirrors (``preprocess.mirror``) from
        uniforms ``u = rng.random((N, 3))`` (row i for the i-th image of the epoch; an unseeded generator
        without ``rng``), all drawn here, so a seed gives the same batches whatever the number of workers;
        else centre crops. While the caller works on a batch, the next ``prefetch + 1`` are being prepared;
        leaving the loop early (break, an exception, ``close()``) cancels the queued images and joins the
        workers."""
        whole(batch_size, "batch_size", 1)
        whole(prefetch, "prefetch")
        order = rng.permutation(len(self)) if rng is not None else numpy.arange(len(self))
        u = (rng if rng is not None else numpy.random.default_rng()).random((len(self), 3)) if train else None
        return self._batches(order, u, batch_size, xp, prefetch)

    def _batches(self, order, u, batch_size, xp, prefetch):
        s, c, pending = self.preprocess.size, self.preprocess.channels, collections.deque()
        starts = iter(range(0, len(order), batch_size))
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sparsenet-imagenet")

        def submit(start):  # one task per image, each writing its row of the batch
            idx = order[start:start + batch_size]
            x = numpy.empty((len(idx), s, s, c), numpy.float32)
            pending.append((x, self.labels[idx], [pool.submit(
                load_image, self.paths[i], self.preprocess, None if u is None else u[start + k], x[k])
                for k, i in enumerate(idx)]))
        try:
            for start in starts:
                submit(start)
                if len(pending) > prefetch:
                    break
            while pending:
                x, t, futures = pending.popleft()
                for f in futures:
                    f.result()  # a worker's DataError is raised here
                if (start := next(starts, None)) is not None:
                    submit(start)
                yield to_device(x, xp), to_device(t, xp)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _top_k_wrong(logits, t, ks):
    """``{k: number of rows whose true class is not among the k highest logits}``; ``logits (N, K)``."""
    xp = get_array_module(logits)
    n, K = logits.shape
    t = to_device(t, xp).astype(numpy.int64)
    if t.shape != (n,) or n and (int(t.min()) < 0 or int(t.max()) >= K):
        raise SparsenetError(f"labels must be {n} class indices in 0..{K - 1} to go with logits {logits.shape}")
    true = logits[xp.arange(n), t]
    rank = xp.where(xp.isnan(true), numpy.inf, (logits > true[:, None]).sum(axis=1))  # classes above the truth
    return {k: int((rank >= whole(k, "k", 1)).sum()) for k in ks}


def topk_errors(logits, t, ks=(1, 5)):
    """``{k: err_k}``, ``err_k = mean_i [#{j : logits[i, j] > logits[i, t[i]]} >= k]``: the fraction of rows
    whose true class ``t[i]`` is not among the ``k`` highest logits (ties count for the true class; a NaN true
    logit is wrong; ``k >= K`` gives 0). ``logits`` ``(N, K)`` on NumPy or CuPy, ``t`` ``(N,)`` int."""
    if len(logits) == 0:
        raise SparsenetError("cannot compute errors of an empty batch")
    return {k: w / len(logits) for k, w in _top_k_wrong(logits, t, ks).items()}


def evaluate(net, split, batch_size=100, xp=numpy):
    """``{"top1", "top5", "n"}``: top-1/top-5 errors (fractions) of ``net.forward(x, train=False)`` (logits
    ``(N, K)``) over every image of ``split`` (an :class:`ImageFolder`, centre crops); clears layer caches."""
    if len(split) == 0:
        raise SparsenetError("cannot evaluate on an empty data set")
    wrong = {1: 0, 5: 0}
    try:
        for x, t in split.batches(batch_size, xp=xp):
            for k, w in _top_k_wrong(net.forward(x, train=False), t, wrong).items():
                wrong[k] += w
    finally:
        for layer in net.layers:
            layer.cache = None
    return {"top1": wrong[1] / len(split), "top5": wrong[5] / len(split), "n": len(split)}
