"""Tests for sparsenet.imagenet: folder layouts, label files, preprocessing, batching, errors, top-k."""
import json
import sys
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from sparsenet.data import DataError
from sparsenet.imagenet import (
    ImageFolder,
    Preprocess,
    evaluate,
    load_image,
    scan,
    subset_indices,
    topk_errors,
)
from sparsenet.util import SparsenetError

WNIDS = ["n01", "n02", "n03"]  # sorted: class i has channel i (RGB) bright
COLOURS = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]
SIZES = [(40, 30), (30, 50), (33, 33), (50, 20)]  # (width, height)
SMALL = Preprocess("caffe", size=16, resize=20)


def jpeg(path, size, colour, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, quality=95)
    return path


def make_tree(root, val="folders", train=True, n_train=4, n_val=2):
    """3 classes of solid-colour JPEGs; val as class folders, or flat with a Caffe/Kaggle label file
    (``caffe``/``kaggle`` in val/, ``caffe-root``/``kaggle-root`` in root)."""
    for c in (2, 0, 1) if train else ():  # created out of order: the index comes from sorting
        for i in range(n_train):
            jpeg(root / "train" / WNIDS[c] / f"{WNIDS[c]}_{i}.JPEG", SIZES[i % 4], COLOURS[c])
    lines = []
    for c in range(3):
        for i in range(n_val):
            name = f"ILSVRC2012_val_{3 * i + (2 - c):08d}.JPEG"  # file order differs from class order
            jpeg(root / "val" / (WNIDS[c] if val == "folders" else "") / name, SIZES[(i + c) % 4], COLOURS[c])
            lines.append((name, c))
    where = root / "val" if val in ("caffe", "kaggle") else root
    if val.startswith("caffe"):
        (where / "val.txt").write_text("".join(f"{n} {c}\n" for n, c in lines))
    elif val.startswith("kaggle"):
        (where / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
            f"{n[:-5]},{WNIDS[c]} 1 2 30 20 {WNIDS[c]} 3 4 10 10\n" for n, c in lines))
    return root


def colour_class(x):
    """The class each caffe-preprocessed image shows: its brightest RGB channel."""
    rgb = (np.asarray(x) + np.array([104, 117, 123], np.float32))[..., ::-1]
    return rgb.mean(axis=(1, 2)).argmax(axis=1)


def every_image(ds, **kw):
    xs, ts = zip(*ds.batches(5, **kw))
    return np.concatenate(xs), np.concatenate(ts)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def centre(tree):
    """Every train image, centre-cropped with SMALL, in file order."""
    return every_image(ImageFolder(tree, "train", SMALL, workers=2))


def test_train_classes_from_sorted_wnids(tree, centre):
    ds = ImageFolder(tree, "train", SMALL)
    assert ds.wnids == WNIDS and ds.n_classes == 3 and len(ds) == 12
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.paths[0].endswith("n01_0.JPEG") and ds.paths[-1].endswith("n03_3.JPEG")
    x, t = centre
    assert x.dtype == np.float32 and x.shape == (12, 16, 16, 3) and t.dtype == np.int64
    assert (colour_class(x) == t).all() and (t == ds.labels).all()


@pytest.mark.parametrize("val", ["folders", "caffe", "caffe-root", "kaggle", "kaggle-root"])
def test_val_layouts_and_label_files(tmp_path, val):
    ds = ImageFolder(make_tree(tmp_path, val), "val", SMALL)
    assert len(ds) == 6 and ds.n_classes == 3 and ds.wnids == WNIDS
    if val != "folders":  # flat: sorted by file name, which interleaves the classes
        assert ds.labels.tolist() == [2, 1, 0, 2, 1, 0]
    x, t = every_image(ds)
    assert (colour_class(x) == t).all() and (t == ds.labels).all()


def test_val_classes_follow_train_wnids(tmp_path):
    make_tree(tmp_path, "folders")
    for p in (tmp_path / "val" / "n01").iterdir():
        p.unlink()
    (tmp_path / "val" / "n01").rmdir()
    assert ImageFolder(tmp_path, "val").labels.tolist() == [1, 1, 2, 2]  # train's indices
    assert ImageFolder(tmp_path, "val").n_classes == 3
    for p in sorted((tmp_path / "train").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (tmp_path / "train").rmdir()
    ds = ImageFolder(tmp_path, "val")  # val alone: its own sorted wnids
    assert ds.labels.tolist() == [0, 0, 1, 1] and ds.wnids == ["n02", "n03"] and ds.n_classes == 2


def test_val_txt_without_train_has_integer_classes_only(tmp_path):
    ds = ImageFolder(make_tree(tmp_path, "caffe", train=False), "val")
    assert ds.wnids is None and ds.n_classes == 3


def test_other_extensions_and_hidden_entries(tmp_path):
    jpeg(tmp_path / "train" / "b" / "x.jpg", (20, 20), COLOURS[1])
    jpeg(tmp_path / "train" / "b" / "y.JPG", (20, 20), COLOURS[1])
    Image.new("RGB", (20, 20), COLOURS[0]).save(tmp_path / "train" / "b" / "z.Png")
    (tmp_path / "train" / "b" / "notes.txt").write_text("not an image")
    jpeg(tmp_path / "train" / "a" / "x.jpeg", (20, 20), COLOURS[0])
    (tmp_path / "train" / ".cache").mkdir()
    paths, labels, wnids = scan(tmp_path, "train")
    assert wnids == ["a", "b"] and labels.tolist() == [0, 1, 1, 1]
    assert [p.rsplit("/", 1)[1] for p in paths] == ["x.jpeg", "x.jpg", "y.JPG", "z.Png"]


def solid_png(path, size, colour):
    Image.new("RGB", size, colour).save(path)  # lossless: exact values
    return path


def test_caffe_values_are_bgr_minus_mean(tmp_path):
    x = load_image(solid_png(tmp_path / "a.png", (9, 6), (200, 100, 50)), Preprocess("caffe", 4, 5))
    assert x.shape == (4, 4, 3) and x.dtype == np.float32
    assert np.array_equal(x, np.broadcast_to(np.float32([50 - 104, 100 - 117, 200 - 123]), (4, 4, 3)))


def test_torch_values_are_normalised_rgb(tmp_path):
    x = load_image(solid_png(tmp_path / "a.png", (9, 6), (200, 100, 50)), Preprocess("torch", 4, 5))
    want = [(200 / 255 - 0.485) / 0.229, (100 / 255 - 0.456) / 0.224, (50 / 255 - 0.406) / 0.225]
    assert x.shape == (4, 4, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x, np.broadcast_to(np.float32(want), (4, 4, 3)), rtol=1e-6)


def gradient_png(path, w, h):
    """Pixel (r, c) = (10 r, 10 c, 7): every pixel tells where it came from."""
    r, c = np.mgrid[:h, :w]
    Image.fromarray(np.stack([10 * r, 10 * c, np.full_like(r, 7)], -1).astype(np.uint8)).save(path)
    return path


def test_centre_crop_position(tmp_path):
    path = gradient_png(tmp_path / "g.png", 8, 8)  # resize 8: no resampling; 8 - 5 = 3 to share
    caffe = load_image(path, Preprocess("caffe", 5, 8)) + np.float32([104, 117, 123])
    assert caffe[0, 0].tolist() == [7, 10, 10] and caffe[4, 4].tolist() == [7, 50, 50]  # (8-5)//2 = 1
    torch = load_image(path, Preprocess("torch", 5, 8)) * np.float32([0.229, 0.224, 0.225])
    torch = np.rint((torch + np.float32([0.485, 0.456, 0.406])) * 255)
    assert torch[0, 0].tolist() == [20, 20, 7]  # round(1.5) = 2, torchvision's rule


def test_training_crop_corners_and_mirror(tmp_path):
    path, pre = gradient_png(tmp_path / "g.png", 8, 8), Preprocess("caffe", 5, 8)
    full = load_image(path, Preprocess("caffe", 8, 8))
    assert np.array_equal(load_image(path, pre, (0, 0, 0.9)), full[:5, :5])
    assert np.array_equal(load_image(path, pre, (0.999, 0.999, 0.5)), full[3:, 3:])
    assert np.array_equal(load_image(path, pre, (0, 0.999, 0.1)), full[:5, 3:][:, ::-1])  # mirrored


def test_resize_rules(tmp_path):
    assert Preprocess("torch", 224, 256).resized(500, 375) == (341, 256)  # shorter side to 256
    assert Preprocess("torch", 224, 256).resized(375, 500) == (256, 341)
    assert Preprocess("caffe", 227, 256).resized(500, 375) == (256, 256)  # squashed
    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8)).save(path)
    for pre, size in ((Preprocess("torch", 10, 12), (16, 12)), (Preprocess("caffe", 10, 12), (12, 12))):
        ref = np.asarray(Image.open(path).resize(size, Image.BILINEAR), np.float32)
        top, left = (size[1] - 10) // 2, (size[0] - 10) // 2  # even differences: both centre rules agree
        ref = ref[top:top + 10, left:left + 10]
        want = ref[..., ::-1] - np.float32([104, 117, 123]) if pre.mode == "caffe" else \
            (ref / np.float32(255) - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])
        np.testing.assert_allclose(load_image(path, pre), want, rtol=1e-6, atol=1e-6)


def test_other_colour_modes_become_rgb(tmp_path):
    pre = Preprocess("caffe", 8, 8)
    grey = load_image(jpeg(tmp_path / "l.jpg", (10, 12), 90, "L"), pre) + np.float32([104, 117, 123])
    assert np.allclose(grey, 90, atol=2)
    cmyk = load_image(jpeg(tmp_path / "c.jpg", (10, 12), (0, 255, 255, 0), "CMYK"), pre)
    assert colour_class(cmyk[None])[0] == 0  # CMYK (0, 255, 255, 0) is red
    Image.new("RGBA", (10, 12), (30, 30, 220, 128)).save(tmp_path / "a.png")
    assert colour_class(load_image(tmp_path / "a.png", pre)[None])[0] == 2


def test_sixteen_bit_grey_is_scaled_not_clipped_and_wider_modes_refused(tmp_path):
    a = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(a).save(tmp_path / "g16.png")
    x = load_image(tmp_path / "g16.png", Preprocess("unit", 8, 8, grayscale=True))
    np.testing.assert_allclose(x[..., 0], (a // 257).astype(np.float32) / 255, atol=1e-6)
    Image.fromarray(a.astype(np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(SparsenetError, match=r"f.tif: a floating-point image"):
        load_image(tmp_path / "f.tif", Preprocess("unit", 8, 8))


def test_preprocess_dict_round_trip_and_validation(tree):
    pre = Preprocess("torch", 224, 256)
    assert Preprocess.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    assert Preprocess.from_dict({}) == Preprocess() == Preprocess("caffe", 227, 256)
    as_dict = ImageFolder(tree, preprocess={"mode": "torch", "size": 8, "resize": 9}).preprocess
    assert as_dict == Preprocess("torch", 8, 9)
    for bad, msg in [({"mode": "tf"}, "mode must be one of caffe, torch"), ({"size": 0}, "size must be"),
                     ({"size": 2.5}, "size must be"), ({"size": 300}, r"resize \(256\) must be >= size"),
                     ({"crop": 1}, "keys among"), ([1], "must be a dict")]:
        with pytest.raises(SparsenetError, match=msg):
            Preprocess.from_dict(bad)


def test_same_seed_same_batches_whatever_the_workers(tree):
    def run(seed, workers):
        ds = ImageFolder(tree, "train", SMALL, workers=workers)
        return [(x, t) for x, t in ds.batches(5, np.random.default_rng(seed), train=True)]
    a, b, c = run(3, 1), run(3, 4), run(4, 4)
    assert [len(t) for _, t in a] == [5, 5, 2]
    assert all(np.array_equal(x1, x2) and np.array_equal(t1, t2) for (x1, t1), (x2, t2) in zip(a, b))
    assert not all(np.array_equal(t1, t2) for (_, t1), (_, t2) in zip(a, c))
    assert all((colour_class(x) == t).all() for x, t in a)  # random crops still show their class


@given(batch_size=st.integers(1, 14), seed=st.integers(0, 2**32 - 1) | st.none())
def test_batches_partition_the_data(tree, centre, batch_size, seed, xp):
    """Every image exactly once per epoch, in permutation (or file) order, batches of batch_size."""
    ds = ImageFolder(tree, "train", SMALL, workers=3)
    out = list(ds.batches(batch_size, None if seed is None else np.random.default_rng(seed), xp=xp))
    order = np.arange(12) if seed is None else np.random.default_rng(seed).permutation(12)
    assert [len(t) for _, t in out] == [min(batch_size, 12 - i) for i in range(0, 12, batch_size)]
    x, t = (np.concatenate([xp.asnumpy(a) if xp is not np else a for a in part]) for part in zip(*out))
    assert np.array_equal(t, centre[1][order]) and np.array_equal(x, centre[0][order])


def test_subset_is_class_balanced_first_n(tmp_path):
    assert subset_indices(np.array([0, 0, 0, 1, 1, 2]), 4).tolist() == [0, 1, 3, 5]
    assert subset_indices(np.array([2, 0, 1, 0]), 3).tolist() == [0, 1, 2]
    assert subset_indices(np.array([0, 1]), 0).tolist() == [0, 1] == subset_indices(np.array([0, 1]), 9).tolist()
    ds = ImageFolder(make_tree(tmp_path), "train", SMALL, subset=4)
    assert ds.labels.tolist() == [0, 0, 1, 2] and ds.n_classes == 3
    assert [p.rsplit("/", 1)[1] for p in ds.paths] == ["n01_0.JPEG", "n01_1.JPEG", "n02_0.JPEG", "n03_0.JPEG"]
    assert len(list(ds.batches(3))) == 2


@given(st.lists(st.integers(0, 4), max_size=30), st.integers(0, 40))
def test_subset_takes_classes_in_turn(labels, n):
    labels = np.array(labels, np.int64)
    keep = subset_indices(labels, n)
    assert len(keep) == min(n, len(labels)) if n else len(keep) == len(labels)
    assert (np.diff(keep) > 0).all()
    counts, have = np.bincount(labels[keep], minlength=5), np.bincount(labels, minlength=5)
    for c in range(5):  # each class: its first images; a class short of the top count has run out
        assert keep[labels[keep] == c].tolist() == np.flatnonzero(labels == c)[:counts[c]].tolist()
        assert counts[c] >= counts.max() - 1 or counts[c] == have[c]


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_bad_image_is_a_one_line_data_error_naming_the_file(tmp_path, content):
    make_tree(tmp_path)
    bad = tmp_path / "train" / "n02" / "n02_1.JPEG"
    bad.write_bytes(bad.read_bytes()[:200] if content == "truncated" else content)
    ds, before = ImageFolder(tmp_path, "train", SMALL, workers=4), threading.active_count()
    with pytest.raises(DataError) as e:
        list(ds.batches(3))
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert threading.active_count() == before


def test_leaving_the_loop_early_joins_the_workers(tree):
    ds, before = ImageFolder(tree, "train", SMALL, workers=4), threading.active_count()
    for _ in ds.batches(2, np.random.default_rng(0), train=True):
        assert threading.active_count() > before
        break
    assert threading.active_count() == before
    it = ds.batches(1)
    next(it)
    it.close()
    assert threading.active_count() == before
    with pytest.raises(ZeroDivisionError):
        for _ in ds.batches(1):
            1 / 0
    assert threading.active_count() == before
    ds.batches(1)  # never iterated: no threads started
    assert threading.active_count() == before


def remove(path):
    path.unlink() if path.is_file() else path.rmdir()


LAYOUT_ERRORS = [  # (val layout, what to break, split, message)
    ("folders", lambda r: None, "valid", "split must be train, val or test"),
    ("folders", lambda r: None, "test", "no test/ folder"),
    ("folders", lambda r: r.rename(r.with_name("gone")), "train", "no such folder"),
    ("folders", lambda r: [remove(p) for p in sorted((r / "val").rglob("*"), reverse=True)] + [remove(r / "val")],
     "val", "no val/ folder"),
    ("folders", lambda r: [remove(p) for p in (r / "train" / "n02").iterdir()], "train", "n02: no images"),
    ("folders", lambda r: (r / "val" / "n07").mkdir(), "val", "1 class folders not among the 3 train classes"),
    ("caffe", lambda r: remove(r / "val" / "val.txt"), "val", "no class folders and no label file"),
    ("caffe", lambda r: jpeg(r / "val" / "extra.JPEG", (9, 9), COLOURS[0]), "val", "1 images have no label"),
    ("caffe", lambda r: open(r / "val" / "val.txt", "a").write("missing.JPEG 1\n"), "val",
     "names 1 files not in .*missing.JPEG"),
    ("caffe", lambda r: open(r / "val" / "val.txt", "a").write("ILSVRC2012_val_00000000.JPEG 1\n"), "val",
     r"val.txt:7: ILSVRC2012_val_00000000.JPEG is listed twice"),
    ("caffe", lambda r: open(r / "val" / "val.txt", "a").write("\nbroken line here\n"), "val",
     r"val.txt:8: expected '<file name> <class index>'"),
    ("caffe", lambda r: open(r / "val" / "val.txt", "a").write("other.JPEG --1\n"), "val",
     r"val.txt:7: expected '<file name> <class index>'"),
    ("caffe", lambda r: open(r / "val" / "val.txt", "a").write("other.JPEG \u00b2\n"), "val",
     r"val.txt:7: expected '<file name> <class index>'"),
    ("caffe", lambda r: (r / "val" / "val.txt").write_text((r / "val" / "val.txt").read_text().replace(" 2\n", " 3\n")),
     "val", r"label 3 of ILSVRC2012_val_00000000.JPEG is out of range 0..2"),
    ("kaggle", lambda r: (r / "val" / "LOC_val_solution.csv").write_text("a,b\n"), "val", "expected the header"),
    ("kaggle", lambda r: open(r / "val" / "LOC_val_solution.csv", "a").write("x,n09 1 2 3 4\n"), "val",
     "1 wnids not among the 3 train classes, e.g. n09"),
    ("kaggle", lambda r: open(r / "val" / "LOC_val_solution.csv", "a").write("x,\n"), "val",
     "LOC_val_solution.csv:8: expected '<image id>,<wnid> ...'"),
]


@pytest.mark.parametrize("val, breakage, split, message", LAYOUT_ERRORS)
def test_ill_formed_layouts_are_one_line_errors(tmp_path, val, breakage, split, message):
    root = make_tree(tmp_path / "in", val)
    breakage(root)
    with pytest.raises(SparsenetError, match=message) as e:
        ImageFolder(root, split)
    assert "\n" not in str(e.value) and (split == "valid" or isinstance(e.value, DataError))


def test_flat_train_is_an_error(tmp_path):
    jpeg(tmp_path / "train" / "a.JPEG", (9, 9), COLOURS[0])
    with pytest.raises(DataError, match="train: no class folders"):
        ImageFolder(tmp_path)


def test_missing_pillow_says_how_to_install(monkeypatch, tree):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(SparsenetError, match="pip install Pillow"):
        ImageFolder(tree)


def test_topk_errors_hand_example(xp):
    logits = xp.asarray([[0.1, 0.5, 0.2, 0.0], [3.0, 1.0, 2.0, 0.0], [0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 0.0, 0.0]])
    t = xp.asarray([1, 2, 0, 0])  # true class ranks: 0, 1, 3, 0 (a tie counts for the truth)
    assert topk_errors(logits, t, ks=(1, 2, 3, 4, 5)) == {1: 0.5, 2: 0.25, 3: 0.25, 4: 0.0, 5: 0.0}
    assert topk_errors(xp.asarray([[np.nan, 0.0]]), np.array([0])) == {1: 1.0, 5: 1.0}
    with pytest.raises(SparsenetError, match="class indices in 0..3"):
        topk_errors(logits, xp.asarray([0, 1, 2, 4]))


@given(st.integers(1, 30), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_topk_errors_fall_with_k(n, k_classes, seed):
    rng = np.random.default_rng(seed)
    logits = rng.integers(-3, 3, (n, k_classes)).astype(np.float32)  # small integers: many ties
    t = rng.integers(0, k_classes, n)
    errs = topk_errors(logits, t, ks=range(1, k_classes + 2))
    assert errs[1] == (logits[np.arange(n), t] < logits.max(axis=1)).mean()
    assert all(errs[k] >= errs[k + 1] for k in range(1, k_classes + 1)) and errs[k_classes] == 0


class ColourNet:
    """Logits: the mean (R, G, B / 10) of the caffe-preprocessed image and three zeros: class 2 comes third."""

    class Layer:
        cache = "something"

    def __init__(self):
        self.layers, self.seen = [self.Layer(), self.Layer()], 0

    def forward(self, x, train=False):
        assert not train
        self.seen += len(x)
        rgb = (x + np.array([104, 117, 123], np.float32))[..., ::-1].mean(axis=(1, 2))
        return np.concatenate([rgb, np.zeros((len(x), 3), np.float32)], axis=1) * np.float32([1, 1, 0.1, 0, 0, 0])


def test_evaluate(tree):
    net, ds = ColourNet(), ImageFolder(tree, "val", SMALL)
    assert evaluate(net, ds, batch_size=4) == {"top1": 2 / 6, "top5": 0.0, "n": 6}
    assert net.seen == 6 and all(layer.cache is None for layer in net.layers)
