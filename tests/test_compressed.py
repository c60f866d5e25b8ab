"""Deep Compression end to end: the compressed model format (round trip, malformed files), the
quantise command and schedule step (resumable), predictions from the compressed file."""
import json

import h5py
import numpy
import pytest
from conftest import Killed

from sparsenet import cli
from sparsenet.checkpoint import load_checkpoint
from sparsenet.compressed import storage_table
from sparsenet.data import load_split
from sparsenet.engine import Schedule, TrainConfig, prune_run, train
from sparsenet.model import build_model
from sparsenet.modelfile import export_model, load_model
from sparsenet.paper import weights_left
from sparsenet.pruning import prune_at_random
from sparsenet.quantise import share_weights
from sparsenet.util import SparsenetError


def shared_net(model, bits, seed=0):
    net = prune_at_random(build_model(model, seed), weights_left(model), seed)
    share_weights(net, bits)
    return net


@pytest.mark.parametrize("model, bits", [("lenet-300-100", 5), ("lenet-5", {"conv1": 8, "conv2": 8, "default": 4}),
                                         ("lenet-300-100", 1)])
def test_a_compressed_file_loads_to_exactly_the_quantised_network(model, bits, tmp_path):
    net = shared_net(model, bits)
    export_model(net, tmp_path / "m.h5", "compressed")
    back = load_model(tmp_path / "m.h5")
    for name, p in net.params().items():
        q = back.params()[name]
        assert numpy.array_equal(p.data, q.data) and numpy.array_equal(p.mask, q.mask), name
        if p.prunable:
            assert numpy.array_equal(p.codebook, q.codebook) and numpy.array_equal(p.codes, q.codes), name
            assert len(numpy.unique(q.data[q.mask == 1])) <= len(q.codebook) <= 2 ** (bits if isinstance(bits, int)
                                                                                       else bits.get(name[:5], 4))
    x = numpy.random.default_rng(1).random((50, *net.input_shape), dtype=numpy.float32)
    assert numpy.array_equal(back.forward(x), net.forward(x))
    size = (tmp_path / "m.h5").stat().st_size
    table = storage_table(net)
    assert table["total"]["coded_bytes"] < size < table["total"]["coded_bytes"] + 6000  # the HDF5 headers
    assert table["total"]["coded_bytes"] < table["total"]["quantised_bytes"] < table["total"]["pruned_bytes"]
    export_model(net, tmp_path / "d.h5", "dense")
    assert (tmp_path / "d.h5").stat().st_size / size > (8 if model == "lenet-300-100" else 5)


def test_the_compressed_format_needs_shared_weights(tmp_path):
    net = prune_at_random(build_model("lenet-300-100"), weights_left("lenet-300-100"))
    with pytest.raises(SparsenetError, match="not weight-shared.*sparsenet quantise"):
        export_model(net, tmp_path / "m.h5", "compressed")
    assert not (tmp_path / "m.h5").exists()


def _tamper(src, dst, edit):
    import shutil

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def _replace(f, key, data, attrs=True):
    old = dict(f[key].attrs) if attrs else {}
    del f[key]
    d = f.create_dataset(key, data=data)
    for k, v in old.items():
        d.attrs[k] = v


def _counts(f, fn):
    c = f["stream"].attrs["counts"].copy()
    fn(c)
    f["stream"].attrs["counts"] = c


CORRUPTIONS = {
    "truncated stream": lambda f: _replace(f, "stream", f["stream"][:-3]),
    "stream one byte longer": lambda f: _replace(f, "stream", numpy.append(f["stream"][()], numpy.uint8(0))),
    "an index past the codebook": lambda f: _counts(f, lambda c: c.__setitem__((0, 1), 2)),  # K 32 -> 2
    "more values than coded": lambda f: _counts(f, lambda c: c.__setitem__((0, 3), c[0, 3] + 5)),
    "wrong layer shape": lambda f: f["stream"].attrs.__setitem__("shapes", numpy.bytes_("[[300,785],[100,300],[10,100]]")),
    "a NaN in a codebook": lambda f: _replace(f, "codebooks", numpy.where(numpy.arange(len(f["codebooks"])) == 3,
                                                                          numpy.nan, f["codebooks"][()]).astype("f4")),
    "missing tables": lambda f: f.__delitem__("tables"),
    "tables cut short": lambda f: _replace(f, "tables", f["tables"][:-1]),
    "a Huffman length over 16": lambda f: _replace(f, "tables", numpy.full(len(f["tables"]), 17, numpy.uint8)),
    "counts of two layers": lambda f: f["stream"].attrs.__setitem__("counts", f["stream"].attrs["counts"][:2]),
    "position bits of a conv": lambda f: _counts(f, lambda c: c.__setitem__((0, 0), 8)),
    "biases cut short": lambda f: _replace(f, "dense", f["dense"][:-1]),
}


@pytest.mark.parametrize("what", sorted(CORRUPTIONS))
def test_a_malformed_compressed_file_is_a_one_line_error(what, tmp_path, capsys):
    good = tmp_path / "good.h5"
    export_model(shared_net("lenet-300-100", 5), good, "compressed")
    bad = _tamper(good, tmp_path / "bad.h5", CORRUPTIONS[what])
    with pytest.raises(SparsenetError) as e:
        load_model(bad)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)
    assert cli.main(["predict", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_flipped_bytes_in_the_streams_never_give_a_traceback_or_a_hang(tmp_path):
    import time

    good = tmp_path / "good.h5"
    net = shared_net("lenet-300-100", 5)
    export_model(net, good, "compressed")
    with h5py.File(good) as f:
        n = len(f["stream"])
    for i in range(0, n, max(1, n // 40)):  # the checksum catches most; the decoder the rest
        def flip(f, i=i):
            s = f["stream"][()]
            s[i] ^= 0x5A
            _replace(f, "stream", s)
        bad = _tamper(good, tmp_path / "bad.h5", flip)  # rewritten without the checksum: the decoder must cope
        t0 = time.perf_counter()
        try:
            back = load_model(bad)
        except SparsenetError as e:
            assert "\n" not in str(e)
        else:  # a flip that still decodes gives another valid network of the same shape
            assert [p.data.shape for p in back.params().values()] == [p.data.shape for p in net.params().values()]
        assert time.perf_counter() - t0 < 5


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """LeNet-300-100 trained 2 epochs on 3,000 MNIST images, then pruned to 10% in one round."""
    d = tmp_path_factory.mktemp("dc")
    train(d / "dense", TrainConfig(epochs=2, train_subset=3000), progress=False)
    prune_run(d / "dense" / "checkpoint.h5", d / "pruned", Schedule.from_dict(
        {"retrain": {"epochs": 1, "lr": 0.01}, "rounds": [{"criterion": "percentile", "amount": 0.9}]}), progress=False)
    return d / "pruned" / "checkpoint.h5"


@pytest.mark.mnist
def test_quantise_command_then_the_compressed_file_predicts_as_the_checkpoint(pruned, tmp_path, capsys):
    assert cli.main(["quantise", str(pruned), "--out", str(tmp_path / "q"), "--bits", "fc1=4,default=5",
                     "--epochs", "2", "--no-progress"]) == 0
    assert "shared values per layer" in capsys.readouterr().out
    ck = load_checkpoint(tmp_path / "q" / "checkpoint.h5")
    net = ck.net
    for name, p in net.params().items():
        if p.prunable:
            assert len(p.codebook) <= (16 if name == "fc1.W" else 32)
            assert len(numpy.unique(p.data[p.mask == 1])) <= len(p.codebook)
    log = [json.loads(x) for x in (tmp_path / "q" / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log] == ["start", "quantise", "epoch", "epoch", "round"]
    before = load_checkpoint(pruned).net
    assert all(numpy.array_equal(a.mask, b.mask) for a, b in zip(before.params().values(), net.params().values()))
    assert cli.main(["export", str(tmp_path / "q" / "checkpoint.h5"), str(tmp_path / "m.h5"), "--format",
                     "compressed"]) == 0
    capsys.readouterr()
    x, t = load_split("mnist", net.input_shape, numpy, split="test")["test"]
    back = load_model(tmp_path / "m.h5")
    assert numpy.array_equal(back.predict(x), net.predict(x))  # all 10,000 test images
    assert cli.main(["predict", str(tmp_path / "m.h5"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_error"] == net.error(x, t)


@pytest.mark.mnist
def test_a_killed_quantise_run_resumes_bit_identically(pruned, tmp_path, kill_training):
    sched = {"seed": 1, "rounds": [{"quantise": {"default": 4}, "epochs": 2, "lr": 0.001, "lr_policy": "fixed"}]}
    straight = prune_run(pruned, tmp_path / "a", Schedule.from_dict(sched), progress=False)
    kill_training(2)
    with pytest.raises(Killed):
        prune_run(pruned, tmp_path / "b", Schedule.from_dict(sched), progress=False)
    kill_training(None)
    resumed = prune_run(None, tmp_path / "b", resume=True, progress=False)
    strip = lambda log: [{k: v for k, v in r.items() if k != "seconds"} for r in log]  # noqa: E731
    assert strip(resumed) == strip(straight)
    a, b = (load_checkpoint(tmp_path / d / "checkpoint.h5").net for d in "ab")
    for n, p in a.params().items():
        q = b.params()[n]
        assert numpy.array_equal(p.data, q.data) and numpy.array_equal(p.mask, q.mask), n
        if p.prunable:
            assert numpy.array_equal(p.codebook, q.codebook) and numpy.array_equal(p.codes, q.codes), n


def test_bad_bits_fail_before_any_work(tmp_path, capsys):
    ck = tmp_path / "ck.h5"
    from sparsenet.checkpoint import save_checkpoint

    save_checkpoint(ck, build_model("lenet-300-100"))
    for bits, msg in (("9", "1..8"), ("conv1=4", "no prunable layer named conv1"), ("0", "1..8")):
        assert cli.main(["quantise", str(ck), "--out", str(tmp_path / "q"), "--bits", bits]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
