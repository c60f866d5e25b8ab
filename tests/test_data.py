"""Tests for sparsenet.data: IDX parsing, validation, local lookup and (offline) download."""
import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sparsenet import data
from sparsenet.data import (
    DataError,
    DatasetSpec,
    load_dataset,
    read_idx,
    resolve_data_dir,
    to_float,
)

NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(arr, type_code=0x08):
    """The IDX encoding of ``arr`` (uint8 by default)."""
    arr = np.asarray(arr)
    header = bytes([0, 0, type_code, arr.ndim]) + b"".join(n.to_bytes(4, "big") for n in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path, payload):
    """Write IDX bytes (or an array, encoded) to ``path``, gzipped if it ends in .gz."""
    raw = payload if isinstance(payload, bytes) else idx_bytes(payload)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def small_arrays(n_train=7, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        NAMES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        NAMES[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        NAMES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        NAMES[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def make_spec(arrays, name="tiny", mirrors=(), extra_dirs=()):
    files = {f: hashlib.sha256(idx_bytes(a)).hexdigest() for f, a in arrays.items()}
    return DatasetSpec(name=name, files=files, mirrors=tuple(mirrors), extra_dirs=tuple(extra_dirs))


def write_dataset(directory, arrays, gz=True):
    for f, a in arrays.items():
        write_idx(Path(directory) / (f + (".gz" if gz else "")), a)


# --- read_idx ----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5)), st.booleans())
def test_read_idx_round_trip(tmp_path_factory, arr, gz):
    path = write_idx(tmp_path_factory.mktemp("rt") / ("a.idx" + (".gz" if gz else "")), arr)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)
    out[...] = 0  # writable copy, not a view of the file bytes


@pytest.mark.parametrize("dtype,code", [(np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E)])
def test_read_idx_big_endian_types(tmp_path, dtype, code):
    arr = np.arange(-6, 6).reshape(3, 4).astype(dtype)
    out = read_idx(write_idx(tmp_path / "x.gz", idx_bytes(arr, code)))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


@pytest.mark.parametrize(
    "payload,match",
    [
        (b"\x01\x02" + GOOD[2:], "bad magic"),
        (b"\0\0", "bad magic"),
        (GOOD[:2] + b"\x0a" + GOOD[3:], "unsupported IDX data type 0x0a"),
        (GOOD[:3] + b"\x05" + GOOD[4:], "dimension count 5"),
        (GOOD[:3] + b"\x00" + GOOD[4:], "dimension count 0"),
        (GOOD[:10], "truncated IDX header"),
        (GOOD[:-1], "truncated IDX file: header declares 24 bytes of data, found 23"),
        (GOOD + b"\0\0", "trailing bytes after IDX data: header declares 24 bytes of data, found 26"),
    ],
)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_rejects_malformed(tmp_path, payload, match, suffix):
    path = write_idx(tmp_path / ("bad-idx3-ubyte" + suffix), payload)
    with pytest.raises(DataError, match=match) as exc:
        read_idx(path)
    assert str(path) in str(exc.value)


def test_read_idx_truncated_gzip(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(GOOD)[:-12])
    with pytest.raises(DataError, match="corrupt or truncated gzip") as exc:
        read_idx(path)
    assert str(path) in str(exc.value)


def test_read_idx_not_gzip_despite_name(tmp_path):
    path = tmp_path / "plain.gz"
    path.write_bytes(GOOD)
    with pytest.raises(DataError, match="gzip") as exc:
        read_idx(path)
    assert str(path) in str(exc.value)


def test_read_idx_gzip_named_raw_gets_hint(tmp_path):
    path = tmp_path / "plain"
    path.write_bytes(gzip.compress(GOOD))
    with pytest.raises(DataError, match="looks gzip-compressed"):
        read_idx(path)


def test_read_idx_missing(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_idx(tmp_path / "nope.gz")


# --- load_dataset from local files --------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_load_local(tmp_path, gz):
    arrays = small_arrays()
    spec = make_spec(arrays)
    write_dataset(tmp_path / "tiny", arrays, gz=gz)
    ds = load_dataset(data_dir=tmp_path, download=False, spec=spec)
    assert ds._fields == ("x_train", "y_train", "x_test", "y_test")
    for got, want in zip(ds, arrays.values()):
        np.testing.assert_array_equal(got, want)
    assert ds.x_train.dtype == np.uint8 and ds.x_train.shape == (7, 28, 28)
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64


def test_load_from_extra_dir(tmp_path):
    arrays = small_arrays()
    write_dataset(tmp_path / "elsewhere", arrays)
    spec = make_spec(arrays, extra_dirs=[str(tmp_path / "elsewhere")])
    ds = load_dataset(data_dir=tmp_path / "empty", download=False, spec=spec)
    np.testing.assert_array_equal(ds.x_test, arrays[NAMES[2]])


def test_wrong_checksum(tmp_path):
    arrays = small_arrays()
    spec = make_spec(arrays)
    write_dataset(tmp_path / "tiny", {**arrays, NAMES[1]: (arrays[NAMES[1]] + 1) % 10})
    with pytest.raises(DataError, match="checksum mismatch") as exc:
        load_dataset(data_dir=tmp_path, download=False, spec=spec)
    msg = str(exc.value)
    assert NAMES[1] in msg and spec.files[NAMES[1]] in msg
    # verify=False skips the digest check and loads the (self-consistent) files
    ds = load_dataset(data_dir=tmp_path, download=False, verify=False, spec=spec)
    assert ds.y_train.shape == (7,)


def test_mismatched_counts(tmp_path):
    arrays = {**small_arrays(), NAMES[3]: np.zeros(4, np.uint8)}  # 3 test images, 4 labels
    spec = make_spec(arrays)
    write_dataset(tmp_path / "tiny", arrays)
    with pytest.raises(DataError, match="3 images but 4 labels") as exc:
        load_dataset(data_dir=tmp_path, download=False, spec=spec)
    assert NAMES[2] in str(exc.value) and NAMES[3] in str(exc.value)


def test_wrong_rank(tmp_path):
    arrays = {**small_arrays(), NAMES[0]: np.zeros((7, 784), np.uint8)}
    spec = make_spec(arrays)
    write_dataset(tmp_path / "tiny", arrays)
    with pytest.raises(DataError, match="3-D images") as exc:
        load_dataset(data_dir=tmp_path, download=False, spec=spec)
    assert NAMES[0] in str(exc.value) and NAMES[1] in str(exc.value)


def test_label_out_of_range(tmp_path):
    arrays = {**small_arrays(), NAMES[1]: np.full(7, 10, np.uint8)}
    spec = make_spec(arrays)
    write_dataset(tmp_path / "tiny", arrays)
    with pytest.raises(DataError, match=r"0\.\.9") as exc:
        load_dataset(data_dir=tmp_path, download=False, spec=spec)
    assert NAMES[1] in str(exc.value)


def test_missing_file_no_download(tmp_path):
    arrays = small_arrays()
    spec = make_spec(arrays)
    write_dataset(tmp_path / "tiny", {k: v for k, v in arrays.items() if k != NAMES[2]})
    with pytest.raises(DataError) as exc:
        load_dataset(data_dir=tmp_path, download=False, spec=spec)
    msg = str(exc.value)
    assert NAMES[2] in msg and str(tmp_path / "tiny") in msg
    assert "SPARSENET_DATA" in msg and "--data-dir" in msg and "download failed" not in msg
    assert "\n" not in msg


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        load_dataset("cifar", download=False)


# --- download, offline via file:// mirrors -------------------------------------------------


@pytest.fixture
def mirror(tmp_path):
    """A directory of .gz files served through a file:// URL, plus its spec."""
    arrays = small_arrays()
    served = tmp_path / "mirror"
    write_dataset(served, arrays)
    return arrays, served, make_spec(arrays, mirrors=[served.as_uri() + "/"])


def test_download(tmp_path, mirror):
    arrays, _, spec = mirror
    data_dir = tmp_path / "dl"
    ds = load_dataset(data_dir=data_dir, spec=spec)
    assert sorted(p.name for p in (data_dir / "tiny").iterdir()) == sorted(f + ".gz" for f in NAMES)
    for got, want in zip(ds, arrays.values()):
        np.testing.assert_array_equal(got, want)
    # second load is purely local
    ds2 = load_dataset(data_dir=data_dir, download=False, spec=spec)
    np.testing.assert_array_equal(ds2.x_train, ds.x_train)


def test_download_without_tqdm(tmp_path, mirror, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)  # makes `import tqdm` fail
    arrays, _, spec = mirror
    ds = load_dataset(data_dir=tmp_path / "dl", spec=spec)
    np.testing.assert_array_equal(ds.y_train, arrays[NAMES[1]])
    assert capsys.readouterr() == ("", "")


def test_download_only_missing_falls_back_to_second_mirror(tmp_path, mirror, monkeypatch):
    arrays, served, spec = mirror
    data_dir = tmp_path / "dl"
    write_dataset(data_dir / "tiny", {NAMES[0]: arrays[NAMES[0]]}, gz=False)
    spec = make_spec(arrays, mirrors=[(tmp_path / "gone").as_uri() + "/", served.as_uri() + "/"])
    load_dataset(data_dir=data_dir, spec=spec)
    names = sorted(p.name for p in (data_dir / "tiny").iterdir())
    assert names == sorted([NAMES[0]] + [f + ".gz" for f in NAMES[1:]])


def test_download_corrupt_leaves_nothing(tmp_path, mirror):
    arrays, served, spec = mirror
    write_idx(served / (NAMES[3] + ".gz"), (arrays[NAMES[3]] + 1) % 10)  # wrong bytes served
    data_dir = tmp_path / "dl"
    with pytest.raises(DataError, match="checksum mismatch") as exc:
        load_dataset(data_dir=data_dir, spec=spec)
    msg = str(exc.value)
    assert NAMES[3] in msg and "download failed" in msg
    assert not (data_dir / "tiny" / (NAMES[3] + ".gz")).exists()
    assert not [p for p in (data_dir / "tiny").iterdir() if p.name.startswith(".")]  # no temp files


def test_download_unreachable(tmp_path, mirror):
    arrays, _, _ = mirror
    spec = make_spec(arrays, mirrors=[(tmp_path / "does-not-exist").as_uri() + "/"])
    data_dir = tmp_path / "dl"
    with pytest.raises(DataError) as exc:
        load_dataset(data_dir=data_dir, spec=spec)
    msg = str(exc.value)
    assert NAMES[0] in msg and "download failed" in msg and "does-not-exist" in msg
    assert str(data_dir / "tiny") in msg and "SPARSENET_DATA" in msg
    assert not data_dir.exists()  # the folders made for the download went with it


def test_builtin_specs():
    assert set(data.DATASETS) == {"mnist", "fashion-mnist"}
    for name, spec in data.DATASETS.items():
        assert spec.name == name and tuple(spec.files) == NAMES and spec.mirrors
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in spec.files.values())
    assert data.DATASETS["fashion-mnist"].extra_dirs == ("/usr/share/datasets/fashion-mnist",)


# --- resolve_data_dir, to_float ------------------------------------------------------------


def test_resolve_data_dir_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPARSENET_DATA", raising=False)
    assert resolve_data_dir().absolute() == tmp_path / "data"
    monkeypatch.setenv("SPARSENET_DATA", "/env/dir")
    assert resolve_data_dir() == Path("/env/dir")
    assert resolve_data_dir("/arg/dir") == Path("/arg/dir")
    assert resolve_data_dir(tmp_path) == tmp_path


def test_load_uses_env_data_dir(tmp_path, monkeypatch):
    arrays = small_arrays()
    write_dataset(tmp_path / "tiny", arrays)
    monkeypatch.setenv("SPARSENET_DATA", str(tmp_path))
    ds = load_dataset(download=False, spec=make_spec(arrays))
    np.testing.assert_array_equal(ds.y_test, arrays[NAMES[3]])


def test_to_float():
    x = np.array([[0, 51, 255]], np.uint8)
    y = to_float(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, [[0.0, 0.2, 1.0]], rtol=1e-7)


# --- real data, when present --------------------------------------------------------------


@pytest.mark.mnist
def test_real_mnist():
    ds = load_dataset("mnist", download=False, verify=True)
    assert ds.x_train.shape == (60000, 28, 28) and ds.x_test.shape == (10000, 28, 28)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    assert np.bincount(ds.y_train, minlength=10).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(ds.y_test, minlength=10).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(ds.x_train.mean() - 33.3184) < 1e-3 and abs(ds.x_test.mean() - 33.7912) < 1e-3


def test_real_fashion_mnist(tmp_path):
    if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        pytest.skip("no /usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist)")
    ds = load_dataset("fashion-mnist", data_dir=tmp_path, download=False, verify=True)  # found via extra_dirs
    assert ds.x_train.shape == (60000, 28, 28) and ds.x_test.shape == (10000, 28, 28)
    assert np.bincount(ds.y_train, minlength=10).tolist() == [6000] * 10
    assert np.bincount(ds.y_test, minlength=10).tolist() == [1000] * 10
