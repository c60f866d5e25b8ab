"""Your own network and your own data: description files (docs/networks.md), ``npz:FILE`` and ``folder:DIR``
data sets (docs/data.md), from the command line as a user runs them, and their one-line errors."""
import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsenet import data
from sparsenet.checkpoint import load_checkpoint
from sparsenet.cli import main
from sparsenet.data import DataError, load_split, npz_members, open_splits
from sparsenet.engine import TrainConfig, train
from sparsenet.model import build_model
from sparsenet.util import SparsenetError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
MLP = {"input_shape": [64], "layers": [{"kind": "linear", "name": "fc1", "n_in": 64, "n_out": 32},
                                       {"kind": "relu", "name": "relu1"},
                                       {"kind": "linear", "name": "fc2", "n_in": 32, "n_out": 4}]}


def cli(capsys, *args):
    """``sparsenet ARGS`` in this process: ``(exit status, stdout, stderr)``."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(capsys, *args):
    rc, _, err = cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("sparsenet: error: "), err
    return lines[0]


def separable(n, k=4, seed=0, shape=(8, 8), balanced=False):
    """uint8 images (n, *shape) of noise 0..59 with class c's rows 2c, 2c+1 set to 200; labels (n,), random
    or (``balanced``) 0, 1, .., k-1 in turn."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k if balanced else rng.integers(0, k, n)
    x = rng.integers(0, 60, (n, *shape), dtype=np.uint8)
    for c in range(k):
        x[y == c, 2 * c:2 * c + 2] = 200
    return x, y


def flat_net(shape, n_out):
    """A description: input ``shape``, flatten, one linear layer to ``n_out`` classes."""
    return {"input_shape": list(shape), "layers": [{"kind": "flatten", "name": "flat"}, {
        "kind": "linear", "name": "fc", "n_in": int(np.prod(shape)), "n_out": n_out}]}


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def npz(tmp_path):
    """A separable 4-class data set of 8x8 images (600 train, 200 test) and an MLP description for it."""
    (xr, yr), (xt, yt) = separable(600), separable(200, seed=1)
    np.savez(tmp_path / "d.npz", x_train=xr, y_train=yr, x_test=xt, y_test=yt)
    return tmp_path / "d.npz", write_json(tmp_path / "net.json", MLP)


# ----------------------------------------------------------------------------- network descriptions
@pytest.mark.mnist
@pytest.mark.parametrize("example", ["mlp-784-500-10.json", "small-cnn.toml"])
def test_the_example_networks_train_on_mnist_from_the_cli(example, tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = cli(capsys, "train", "--model", EXAMPLES / example, "--train-subset", 2000, "--epochs", 1,
                          "--out", out, "--no-progress")
    assert rc == 0, err
    error = json.loads((out / "log.jsonl").read_text().splitlines()[-1])["test_error"]
    assert error < 0.5  # one epoch on 2,000 images: far better than chance (90%)
    assert json.loads((out / "config.json").read_text())["model"] == str(EXAMPLES / example)
    layers = load_checkpoint(out / "checkpoint.h5").net.spec()["layers"]
    assert [(l["kind"], l["name"]) for l in layers] == [(l["kind"], l["name"]) for l in
                                                        build_model(EXAMPLES / example).spec()["layers"]]


def test_a_resumed_run_needs_no_description_file(npz, tmp_path, capsys, monkeypatch):
    path, desc = npz
    monkeypatch.chdir(tmp_path)  # relative paths, stored absolute
    rc, _, err = cli(capsys, "train", "--model", "net.json", "--dataset", "npz:d.npz", "--epochs", 1, "--out", "run",
                     "--no-progress")
    assert rc == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"] == str(desc) and config["dataset"] == f"npz:{path}"
    desc.unlink()
    rc, _, err = cli(capsys, "train", "--out", "run", "--resume", "--epochs", 2, "--no-progress")
    assert rc == 0, err
    assert [r["epoch"] for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())] == [1, 2]


BAD_DESCRIPTIONS = [  # (file name, text, words of the message)
    ("a.json", '{"input_shape": [64], "layers": [', "cannot read the network description"),
    ("a.toml", "input_shape = [64\n", "cannot read the network description"),
    ("a.json", json.dumps({**MLP, "layers": MLP["layers"] + [{"kind": "softmax", "name": "s"}]}),
     "unknown layer kind 'softmax'"),
    ("a.json", json.dumps({**MLP, "layers": [{**MLP["layers"][0], "n_in": 65}, *MLP["layers"][1:]]}),
     "layer 'fc1' (linear) gets input of shape (64,), expected (65,)"),
    ("a.json", json.dumps({**MLP, "layers": [MLP["layers"][0]] * 2}), "layer name 'fc1' missing or repeated"),
    ("a.json", json.dumps({**MLP, "layers": [{**MLP["layers"][0], "bias": False}]}), "unknown settings bias"),
    ("a.json", json.dumps({**MLP, "optimizer": "adam"}), "unknown keys in the network description: optimizer"),
    ("a.json", json.dumps({"input_shape": [8, 8, 1], "layers": [{"kind": "relu", "name": "r"}]}),
     "class scores must be a vector"),
    ("a.json", "[1, 2]", "must be an object"),
]


@pytest.mark.parametrize("name, text, message", BAD_DESCRIPTIONS)
def test_bad_descriptions_are_one_line_and_leave_nothing(name, text, message, tmp_path, capsys):
    desc = tmp_path / name
    desc.write_text(text)
    for args in (("summary", "--model", desc), ("train", "--model", desc, "--out", tmp_path / "run", "--epochs", 1)):
        line = one_line_error(capsys, *args)
        assert str(desc) in line and message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_missing_description_file_or_unknown_model_is_one_line(tmp_path, capsys):
    assert "no such network description file" in one_line_error(capsys, "summary", "--model", tmp_path / "x.toml")
    line = one_line_error(capsys, "train", "--model", "lenet-7", "--out", tmp_path / "run")
    assert "unknown model 'lenet-7'" in line and "lenet-5" in line and ".json/.toml" in line
    assert not (tmp_path / "run").exists()


def test_summary_of_a_description_file(tmp_path, capsys):
    rc, out, _ = cli(capsys, "summary", "--model", EXAMPLES / "small-cnn.toml", "--json")
    d = json.loads(out)
    assert rc == 0 and d["model"] == "small-cnn" and d["input_shape"] == [28, 28, 1]
    weights = {r["name"]: r["weight_shape"] for r in d["layers"] if r["weight_shape"]}
    assert weights == {"conv1": [8, 5, 5, 1], "conv2": [16, 3, 3, 4], "fc1": [64, 576], "fc2": [10, 64]}
    assert d["params"] == sum(np.prod(w) + w[0] for w in weights.values())
    desc = write_json(tmp_path / "lenet-5.json", {**MLP, "name": "lenet-5"})  # the paper's name, not its network
    rc, out, _ = cli(capsys, "summary", "--model", desc)
    assert rc == 0 and "paper" not in out


def test_a_reproduce_config_reads_paths_from_its_own_folder(npz, tmp_path, monkeypatch):
    from sparsenet.reproduce import load_config

    path, desc = npz
    cfg_path = write_json(tmp_path / "exp.json", {"experiment": "mine", "train": {
        "model": "net.json", "dataset": "npz:d.npz", "epochs": 1}, "prune": {"rounds": [{"amount": 0.5}]}})
    monkeypatch.chdir(ROOT)
    cfg, _ = load_config(str(cfg_path))
    assert cfg["train"]["model"] == str(desc) and cfg["train"]["dataset"] == f"npz:{path}"
    write_json(cfg_path, {**json.loads(cfg_path.read_text()), "train": {"model": "other.json"}})
    with pytest.raises(SparsenetError, match=f"{tmp_path / 'other.json'}: no such network description file"):
        load_config(str(cfg_path))


# ----------------------------------------------------------------------------- npz:FILE
def test_an_npz_run_prunes_evaluates_reports_and_predicts_from_the_cli(npz, tmp_path, capsys):
    path, desc = npz
    run, pruned = tmp_path / "run", tmp_path / "pruned"
    rc, _, err = cli(capsys, "train", "--model", desc, "--dataset", f"npz:{path}", "--epochs", 2, "--out", run,
                     "--no-progress")
    assert rc == 0, err
    rc, _, err = cli(capsys, "prune", run / "checkpoint.h5", "--out", pruned, "--criterion", "percentile",
                     "--amount", 0.5, "--epochs", 1, "--no-progress")
    assert rc == 0, err
    rc, out, err = cli(capsys, "eval", pruned / "checkpoint.h5", "--json")
    ev = json.loads(out)
    assert rc == 0 and ev["dataset"] == f"npz:{path}" and ev["test_error"] < 0.1  # separable: learnt (chance 75%)
    assert ev["nonzero_params"] < 0.6 * ev["params"]
    rc, out, err = cli(capsys, "report", pruned / "checkpoint.h5", "--json")
    rep = json.loads(out)
    assert rc == 0 and rep["dataset"] == f"npz:{path}" and rep["error"] == ev["test_error"]
    rc, _, err = cli(capsys, "export", pruned / "checkpoint.h5", tmp_path / "m.h5", "--format", "relative")
    assert rc == 0, err
    rc, out, err = cli(capsys, "predict", tmp_path / "m.h5", "--dataset", f"npz:{path}", "--json")
    pred = json.loads(out)
    assert rc == 0 and pred["n_test"] == 200 and pred["test_error"] == ev["test_error"]


LAYOUTS = {"flat": lambda x: x.reshape(len(x), -1), "hw": lambda x: x, "hwc": lambda x: x[..., None]}


@settings(max_examples=12, deadline=None)
@given(layout=st.sampled_from(sorted(LAYOUTS)), dtype=st.sampled_from(["uint8", "float32", "float64"]),
       labels=st.sampled_from(["int64", "uint8", "float32"]), compressed=st.booleans(),
       net_shape=st.sampled_from([(64,), (8, 8, 1)]), subset=st.sampled_from([0, 5]))
def test_npz_arrays_load_as_stored(tmp_path_factory, layout, dtype, labels, compressed, net_shape, subset):
    """Any layout, image and label dtype, compressed or not: the network gets the stored values (uint8 / 255)
    shaped as its input, the labels as int64; stored members are memory-mapped, compressed ones read."""
    (xr, yr), (xt, yt) = separable(20, seed=2), separable(7, seed=3)
    xr, xt = (LAYOUTS[layout](x) if dtype == "uint8" else (LAYOUTS[layout](x) / 255).astype(dtype) for x in (xr, xt))
    path = tmp_path_factory.mktemp("npz") / "d.npz"
    (np.savez_compressed if compressed else np.savez)(path, x_train=xr, y_train=yr.astype(labels), x_test=xt,
                                                      y_test=yt.astype(labels))
    assert all((m.offset is None) == compressed for m in npz_members(path).values())
    d = load_split(f"npz:{path}", net_shape, np, train_subset=subset, n_classes=4)
    for (x, t), (x0, t0) in zip((d["train"], d["test"]), ((xr[:subset or None], yr[:subset or None]), (xt, yt))):
        want = x0.astype(np.float32) / (np.float32(255) if dtype == "uint8" else 1)
        assert x.dtype == np.float32 and x.shape == (len(x0), *net_shape)
        np.testing.assert_array_equal(x.reshape(want.shape), want)
        assert t.dtype == np.int64 and np.array_equal(t, t0)


def test_npz_val_arrays_are_checked_and_readable(tmp_path):
    (xr, yr), (xv, yv) = separable(10), separable(6, seed=4)
    np.savez(tmp_path / "d.npz", x_train=xr, y_train=yr, x_test=xr, y_test=yr, x_val=xv, y_val=yv)
    d = load_split(f"npz:{tmp_path / 'd.npz'}", (64,), np, split="val")
    assert list(d) == ["val"] and np.array_equal(d["val"][1], yv)
    assert list(load_split(f"npz:{tmp_path / 'd.npz'}", (64,), np)) == ["train", "test"]
    np.savez(tmp_path / "d.npz", x_train=xr, y_train=yr, x_test=xr, y_test=yr, x_val=xv)
    with pytest.raises(DataError, match="no y_val array"):
        load_split(f"npz:{tmp_path / 'd.npz'}", (64,), np)


def test_other_members_of_an_npz_are_not_read(tmp_path):
    import zipfile

    (xr, yr) = separable(10)
    np.savez(tmp_path / "d.npz", x_train=xr, y_train=yr, x_test=xr, y_test=yr, labels=np.arange(3))
    with zipfile.ZipFile(tmp_path / "d.npz", "a") as zf:
        zf.writestr("notes.npy", b"not an array at all")
    d = load_split(f"npz:{tmp_path / 'd.npz'}", (64,), np)
    assert np.array_equal(d["test"][1], yr)
    np.savez(tmp_path / "e.npz", images=xr, y_train=yr, x_test=xr, y_test=yr)
    with pytest.raises(DataError, match=r"no x_train array \(found: images, x_test, y_test, y_train"):
        load_split(f"npz:{tmp_path / 'e.npz'}", (64,), np)


def _arrays(**change):
    (xr, yr), (xt, yt) = separable(10), separable(5, seed=1)
    return {k: v for k, v in {"x_train": xr, "y_train": yr, "x_test": xt, "y_test": yt, **change}.items()
            if v is not None}


def _nan_images():
    x = separable(10)[0].astype(np.float32)
    x[3, 4, 5] = np.nan
    return x


BAD_NPZ = [  # (arrays, network input shape, words of the message)
    (_arrays(y_test=None), (64,), "no y_test array (found: x_test, x_train, y_train"),
    (_arrays(x_train=np.array([None] * 10, dtype=object)), (64,), "x_train is an object array"),
    (_arrays(x_test=separable(5, shape=(9, 9))[0]), (64,), "x_test: images are 9x9 (81 values)"),
    (_arrays(x_train=separable(10)[0][:, None]), (8, 8, 1), "images are 1x8x8"),
    (_arrays(x_train=separable(10, shape=(3, 8, 8))[0]), (8, 8, 3), "store images channels-last"),
    (_arrays(y_train=np.arange(10)), (64,), "the network has 4 outputs, but npz:"),
    (_arrays(y_test=-np.ones(5, int)), (64,), "y_test: labels must be class indices 0, 1, …, found -1"),
    (_arrays(y_train=np.full(10, 1.5)), (64,), "y_train: labels must be whole numbers"),
    (_arrays(y_train=np.full(10, np.inf)), (64,), "y_train: labels must be whole numbers"),
    (_arrays(x_train=_nan_images()), (64,), "x_train: images hold NaN or infinite values"),
    (_arrays(x_train=np.full((10, 64), 1e300)), (64,), "x_train: images hold NaN or infinite values"),
    (_arrays(x_train=np.zeros((0, 64), np.uint8), y_train=np.zeros(0, int)), (64,), "x_train is empty"),
    (_arrays(y_train=np.zeros(9, int)), (64,), "x_train has 10 images but y_train 9 labels"),
    (_arrays(x_train=separable(10)[0].astype(np.int64)), (64,), "x_train has dtype int64"),
    (_arrays(y_train=np.array(["a"] * 10)), (64,), "y_train has dtype <U1"),
    (_arrays(y_train=np.zeros((10, 1), int)), (64,), "expected images (N, D), (N, H, W) or (N, H, W, C)"),
]


@pytest.mark.parametrize("arrays, shape, message", BAD_NPZ)
def test_bad_npz_files_are_one_line_and_leave_nothing(arrays, shape, message, tmp_path):
    np.savez(tmp_path / "d.npz", **arrays)
    desc = write_json(tmp_path / "net.json", flat_net(shape, 4))
    with pytest.raises(SparsenetError) as e:
        train(tmp_path / "run", TrainConfig(model=str(desc), dataset=f"npz:{tmp_path / 'd.npz'}", epochs=1),
              progress=False)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "net.json"]


@pytest.mark.parametrize("content, message", [(b"x_train,y_train\n1,2\n", "not an .npz file"),
                                              (None, "one .npy array, not an .npz data set"),
                                              (b"PK\x03\x04garbage", "not an .npz file")])
def test_a_file_that_is_not_an_npz_is_one_line(content, message, npz, tmp_path, capsys):
    path, desc = npz
    if content is None:
        np.save(tmp_path / "x.npy", np.zeros(3))
        (tmp_path / "x.npy").rename(path)
    else:
        path.write_bytes(content)
    line = one_line_error(capsys, "train", "--model", desc, "--dataset", f"npz:{path}", "--out", tmp_path / "run")
    assert message in line and str(path) in line and not (tmp_path / "run").exists()


@pytest.mark.parametrize("dataset, message", [("npz:nowhere.npz", "no such .npz file"),
                                              ("folder:nowhere", "no such folder"),
                                              ("cifar", "unknown dataset 'cifar'"), ("npz:", "unknown dataset")])
def test_unknown_or_missing_datasets_are_one_line(dataset, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, "train", "--dataset", dataset, "--out", "run")
    assert message in line and list(tmp_path.iterdir()) == []
    assert message in one_line_error(capsys, "predict", "m.h5", "--dataset", dataset)  # before the model is read


# ----------------------------------------------------------------------------- folder:DIR
def png_tree(root, held_out="test", k=3, n=(6, 2), mode="L", size=(8, 8)):
    """``root/train/<class>/*.png`` and ``root/<held_out>/<class>/*.png``: class folders named out of order,
    images of :func:`separable`'s pattern (grayscale, or its RGB copy)."""
    from PIL import Image

    names = ["zebra", "apple", "mango"][:k]
    for split, count, seed in (("train", n[0], 0), (held_out, n[1], 1)):
        x, y = separable(count * k, k, seed, size, balanced=True)
        for i, (img, c) in enumerate(zip(x, y)):
            (root / split / names[c]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img if mode == "L" else np.repeat(img[..., None], 3, axis=2), mode).save(
                root / split / names[c] / f"{i:03d}.png")
    return root


class Net:
    """What open_splits asks of a network."""

    def __init__(self, input_shape, n_classes=3):
        self.input_shape, self.n_classes = tuple(input_shape), n_classes


def test_folder_images_load_as_stored_with_sorted_classes(tmp_path):
    from PIL import Image

    root = png_tree(tmp_path / "digits")
    d = open_splits({"dataset": f"folder:{root}"}, Net((8, 8, 1)), np)
    assert [f.split for f in d.values()] == ["train", "test"]  # no val/: test/ is held out
    assert d["train"].wnids == ["apple", "mango", "zebra"] and len(d["train"]) == 18 and len(d["test"]) == 6
    x, t = data.first_images(d["test"], 6, np)
    assert x.shape == (6, 8, 8, 1) and x.dtype == np.float32
    for xi, ti, p in zip(x, t, d["test"].paths):
        assert Path(p).parent.name == d["train"].wnids[ti]
        np.testing.assert_array_equal(xi[..., 0], np.asarray(Image.open(p), np.float32) / np.float32(255))
    rgb = open_splits({"dataset": f"folder:{root}", "preprocess": {"resize": 10, "size": 8}}, Net((8, 8, 3)), np,
                      split="train")["train"]
    assert rgb.preprocess.to_dict() == {"mode": "unit", "size": 8, "resize": 10, "grayscale": False, "mirror": False}
    assert next(rgb.batches(4))[0].shape == (4, 8, 8, 3)


def test_a_folder_run_trains_and_evaluates_from_the_cli(tmp_path, capsys):
    root = png_tree(tmp_path / "digits", held_out="val", mode="RGB")
    desc = write_json(tmp_path / "net.json", flat_net((8, 8, 1), 3))
    rc, _, err = cli(capsys, "train", "--model", desc, "--dataset", f"folder:{root}", "--epochs", 3, "--lr", 0.1,
                     "--batch-size", 6, "--out", tmp_path / "run", "--no-progress")
    assert rc == 0, err
    rc, out, _ = cli(capsys, "eval", tmp_path / "run" / "checkpoint.h5", "--json")
    ev = json.loads(out)
    assert rc == 0 and ev["dataset"] == f"folder:{root}" and ev["test_error"] < 0.2  # 3 classes: chance 67%


def _remove_train_images(root):
    for p in (root / "train").rglob("*.png"):
        p.unlink()


BAD_FOLDERS = [  # (breakage, network input, preprocess, words of the message)
    (lambda r: shutil.rmtree(r / "test"), (8, 8, 1), None, "no val/ folder"),
    (_remove_train_images, (8, 8, 1), None, "apple: no images"),
    (lambda r: [shutil.rmtree(p) for p in (r / "train").iterdir()], (8, 8, 1), None, "train: no class folders"),
    (lambda r: (r / "test" / "pear").mkdir(), (8, 8, 1), None, "1 class folders not among the 3 train classes"),
    (lambda r: None, (8, 8, 2), None, "square images (S, S, 1) or (S, S, 3)"),
    (lambda r: None, (8, 6, 1), None, "square images"),
    (lambda r: None, (8, 8, 1), {"size": 6}, "takes inputs of shape (8, 8, 1), but the preprocessing makes 6x6x1"),
    (lambda r: None, (8, 8, 1), {"mode": "caffe"}, "grayscale images (the network takes (8, 8, 1)) need"),
    (lambda r: None, (8, 8, 3), {"grayscale": True, "mode": "torch"}, "grayscale needs mode 'unit'"),
    (lambda r: None, (8, 8, 3), {"crop": 2}, "keys among"),
]


@pytest.mark.parametrize("breakage, shape, preprocess, message", BAD_FOLDERS)
def test_bad_folders_are_one_line_and_leave_nothing(breakage, shape, preprocess, message, tmp_path):
    root = png_tree(tmp_path / "digits", n=(1, 1))
    breakage(root)
    desc = write_json(tmp_path / "net.json", flat_net(shape, 3))
    with pytest.raises(SparsenetError) as e:
        train(tmp_path / "run", TrainConfig(model=str(desc), dataset=f"folder:{root}", preprocess=preprocess),
              progress=False)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits", "net.json"]


def test_more_classes_than_outputs_and_preprocess_for_arrays_are_errors(tmp_path, npz):
    root = png_tree(tmp_path / "digits", n=(1, 1))
    with pytest.raises(DataError, match=f"the network has 2 outputs, but {root} has 3 classes"):
        open_splits({"dataset": f"folder:{root}"}, Net((8, 8, 1), 2), np)
    with pytest.raises(SparsenetError, match="preprocess applies to image folders"):
        TrainConfig(model=str(npz[1]), dataset=f"npz:{npz[0]}", preprocess={"size": 8}).validate()


def test_parse_preprocess():
    assert data.parse_preprocess("mode=torch, resize=256,grayscale=false") == {
        "mode": "torch", "resize": 256, "grayscale": False}
    assert data.parse_preprocess('{"size": 8}') == {"size": 8}
    for bad in ("size", "[1]", "{bad"):
        with pytest.raises(SparsenetError, match="--preprocess"):
            data.parse_preprocess(bad)


# ----------------------------------------------------------------------------- nothing left behind
def test_a_failed_mnist_lookup_makes_no_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARSENET_OFFLINE", "1")
    with pytest.raises(DataError, match="downloads are disabled"):
        load_split("mnist", (784,), np, data_dir=tmp_path / "data")
    line = one_line_error(capsys, "train", "--out", tmp_path / "run", "--epochs", 1, "--data-dir", tmp_path / "data")
    assert "download failed" in line and list(tmp_path.iterdir()) == []


def test_the_image_module_does_not_import_the_data_module():
    """data imports imagenet (ImageFolder, DataError) at the top; imagenet must not import data back."""
    tree = ast.parse((ROOT / "sparsenet" / "imagenet.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "data" not in imported and data.DataError is __import__("sparsenet.imagenet").imagenet.DataError
