import json

import h5py
import numpy as np
import pytest

from sparsenet.checkpoint import load_checkpoint, save_checkpoint
from sparsenet.model import build_model
from sparsenet.optim import SGD
from sparsenet.util import SparsenetError


def _trained_state(seed=0):
    net = build_model("lenet-300-100", seed)
    opt = SGD(net.params(), lr=0.05, lr_policy="step", step_size=10)
    rng = np.random.default_rng(seed)
    x = rng.random((16, 784), dtype=np.float32)
    t = rng.integers(0, 10, 16)
    # prune a few weights by hand so masks are not all ones
    keep = np.ones((300, 784), dtype=bool)
    keep[:, :50] = False
    net.params()["fc1.W"].prune(keep)
    for _ in range(2):
        net.loss_and_backward(x, t)
        opt.step()
    rng.random(7)  # advance the generator so its state is not the seed state
    return net, opt, rng


def test_round_trip_is_exact(tmp_path):
    net, opt, rng = _trained_state()
    path = tmp_path / "ck.h5"
    save_checkpoint(path, net, opt, rng, epoch=3, config={"model": "lenet-300-100"})
    ck = load_checkpoint(path)
    assert ck.epoch == 3 and ck.config == {"model": "lenet-300-100"}
    assert ck.optimizer_state["iteration"] == 2
    for name, p in net.params().items():
        q = ck.net.params()[name]
        assert np.array_equal(p.data, q.data) and np.array_equal(p.mask, q.mask)
        assert np.array_equal(p.state["momentum"], q.state["momentum"])
    r2 = ck.rng()
    assert np.array_equal(r2.random(5), rng.random(5))
    assert ck.net.params()["fc1.W"].nonzero() == 300 * (784 - 50)
    # no temporary files are left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.h5"]


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    net, opt, rng = _trained_state()
    path = tmp_path / "ck.h5"
    save_checkpoint(path, net, opt, rng, epoch=1)
    before = path.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    with pytest.raises(RuntimeError):
        save_checkpoint(path, net, opt, rng, epoch=2)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.h5"]


def _corrupt(tmp_path, edit):
    net, opt, rng = _trained_state()
    path = tmp_path / "ck.h5"
    save_checkpoint(path, net, opt, rng, epoch=1)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def _respec(f, edit):
    spec = json.loads(f.attrs["network"])
    edit(spec)
    f.attrs["network"] = json.dumps(spec)


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.__delitem__("params/fc2.W"), "missing"),
    (lambda f: f.__delitem__("velocity/fc1.b"), "missing"),
    (lambda f: (f.__delitem__("params/fc3.b"), f.create_dataset("params/fc3.b", data=np.zeros(7, np.float32))), "shape"),
    (lambda f: f["masks/fc1.W"].__setitem__((0, 0), 2), "other than 0 and 1"),
    (lambda f: f["params/fc1.W"].__setitem__((0, 0), 1.5), "pruned position"),
    (lambda f: f["velocity/fc1.W"].__setitem__((0, 1), 0.5), "pruned position"),
    (lambda f: f["params/fc2.W"].__setitem__((0, 0), np.nan), "NaN"),
    (lambda f: f.attrs.__setitem__("format", "something-else"), "not a sparsenet checkpoint"),
    (lambda f: f.attrs.__setitem__("network", "{not json"), "JSON"),
    (lambda f: f.attrs.__setitem__("network", json.dumps({"layers": [{"kind": "lstm"}], "input_shape": [1]})), "layer kind"),
    # descriptions consistent with the stored arrays but wrong as networks
    (lambda f: _respec(f, lambda s: s.update(input_shape=[28, 28, 1])), "expected \\(784,\\)"),
    (lambda f: _respec(f, lambda s: s["layers"].clear()), "no layers"),
    (lambda f: _respec(f, lambda s: s["layers"][2].update(n_in=301)), "expected \\(301,\\)"),
    (lambda f: _respec(f, lambda s: s["layers"][0].update(n_out=10**8, n_in=10**8)), "parameters|expected"),
    (lambda f: _respec(f, lambda s: (s["layers"][0].update(n_out=299), s["layers"][2].update(n_in=299))), "declares"),
])
def test_corrupt_checkpoints_are_rejected(tmp_path, edit, message):
    path = _corrupt(tmp_path, edit)
    with pytest.raises(SparsenetError, match=message) as e:
        load_checkpoint(path)
    assert "ck.h5" in str(e.value)


def test_not_hdf5_and_missing(tmp_path):
    bad = tmp_path / "junk.h5"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(SparsenetError, match="junk.h5"):
        load_checkpoint(bad)
    with pytest.raises(SparsenetError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.h5")
    trunc = tmp_path / "trunc.h5"
    net, opt, rng = _trained_state()
    save_checkpoint(trunc, net, opt, rng)
    trunc.write_bytes(trunc.read_bytes()[:2000])
    with pytest.raises(SparsenetError, match="trunc.h5"):
        load_checkpoint(trunc)


def test_text_attributes_are_fixed_length_and_older_str_ones_still_load(tmp_path):
    """Text lives in the checksummed object header (fixed-length bytes); checkpoints
    written with variable-length str attributes, as before, load the same."""
    net, opt, rng = _trained_state()
    path = tmp_path / "ck.h5"
    save_checkpoint(path, net, opt, rng, epoch=3, config={"model": "lenet-300-100"})
    with h5py.File(path, "r+") as f:
        assert all(isinstance(f.attrs[k], bytes) for k in ("format", "network", "config", "optimizer", "rng"))
        assert f["params/fc1.W"].fletcher32
        for k in ("format", "network", "config", "optimizer", "rng"):
            f.attrs[k] = f.attrs[k].decode()
        assert isinstance(f.attrs["network"], str)
    ck = load_checkpoint(path)
    assert ck.epoch == 3 and ck.config == {"model": "lenet-300-100"} and ck.rng_state == rng.bit_generator.state
    assert all(np.array_equal(p.data, ck.net.params()[n].data) for n, p in net.params().items())


FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("tag", ["mlp", "cnn"])
def test_checkpoints_of_the_previous_release_load_bit_exactly(tag):
    """Files written before the parameter owned its momentum (tests/fixtures, written by
    the code of the previous release) load to the same weights, masks, momentum, RNG."""
    e = json.loads((FIXTURES / "expected_v1.json").read_text())[tag]
    ck = load_checkpoint(FIXTURES / f"{tag}_checkpoint_v1.h5")
    assert ck.net.spec()["layers"] == e["spec"]["layers"] and ck.epoch == 3
    for n, p in ck.net.params().items():
        assert np.array_equal(p.data, np.asarray(e["params"][n], dtype=np.float32)), n
        assert np.array_equal(p.mask, np.asarray(e["masks"][n], dtype=np.float32)), n
        assert np.array_equal(p.state["momentum"], np.asarray(e["velocity"][n], dtype=np.float32)), n
    assert ck.rng().bit_generator.state == e["rng"] and ck.optimizer_state["iteration"] == 6
    x = np.asarray(e["input"], dtype=np.float32)
    np.testing.assert_allclose(ck.net.forward(x), np.asarray(e["logits"]), rtol=1e-6, atol=1e-6)


def test_a_surviving_zero_weight_stays_a_connection_through_save_and_load(tmp_path):
    net, opt, rng = _trained_state()
    W = net.params()["fc2.W"]
    W.data[3, 4] = 0.0  # a survivor trained to exactly zero
    save_checkpoint(tmp_path / "ck.h5", net, opt, rng)
    q = load_checkpoint(tmp_path / "ck.h5").net.params()["fc2.W"]
    assert q.mask[3, 4] == 1 and q.data[3, 4] == 0.0 and q.nonzero() == W.nonzero()
