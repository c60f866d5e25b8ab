"""Model files (dense / CSR / relative-index, versions 1 and 2): writing, reading,
validation, storage numbers (sparsenet.modelfile)."""
import copy
import json
import re
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.sparse
from hypothesis import given
from hypothesis import strategies as st

from sparsenet import modelfile
from sparsenet.checkpoint import save_checkpoint
from sparsenet.codecs import pack_bits, relative_encode, unpack_bits
from sparsenet.model import Network, build_model, build_network, layer_from_spec
from sparsenet.modelfile import LOSSLESS, export_model, export_sizes, load_model, storage_report
from sparsenet.paper import weights_left
from sparsenet.pruning import prune_at_random as prune
from sparsenet.util import SparsenetError

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED_V1 = json.loads((FIXTURES / "expected_v1.json").read_text())


def pruned(model, seed=0, xp=np):
    """A named model pruned at random to the paper's per-layer densities (Tables 2 and 3)."""
    return prune(build_model(model, seed, xp), weights_left(model), seed)


def assert_bitwise(A, B):
    """Equal float32 bit patterns, −0.0 (a pruned negative weight) read as +0.0."""
    assert np.array_equal((A + np.float32(0)).view(np.uint32), (B + np.float32(0)).view(np.uint32))


def assert_same_params(net, back):
    """Same masks and bit-identical values (−0.0 included) for every parameter."""
    assert list(back.params()) == list(net.params())
    for name, p in net.params().items():
        q = back.params()[name]
        assert np.array_equal(q.mask, p.mask), name
        assert np.array_equal(q.data.view(np.uint32), p.data.view(np.uint32)), name


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A pruned LeNet-300-100 (paper densities), saved in every encoding."""
    d = tmp_path_factory.mktemp("models")
    net = pruned("lenet-300-100")
    paths = {enc: d / f"{enc}.h5" for enc in LOSSLESS}
    for enc, path in paths.items():
        export_model(net, path, enc)
    return net, paths


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("model", ["lenet-300-100", "lenet-5"])
@pytest.mark.parametrize("encoding", LOSSLESS)
def test_every_encoding_loads_the_exact_weights(model, encoding, tmp_path):
    net = pruned(model, seed=3)
    export_model(net, tmp_path / "m.h5", encoding)
    back = load_model(tmp_path / "m.h5")
    assert back.spec() == net.spec()
    assert_same_params(net, back)
    x = np.random.default_rng(0).random((20, *net.input_shape), dtype=np.float32)
    assert np.array_equal(back.forward(x), net.forward(x))


def tiny(kind, seed, density):
    """The tiny MLP or CNN of the v1 fixtures, pruned at random to ``density``."""
    net = build_network(EXPECTED_V1[kind]["spec"], seed=seed)
    return prune(net, {l.name: density for l in net.layers}, seed)


@given(st.sampled_from(["mlp", "cnn"]), st.integers(0, 2**32 - 1), st.floats(0.05, 1.0), st.floats(0.0, 1.0))
def test_zero_valued_survivors_stay_connections(kind, seed, density, zero_fraction):
    """Surviving weights of value exactly 0.0 (or −0.0) keep their connection in every
    encoding: the mask comes back identical, the values bit-identical."""
    net = tiny(kind, seed % 1000, density)
    rng = np.random.default_rng(seed)
    for p in net.params().values():
        if p.prunable:
            hit = (p.mask == 1) & (rng.random(p.data.shape) < zero_fraction)
            p.data[hit] = np.where(rng.random(p.data.shape) < 0.5, np.float32(0.0), np.float32(-0.0))[hit]
    with tempfile.TemporaryDirectory() as d:
        for encoding in LOSSLESS:
            export_model(net, Path(d) / "m.h5", encoding)
            assert_same_params(net, load_model(Path(d) / "m.h5"))


def test_shapes_come_from_the_spec(tmp_path):
    """A network shrunk by dead-neuron removal is no named model: the file's spec rebuilds it."""
    spec = {"name": "lenet-300-100", "input_shape": [784], "layers": [
        {"kind": "linear", "name": "fc1", "n_in": 784, "n_out": 37}, {"kind": "relu", "name": "relu1"},
        {"kind": "linear", "name": "fc2", "n_in": 37, "n_out": 10}]}
    net = prune(build_network(spec), {"fc1": 0.1, "fc2": 0.5})
    export_model(net, tmp_path / "m.h5", "relative")
    assert [p.data.shape for p in load_model(tmp_path / "m.h5").params().values()] == [(37, 784), (37,), (10, 37), (10,)]


def test_version_2_layout(files):
    net, paths = files
    for path in paths.values():
        with h5py.File(path, "r") as f:
            assert f.attrs["version"] == 2
    with h5py.File(paths["dense"], "r") as f:
        assert sorted(f["masks"]) == ["fc1.W", "fc2.W", "fc3.W"]  # every one pruned
        M = unpack_bits(f["masks/fc1.W"][:], 1, 300 * 784).reshape(300, 784)
        assert np.array_equal(M, net.params()["fc1.W"].mask) and f["masks/fc1.W"].compression == "gzip"
    with h5py.File(paths["relative"], "r") as f:
        assert json.loads(f["codes"].attrs["shapes"]) == [[300, 784], [100, 300], [10, 100]]


def test_dense_file_stores_no_mask_for_an_unpruned_weight(tmp_path):
    net = build_model("lenet-300-100")
    net.params()["fc2.W"].prune(np.random.default_rng(0).random((100, 300)) < 0.5)
    export_model(net, tmp_path / "m.h5", "dense")
    with h5py.File(tmp_path / "m.h5", "r") as f:
        assert list(f["masks"]) == ["fc2.W"]
    assert_same_params(net, load_model(tmp_path / "m.h5"))


# ----------------------------------------------------------------------------- version 1 files
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("encoding", LOSSLESS)
def test_version_1_files_still_load(kind, encoding):
    """Files written by the code before connections were stored: the same weights, bit
    for bit, and the masks of the v1 rule (stored structure, or W != 0 for dense)."""
    want = EXPECTED_V1[kind]
    path = FIXTURES / f"{kind}_model_{encoding}_v1.h5"
    with h5py.File(path, "r") as f:
        assert f.attrs["version"] == 1
    net = load_model(path)
    assert net.spec() == want["spec"]
    for name, p in net.params().items():
        assert np.array_equal(p.data, np.array(want["params"][name], np.float32)), name
        assert np.array_equal(p.mask, np.array(want["masks"][name], np.float32)), name
    np.testing.assert_allclose(net.forward(np.array(want["input"], np.float32)), np.array(want["logits"], np.float32),
                               rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- storage numbers
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
    nnz = net.params()["fc1.W"].nonzero()
    codes = relative_encode(net.params()["fc1.W"].data, 5)[0]
    assert fc1["nonzero"] == nnz and fc1["fillers"] == len(codes) - nnz
    assert fc1["dense_bytes"] == 4 * 300 * 785
    assert fc1["csr_bytes"] == 4 * (2 * nnz + 301) + 4 * 300
    assert fc1["relative_bytes"] == 4 * nnz + -(-5 * len(codes) // 8) + 4 * 300
    assert fc1["relative_overhead_pct"] == pytest.approx(100 * 5 * len(codes) / (32 * nnz))
    assert total["dense_bytes"] == 4 * 266610 and total["params"] == 266610
    assert 15.6 < total["relative_overhead_pct"] < 20 and 100 < total["csr_overhead_pct"] < 105


def test_storage_report_counts_connections_not_values():
    net = pruned("lenet-300-100")
    before = storage_report(net)
    p = net.params()["fc2.W"]
    p.data[p.mask == 1] = 0.0  # every survivor of fc2 trained to exactly 0.0
    after = storage_report(net)
    assert after == before and after["layers"][1]["nonzero"] == p.nonzero() > 0


def test_compression_is_lossless_and_pays(files):
    """The sparse streams are deflated: smaller than their raw payload, and bit-exact
    (``test_every_encoding_loads_the_exact_weights``)."""
    net = files[0]
    payload = storage_report(net)["total"]
    size = export_sizes(net)
    assert size["relative"] < payload["relative_bytes"] and size["csr"] < payload["csr_bytes"]
    assert size["dense"] > payload["dense_bytes"]  # dense stays raw: payload + packed masks + headers


# ----------------------------------------------------------------------------- descriptions that are no network
TINY = EXPECTED_V1["mlp"]["spec"]  # fc1 12 -> 7, fc2 7 -> 5, fc3 5 -> 4


def _fault(name):
    spec = copy.deepcopy(TINY)
    layers = {s["name"]: s for s in spec["layers"]}
    if name == "image input":
        spec["input_shape"] = [2, 2, 3]
    elif name == "sizes do not chain":
        layers["fc2"]["n_in"] = 6
    elif name == "1e8 x 1e8 layer":
        spec["input_shape"] = [10**8]
        layers["fc1"].update(n_in=10**8, n_out=10**8)
        layers["fc2"]["n_in"] = 10**8
    else:
        spec["layers"] = []
    return spec


FAULTS = {"image input": "expected (12,)", "sizes do not chain": "expected (6,)",
          "1e8 x 1e8 layer": "more than", "no layers": "no layers"}


def _bad_network(fault):
    """The network ``_fault(fault)`` describes, built layer by layer (no check)."""
    spec = _fault(fault)
    return Network([layer_from_spec(s) for s in spec["layers"]], spec["input_shape"], spec["name"])


def _one_line_error(fn, path, needle):
    with pytest.raises(SparsenetError) as e:
        fn()
    msg = str(e.value)
    assert str(path) in msg and needle in msg and "\n" not in msg, msg


@pytest.mark.parametrize("encoding", LOSSLESS)
@pytest.mark.parametrize("fault", FAULTS)
def test_loading_checks_the_description_before_allocating(fault, encoding, tmp_path, monkeypatch):
    """A file whose description matches its arrays but is no network is refused by
    check_spec, in one line naming the file, before anything of its size is allocated."""
    path = tmp_path / "m.h5"
    if fault == "1e8 x 1e8 layer":  # no such file can be written: a small one whose description says so
        export_model(tiny("mlp", 0, 0.5), path, encoding)
        with h5py.File(path, "r+") as f:
            f.attrs["network"] = np.bytes_(json.dumps(_fault(fault)))
    else:  # written by a writer that did not check
        net = _bad_network(fault)
        with monkeypatch.context() as m:
            m.setattr(modelfile, "check_spec", lambda spec: {n: p.data.shape for n, p in net.params().items()})
            export_model(net, path, encoding)
    _one_line_error(lambda: load_model(path), path, FAULTS[fault])


@pytest.mark.parametrize("fault", FAULTS)
def test_export_refuses_a_description_that_is_no_network(fault, tmp_path):
    if fault == "1e8 x 1e8 layer":  # a description no real network has: given to a small one
        net = tiny("mlp", 0, 0.5)
        net.spec = lambda: _fault(fault)
    else:
        net = _bad_network(fault)
    for encoding in LOSSLESS:
        _one_line_error(lambda: export_model(net, tmp_path / "m.h5", encoding), tmp_path / "m.h5", FAULTS[fault])
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


def test_export_refuses_a_network_that_breaks_the_pruning_rule(tmp_path):
    net = tiny("mlp", 0, 0.5)
    p = net.params()["fc2.W"]
    p.data[p.mask == 0] = 1.0
    _one_line_error(lambda: export_model(net, tmp_path / "m.h5", "csr"), tmp_path / "m.h5", "'fc2.W'")
    assert list(tmp_path.iterdir()) == []


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


# a valid network whose fc1 has 301 outputs: the arrays stored for 300 no longer fit it
_WIDER = _attr("/", "network", lambda v: v.replace(b'"n_out":300', b'"n_out":301').replace(b'"n_in":300', b'"n_in":301'))

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
    ("dense", _WIDER, "expected (301, 784)"),
    ("dense", _replace("masks/fc1.W", lambda a: a[:-1]), "mask: "),
    ("dense", _replace("masks/fc1.W", np.zeros_like), "non-zero at a pruned position"),
    ("dense", _replace("masks/fc2.W", lambda a: a.astype(np.float32)), "integers"),
    ("csr", _attr("/", "network", lambda v: v.replace(b'"n_out":300', b'"n_out":301')), "expected"),
    ("csr", _WIDER, "attribute shape"),
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
    ("relative", _WIDER, "attribute shapes of 'codes'"),
    ("relative", _attr("codes", "shapes", lambda v: b"[[300,784],[100,300],[10,99]]"), "attribute shapes"),
]


@pytest.mark.parametrize("encoding, edit, needle", MALFORMED, ids=[f"{e}-{n}" for e, _, n in MALFORMED])
def test_malformed_files_are_rejected(files, tmp_path, encoding, edit, needle):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(files[1][encoding].read_bytes())
    with h5py.File(bad, "r+") as f:
        edit(f)
    with pytest.raises(SparsenetError, match=re.escape(needle)) as e:
        load_model(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("encoding", LOSSLESS)
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


DAMAGED = [("dense", "params/fc1.W"), ("dense", "params/fc2.b"), ("dense", "masks/fc1.W"),
           ("csr", "params/fc1.W/data"), ("csr", "params/fc1.W/indices"), ("relative", "values"),
           ("relative", "codes")]


@pytest.mark.parametrize("encoding, key", DAMAGED, ids=[f"{e}-{k}" for e, k in DAMAGED])
def test_a_damaged_byte_is_an_error_not_a_different_weight(files, tmp_path, encoding, key):
    """Every dataset is checksummed (Fletcher-32): one flipped byte in its stored bytes,
    compressed or not, is rejected. Without the checksum a byte of a dense weight would
    load as a different, still finite, number."""
    data = bytearray(files[1][encoding].read_bytes())
    with h5py.File(files[1][encoding], "r") as f:
        d = f[key]
        assert d.fletcher32 and d.chunks == d.shape
        packed = encoding != "dense" or key.startswith("masks/")
        assert (d.compression, d.shuffle) == (("gzip", True) if packed else (None, False))
        chunk = d.id.get_chunk_info(0)
    data[chunk.byte_offset + chunk.size // 2] ^= 0x10
    (tmp_path / "bad.h5").write_bytes(bytes(data))
    with pytest.raises(SparsenetError, match="bad.h5"):
        load_model(tmp_path / "bad.h5")


@pytest.mark.parametrize("encoding", LOSSLESS + ("checkpoint",))
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
            assert np.array_equal(p.mask, back.params()[name].mask)


def test_files_without_filters_still_load(files, tmp_path, monkeypatch):
    """Files written before the checksum/deflate filters (plain datasets) load as before."""
    monkeypatch.setattr("sparsenet.h5io.write_dataset", lambda g, key, a, compress=False: g.create_dataset(key, data=a))
    net = files[0]
    for encoding in LOSSLESS:
        export_model(net, tmp_path / f"{encoding}.h5", encoding)
        with h5py.File(tmp_path / f"{encoding}.h5", "r") as f:
            assert f["params/fc1.b"].chunks is None  # really written plain
        assert_same_params(net, load_model(tmp_path / f"{encoding}.h5"))


# ----------------------------------------------------------------------------- command line
@pytest.mark.mnist
def test_cli_export_report_predict(files, tmp_path, capsys):
    from sparsenet import cli

    net, paths = files
    ck = tmp_path / "ck.h5"
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
    from sparsenet import cli

    (tmp_path / "bad.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(50))
    assert cli.main([a.replace("{bad}", str(tmp_path / "bad.h5")) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsenet: error:") and needle in err[0]
