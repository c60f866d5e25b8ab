"""Sparse storage (dense / CSR / relative-index model files) and sparse inference."""
import json

import h5py
import numpy as np
import pytest
import scipy.sparse
from hypothesis import given
from hypothesis import strategies as st

from sparsenet import cli
from sparsenet.backend import asnumpy
from sparsenet.checkpoint import save_checkpoint
from sparsenet.model import build_model, build_network
from sparsenet.sparse import (
    ENCODINGS,
    SparseNetwork,
    check_csr,
    csr_from_dense,
    csr_to_dense,
    export_model,
    export_sizes,
    load_model,
    pack_bits,
    prefer_sparse,
    relative_decode,
    relative_encode,
    storage_report,
    unpack_bits,
)
from sparsenet.sparse import (
    prune_at_random as prune,
)
from sparsenet.train import load_split
from sparsenet.util import SparsenetError

PAPER_DENSITY = {"lenet-300-100": {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26},  # PAPER.md, Tables 2 and 3
                 "lenet-5": {"conv1": 0.66, "conv2": 0.12, "fc1": 0.08, "fc2": 0.19}}


def pruned(model, seed=0, xp=np):
    return prune(build_model(model, seed, xp), PAPER_DENSITY[model], seed)


def roundtrip(A, bits):
    codes, values = relative_encode(A, bits)
    packed = pack_bits(codes, bits)
    assert len(packed) == -(-len(codes) * bits // 8)
    data, indices, indptr = relative_decode(unpack_bits(packed, bits, len(codes)), values, A.shape, bits)
    check_csr(data, indices, indptr, A.shape)
    return codes, csr_to_dense(data, indices, indptr, A.shape)


def assert_bitwise(A, B):
    """Equal float32 bit patterns, −0.0 (a pruned negative weight) read as +0.0."""
    assert np.array_equal((A + np.float32(0)).view(np.uint32), (B + np.float32(0)).view(np.uint32))


# ----------------------------------------------------------------------------- encodings
@st.composite
def sparse_matrices(draw):
    """Float32 matrices mixing empty, fully dense and random rows, with gaps past 2^bits."""
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 300))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kinds = draw(st.lists(st.sampled_from(["empty", "dense", "sparse", "very sparse"]), min_size=rows, max_size=rows))
    p = np.array([{"empty": 0.0, "dense": 1.0, "sparse": 0.1, "very sparse": 0.01}[k] for k in kinds])
    keep = rng.random((rows, cols)) < p[:, None]
    values = (rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-40, 30, (rows, cols))).astype(np.float32)
    values[values == 0] = 1.0  # subnormals stay, underflows to 0 do not
    return np.where(keep, values, np.float32(-0.0))


@given(sparse_matrices(), st.sampled_from([1, 2, 3, 5, 8]))
def test_relative_roundtrip_is_bitwise(A, bits):
    codes, B = roundtrip(A, bits)
    assert_bitwise(A, B)
    F = 2**bits - 1
    pos = np.flatnonzero(A)
    assert (codes != F).sum() == len(pos)
    assert (codes == F).sum() == ((np.diff(pos, prepend=-1) - 1) // F).sum()  # s // F fillers per gap of s


@pytest.mark.parametrize("p", [0, 1, 29, 30, 31, 32, 61, 62, 63, 200, 299])
def test_gap_lengths_around_the_index_range(p):
    A = np.zeros((1, 300), np.float32)
    A[0, p] = 3.5
    A[0, -1] = -1.25
    codes, B = roundtrip(A, 5)
    assert_bitwise(A, B)
    assert list(codes[:p // 31]) == [31] * (p // 31) and codes[p // 31] == p % 31


@pytest.mark.parametrize("A", [np.zeros((3, 4), np.float32), np.ones((3, 4), np.float32),
                               np.arange(1, 8, dtype=np.float32)[:, None], np.zeros((5, 1), np.float32)],
                         ids=["empty", "dense", "single column", "empty column"])
def test_edge_matrices(A):
    for bits in (1, 5, 8):
        assert_bitwise(A, roundtrip(A, bits)[1])
    data, indices, indptr = csr_from_dense(A)
    assert np.array_equal(scipy.sparse.csr_matrix((data, indices, indptr), shape=A.shape).toarray(), A)


@given(st.integers(1, 8), st.integers(0, 50), st.integers(0, 2**32 - 1))
def test_pack_bits_roundtrip(bits, n, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, n).astype(np.uint8)
    packed = pack_bits(codes, bits)
    assert len(packed) == -(-n * bits // 8)
    assert np.array_equal(unpack_bits(packed, bits, n), codes)


def test_pack_bits_layout_is_lsb_first():
    assert list(pack_bits([1, 2, 31], 5)) == [0b01000001, 0b01111100]  # 00001 | 00010 | 11111, LSB first


@pytest.mark.parametrize("mutate, needle", [
    (lambda c, v: (c[:-1], v), "non-filler codes"),
    (lambda c, v: (c, v[:-1]), "non-filler codes"),
    (lambda c, v: (np.where(c == 31, 31, 30).astype(np.uint8), v), "past the"),
    (lambda c, v: (c + 40, v), "does not fit"),
])
def test_relative_decode_rejects(mutate, needle):
    A = np.zeros((4, 50), np.float32)
    A[:, ::7] = 1.0
    codes, values = relative_encode(A, 5)
    with pytest.raises(ValueError, match=needle):
        relative_decode(*mutate(codes, values), A.shape, 5)


@pytest.mark.parametrize("packed, count, needle", [(b"\x01\x02", 1, "bytes of codes"), (b"\xe0", 1, "padding")])
def test_unpack_bits_rejects(packed, count, needle):
    with pytest.raises(ValueError, match=needle):
        unpack_bits(np.frombuffer(packed, np.uint8), 5, count)


# ----------------------------------------------------------------------------- model files
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A pruned LeNet-300-100 (paper densities), saved in every encoding."""
    d = tmp_path_factory.mktemp("models")
    net = pruned("lenet-300-100")
    paths = {enc: d / f"{enc}.h5" for enc in ENCODINGS}
    for enc, path in paths.items():
        export_model(net, path, enc)
    return net, paths


@pytest.mark.parametrize("model", ["lenet-300-100", "lenet-5"])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_encoding_loads_the_exact_weights(model, encoding, tmp_path):
    net = pruned(model, seed=3)
    export_model(net, tmp_path / "m.h5", encoding)
    back = load_model(tmp_path / "m.h5")
    assert back.spec() == net.spec()
    for name, p in net.params().items():
        q = back.params()[name]
        assert_bitwise(p.data, q.data)
        assert np.array_equal(q.mask, (p.data != 0).astype(np.float32) if p.prunable else np.ones_like(p.data))
    x = np.random.default_rng(0).random((20, *net.input_shape), dtype=np.float32)
    assert np.array_equal(back.forward(x), net.forward(x))


def test_shapes_come_from_the_spec(tmp_path):
    """A network shrunk by dead-neuron removal is no named model: the file's spec rebuilds it."""
    spec = {"name": "lenet-300-100", "input_shape": [784], "layers": [
        {"kind": "linear", "name": "fc1", "n_in": 784, "n_out": 37}, {"kind": "relu", "name": "relu1"},
        {"kind": "linear", "name": "fc2", "n_in": 37, "n_out": 10}]}
    net = prune(build_network(spec), {"fc1": 0.1, "fc2": 0.5})
    export_model(net, tmp_path / "m.h5", "relative")
    assert [p.data.shape for p in load_model(tmp_path / "m.h5").params().values()] == [(37, 784), (37,), (10, 37), (10,)]


def test_csr_file_reads_with_h5py_and_scipy_alone(files):
    net, paths = files
    with h5py.File(paths["csr"], "r") as f:
        g = f["params/fc1.W"]
        W = scipy.sparse.csr_matrix((g["data"][:], g["indices"][:], g["indptr"][:]), shape=g.attrs["shape"])
        b = f["params/fc1.b"][:]
    assert np.array_equal(W.toarray(), net.params()["fc1.W"].data + 0) and np.array_equal(b, net.params()["fc1.b"].data)


def test_relative_export_is_ten_times_smaller_on_disk(files):
    net, paths = files
    size = {enc: path.stat().st_size for enc, path in paths.items()}
    assert size == export_sizes(net)
    assert size["dense"] / size["relative"] >= 10.0, size
    assert size["csr"] < size["dense"]


def test_storage_report_counts(files):
    net = files[0]
    r = storage_report(net)
    fc1, total = r["layers"][0], r["total"]
    nnz = int(np.count_nonzero(net.params()["fc1.W"].data))
    codes = relative_encode(net.params()["fc1.W"].data, 5)[0]
    assert fc1["nonzero"] == nnz and fc1["fillers"] == len(codes) - nnz
    assert fc1["dense_bytes"] == 4 * 300 * 785
    assert fc1["csr_bytes"] == 4 * (2 * nnz + 301) + 4 * 300
    assert fc1["relative_bytes"] == 4 * nnz + -(-5 * len(codes) // 8) + 4 * 300
    assert fc1["relative_overhead_pct"] == pytest.approx(100 * 5 * len(codes) / (32 * nnz))
    assert total["dense_bytes"] == 4 * 266610 and total["params"] == 266610
    assert 15.6 < total["relative_overhead_pct"] < 20 and 100 < total["csr_overhead_pct"] < 105


# ----------------------------------------------------------------------------- malformed files
def _replace(key, fn):
    """Edit: dataset ``key`` becomes ``fn(old values)`` (its attributes kept)."""
    def edit(f):
        new, attrs = fn(f[key][()]), dict(f[key].attrs)
        del f[key]
        f[key] = new
        f[key].attrs.update(attrs)
    return edit


def _attr(key, name, fn):
    def edit(f):
        f[key].attrs[name] = fn(f[key].attrs.get(name))
    return edit


def _delete(key):
    def edit(f):
        del f[key]
    return edit


def _past_end(f):
    """Every non-filler code of fc1 set to the largest gap: as many codes, positions past the end."""
    n = int(f["codes"].attrs["n_codes"][0])
    nbytes = -(-5 * n // 8)
    codes = unpack_bits(f["codes"][:nbytes], 5, n)
    _replace("codes", lambda a: np.concatenate([pack_bits(np.where(codes == 31, 31, 30), 5), a[nbytes:]]))(f)


def _not_monotone(a):
    a = a.copy()
    a[5] = a[-1]
    return a


MALFORMED = [
    ("dense", _delete("params/fc2.W"), "'fc2.W' is missing"),
    ("dense", _replace("params/fc2.W", lambda a: a[:, :-1]), "shape"),
    ("dense", _replace("params/fc2.W", lambda a: a.astype(np.float64)), "float32"),
    ("dense", _replace("params/fc3.b", lambda a: a * np.nan), "NaN"),
    ("dense", _attr("/", "format", lambda v: "something-else"), "not a sparsenet model"),
    ("dense", _attr("/", "version", lambda v: 7), "version"),
    ("dense", _attr("/", "encoding", lambda v: "zip"), "unknown encoding"),
    ("dense", _attr("/", "network", lambda v: "{not json"), "cannot rebuild"),
    ("dense", _delete("params"), "'params' is missing"),
    ("csr", _attr("/", "network", lambda v: v.replace(b'"n_out":300', b'"n_out":301')), "expected"),
    ("csr", _delete("params/fc1.W/indices"), "'indices' is missing"),
    ("csr", _replace("params/fc1.W/indptr", lambda a: a[:-1]), "indptr has length"),
    ("csr", _replace("params/fc1.W/indptr", _not_monotone), "not monotone"),
    ("csr", _replace("params/fc1.W/indptr", lambda a: a[::-1].copy()), "indptr must run from 0"),
    ("csr", _replace("params/fc1.W/indices", lambda a: a + 784), "out of range"),
    ("csr", _replace("params/fc1.W/indices", np.sort), "strictly increasing"),
    ("csr", _replace("params/fc2.W/data", lambda a: a[:-1]), "indices has length"),
    ("csr", _replace("params/fc2.W/data", lambda a: a.astype(np.float16)), "float32"),
    ("csr", _replace("params/fc2.W/indices", lambda a: a.astype(np.float32)), "integers"),
    ("csr", _attr("params/fc1.W", "shape", lambda v: (300, 783)), "attribute shape"),
    ("relative", _attr("codes", "n_codes", lambda v: v + 8), "call for"),
    ("relative", _attr("codes", "bits", lambda v: [9, 5, 5]), "out of range"),
    ("relative", _attr("codes", "bits", lambda v: [5, 5]), "list 3 pruned"),
    ("relative", _replace("values", lambda a: a[:-1]), "call for"),
    ("relative", _delete("values"), "'values' is missing"),
    ("relative", _replace("values", lambda a: np.where(np.arange(len(a)) == 5, np.inf, a).astype(np.float32)),
     "infinite"),
    ("relative", _past_end, "past the"),
    ("relative", _replace("values", lambda a: a.astype(np.float64)), "float32"),
    ("relative", _attr("/", "encoding", lambda v: [1, 2]), "unknown encoding"),
]


@pytest.mark.parametrize("encoding, edit, needle", MALFORMED, ids=[f"{e}-{n}" for e, _, n in MALFORMED])
def test_malformed_files_are_rejected(files, tmp_path, encoding, edit, needle):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(files[1][encoding].read_bytes())
    with h5py.File(bad, "r+") as f:
        edit(f)
    with pytest.raises(SparsenetError, match=needle) as e:
        load_model(bad)
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_truncated_and_foreign_files_are_rejected(files, tmp_path, encoding):
    data = files[1][encoding].read_bytes()
    for n in (0, 100, len(data) // 2, len(data) - 1):
        (tmp_path / "bad.h5").write_bytes(data[:n])
        with pytest.raises(SparsenetError, match="bad.h5"):
            load_model(tmp_path / "bad.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(SparsenetError, match="not a readable HDF5"):
        load_model(tmp_path / "text.h5")
    with pytest.raises(SparsenetError, match="no such"):
        load_model(tmp_path / "missing.h5")


DAMAGED = [("dense", "params/fc1.W"), ("dense", "params/fc2.b"), ("csr", "params/fc1.W/data"),
           ("csr", "params/fc1.W/indices"), ("relative", "values"), ("relative", "codes")]


@pytest.mark.parametrize("encoding, key", DAMAGED, ids=[f"{e}-{k}" for e, k in DAMAGED])
def test_a_damaged_byte_is_an_error_not_a_different_weight(files, tmp_path, encoding, key):
    """Every dataset is checksummed (Fletcher-32): one flipped byte in its stored bytes,
    compressed or not, is rejected. Without the checksum a byte of a dense weight would
    load as a different, still finite, number."""
    data = bytearray(files[1][encoding].read_bytes())
    with h5py.File(files[1][encoding], "r") as f:
        d = f[key]
        assert d.fletcher32 and d.chunks == d.shape
        assert (d.compression, d.shuffle) == (("gzip", True) if encoding != "dense" else (None, False))
        chunk = d.id.get_chunk_info(0)
    data[chunk.byte_offset + chunk.size // 2] ^= 0x10
    (tmp_path / "bad.h5").write_bytes(bytes(data))
    with pytest.raises(SparsenetError, match="bad.h5"):
        load_model(tmp_path / "bad.h5")


@pytest.mark.parametrize("encoding", ENCODINGS + ("checkpoint",))
def test_damaged_headers_never_give_a_traceback_or_other_weights(files, tmp_path, encoding):
    """A flipped byte anywhere in the first 4 KB (superblock, object headers, B-trees):
    the load fails with the one-line error, or gives back exactly the saved weights."""
    net = files[0]
    path = tmp_path / "good.h5"
    if encoding == "checkpoint":
        save_checkpoint(path, net)
    else:
        export_model(net, path, encoding)
    data, bad = path.read_bytes(), tmp_path / "bad.h5"
    for offset in range(0, 4096, 7):
        damaged = bytearray(data)
        damaged[offset] ^= 0x10
        bad.write_bytes(bytes(damaged))
        try:
            back = load_model(bad)
        except SparsenetError as e:
            assert "bad.h5" in str(e)
            continue
        for name, p in net.params().items():
            assert_bitwise(p.data, back.params()[name].data)


def test_files_without_filters_still_load(files, tmp_path, monkeypatch):
    """Files written before the checksum/deflate filters (plain datasets) load as before."""
    monkeypatch.setattr("sparsenet.sparse.write_dataset", lambda g, key, a, compress=False: g.create_dataset(key, data=a))
    net = files[0]
    for encoding in ENCODINGS:
        export_model(net, tmp_path / f"{encoding}.h5", encoding)
        with h5py.File(tmp_path / f"{encoding}.h5", "r") as f:
            assert f["params/fc1.b"].chunks is None  # really written plain
        back = load_model(tmp_path / f"{encoding}.h5")
        for name, p in net.params().items():
            assert_bitwise(p.data, back.params()[name].data)


def test_compression_is_lossless_and_pays(files):
    """The sparse streams are deflated: smaller than their raw payload, and bit-exact
    (``test_every_encoding_loads_the_exact_weights``)."""
    net = files[0]
    payload = storage_report(net)["total"]
    size = export_sizes(net)
    assert size["relative"] < payload["relative_bytes"] and size["csr"] < payload["csr_bytes"]
    assert size["dense"] > payload["dense_bytes"]  # dense stays raw: payload + headers


# ----------------------------------------------------------------------------- inference
@pytest.mark.parametrize("model", ["lenet-300-100", "lenet-5"])
def test_sparse_inference_matches_dense(xp, model):
    net = pruned(model, xp=xp)
    for n in (1, 7):
        x = xp.asarray(np.random.default_rng(n).random((n, *net.input_shape), dtype=np.float32))
        z = asnumpy(net.forward(x))
        for mode in ("sparse", "dense", "auto"):
            snet = SparseNetwork(net, mode)
            zs = asnumpy(snet.forward(x))
            np.testing.assert_allclose(zs, z, rtol=1e-5, atol=1e-5)
            assert np.array_equal(zs.argmax(axis=1), z.argmax(axis=1))
            assert set(snet.plan(n).values()) <= {"sparse", "dense"}


def test_plan_follows_density_and_batch_size():
    big = build_network({"name": "", "input_shape": [9216], "layers": [
        {"kind": "linear", "name": "fc6", "n_in": 9216, "n_out": 512}, {"kind": "relu", "name": "r"},
        {"kind": "linear", "name": "fc7", "n_in": 512, "n_out": 10}]})
    prune(big, {"fc6": 0.08, "fc7": 0.01})
    plan = SparseNetwork(big).plan
    assert plan(1) == {"fc6": "sparse", "fc7": "dense"}  # fc7 is too small to gain
    assert plan(64) == {"fc6": "dense", "fc7": "dense"}  # 8% is too dense for a GEMM
    assert set(SparseNetwork(big, "sparse").plan(64).values()) == {"sparse"}
    assert prefer_sparse(0.04, 64, 400_000) and not prefer_sparse(0.04, 1, 30_000)
    assert prefer_sparse(0.02, 512, 235_200) and not prefer_sparse(0.05, 512, 235_200)
    assert prefer_sparse(0.09, 1, 4096 * 9216) and not prefer_sparse(0.05, 1, 1024 * 1024)
    assert prefer_sparse(0.04, 64, 400_000) and not prefer_sparse(0.04, 65, 400_000)


@pytest.mark.mnist
def test_mnist_predictions_identical_across_formats_and_engines(files):
    """End to end on the real MNIST test set: every file format, dense and sparse engines."""
    net, paths = files
    x, t = load_split("mnist", net.input_shape, np, None, split="test")["test"]
    assert len(t) == 10_000
    want = net.predict(x)
    for path in paths.values():
        back = load_model(path)
        assert np.array_equal(back.predict(x), want)
        assert np.array_equal(SparseNetwork(back, "sparse").predict(x, batch_size=500), want)
        assert np.array_equal(SparseNetwork(back).predict(x[:64], batch_size=1), want[:64])


# ----------------------------------------------------------------------------- command line
@pytest.mark.mnist
def test_cli_export_report_predict(files, tmp_path, capsys):
    net, paths = files
    ck = tmp_path / "ck.h5"
    from sparsenet.checkpoint import save_checkpoint

    save_checkpoint(ck, net)
    assert cli.main(["export", str(ck), str(tmp_path / "m.h5"), "--format", "relative", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["file_bytes"]["relative"] == (tmp_path / "m.h5").stat().st_size == paths["relative"].stat().st_size
    assert r["total"]["params"] == 266610 and [row["layer"] for row in r["layers"]] == ["fc1", "fc2", "fc3"]

    before = sorted(tmp_path.iterdir())
    assert cli.main(["export", str(ck), "--report"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "dense/relative" in out and sorted(tmp_path.iterdir()) == before

    assert cli.main(["predict", str(tmp_path / "m.h5"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["n_test"] == 10_000 and 0.0 <= r["test_error"] <= 1.0
    assert cli.main(["predict", str(ck), "--mode", "sparse"]) == 0
    assert "test error" in capsys.readouterr().out


@pytest.mark.parametrize("args, needle", [(["predict", "{bad}"], "bad.h5"), (["export", "{bad}", "--report"], "bad.h5"),
                                          (["export", "{bad}"], "--report")])
def test_cli_errors_are_one_line(tmp_path, capsys, args, needle):
    (tmp_path / "bad.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(50))
    assert cli.main([a.replace("{bad}", str(tmp_path / "bad.h5")) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsenet: error:") and needle in err[0]
