import json

import h5py
import numpy as np
import pytest

from sparsenet.checkpoint import load_checkpoint, save_checkpoint
from sparsenet.model import build_model
from sparsenet.train import TrainConfig, make_optimizer
from sparsenet.util import SparsenetError


def _trained_state(seed=0):
    net = build_model("lenet-300-100", seed)
    opt = make_optimizer(net, TrainConfig())
    rng = np.random.default_rng(seed)
    x = rng.random((16, 784), dtype=np.float32)
    t = rng.integers(0, 10, 16)
    # prune a few weights by hand so masks are not all ones
    W = net.params()["fc1.W"]
    W.mask[:, :50] = 0
    W.data *= W.mask
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
        assert np.array_equal(opt.velocity[name], ck.velocity[name])
    r2 = np.random.default_rng()
    r2.bit_generator.state = ck.rng_state
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


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.__delitem__("params/fc2.W"), "missing"),
    (lambda f: f.__delitem__("velocity/fc1.b"), "missing"),
    (lambda f: (f.__delitem__("params/fc3.b"), f.create_dataset("params/fc3.b", data=np.zeros(7, np.float32))), "shape"),
    (lambda f: f["masks/fc1.W"].__setitem__((0, 0), 2), "other than 0 and 1"),
    (lambda f: f["params/fc1.W"].__setitem__((0, 0), 1.5), "pruned positions"),
    (lambda f: f["velocity/fc1.W"].__setitem__((0, 1), 0.5), "pruned positions"),
    (lambda f: f["params/fc2.W"].__setitem__((0, 0), np.nan), "NaN"),
    (lambda f: f.attrs.__setitem__("format", "something-else"), "not a sparsenet checkpoint"),
    (lambda f: f.attrs.__setitem__("network", "{not json"), "JSON"),
    (lambda f: f.attrs.__setitem__("network", json.dumps({"layers": [{"kind": "lstm"}], "input_shape": [1]})), "layer kind"),
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
