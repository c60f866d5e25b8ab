"""Tests for sparsenet.model: the paper's architectures, spec round trips, and whole-network
finite-difference gradient checks of ``Network.loss_and_backward`` in float64."""
import json

import numpy as np
import pytest

from sparsenet import layers as L
from sparsenet.backend import asnumpy
from sparsenet.model import build_model, build_network
from sparsenet.util import SparsenetError

from gradcheck import assert_grad, numerical_grad


# ----------------------------------------------------------------------------- architectures
def test_param_counts():
    assert build_model("lenet-300-100").count_params() == 266610
    assert build_model("lenet-5").count_params() == 431080
    assert build_model("lenet-5").count_nonzero() == 431080


def test_lenet5_summary():
    rows = {r["name"]: r for r in build_model("lenet-5").summary()}
    assert list(rows) == ["conv1", "pool1", "conv2", "pool2", "flatten", "fc1", "relu1", "fc2"]
    assert rows["conv1"]["input_shape"] == [28, 28, 1]
    assert rows["conv1"]["output_shape"] == [24, 24, 20]
    assert rows["conv1"]["weight_shape"] == [20, 5, 5, 1]
    assert rows["conv1"]["params"] == 520
    assert rows["conv1"]["macs"] == 24 * 24 * 20 * 25
    assert rows["pool1"]["output_shape"] == [12, 12, 20]
    assert rows["pool1"]["weight_shape"] is None and rows["pool1"]["params"] == 0 and rows["pool1"]["macs"] == 0
    assert rows["conv2"]["output_shape"] == [8, 8, 50]
    assert rows["conv2"]["weight_shape"] == [50, 5, 5, 20]
    assert rows["conv2"]["macs"] == 8 * 8 * 50 * 5 * 5 * 20
    assert rows["pool2"]["output_shape"] == [4, 4, 50]
    assert rows["flatten"]["output_shape"] == [800]
    assert rows["fc1"]["weight_shape"] == [500, 800]
    assert rows["fc1"]["output_shape"] == [500]
    assert rows["fc1"]["params"] == 400500
    assert rows["fc1"]["macs"] == 400000
    assert rows["fc2"]["weight_shape"] == [10, 500]
    assert rows["fc2"]["output_shape"] == [10]
    assert sum(r["params"] for r in rows.values()) == 431080
    assert all(r["nonzero_params"] == r["params"] for r in rows.values())


def test_lenet300_summary():
    rows = build_model("lenet-300-100").summary()
    assert [r["weight_shape"] for r in rows] == [[300, 784], None, [100, 300], None, [10, 100]]
    assert [r["output_shape"] for r in rows] == [[300], [300], [100], [100], [10]]
    assert [r["macs"] for r in rows] == [235200, 0, 30000, 0, 1000]


@pytest.mark.parametrize("name", ["lenet-300-100", "lenet-5"])
def test_summary_shapes_match_forward(name):
    """The shapes summary() predicts are the shapes the forward pass produces."""
    net = build_model(name)
    x = np.random.default_rng(0).random((3, *net.input_shape)).astype(np.float32)
    for layer, row in zip(net.layers, net.summary()):
        assert list(x.shape[1:]) == row["input_shape"], layer.name
        x = layer.forward(x)
        assert list(x.shape[1:]) == row["output_shape"], layer.name
    assert x.shape == (3, 10)
    assert x.dtype == np.float32


def test_unknown_model_and_bad_spec():
    with pytest.raises(SparsenetError):
        build_model("nope")
    with pytest.raises(SparsenetError):
        build_network({"input_shape": [4], "layers": [{"kind": "nope", "name": "x"}]})
    with pytest.raises(SparsenetError):
        build_network({"layers": []})


@pytest.mark.parametrize("name", ["lenet-300-100", "lenet-5"])
def test_spec_round_trip(name):
    net = build_model(name, seed=3)
    spec = json.loads(json.dumps(net.spec()))  # JSON-able
    net2 = build_network(spec, seed=3)
    assert net2.spec() == net.spec()
    assert net2.input_shape == net.input_shape
    assert [(l.name, l.kind) for l in net2.layers] == [(l.name, l.kind) for l in net.layers]
    assert {k: p.data.shape for k, p in net2.params().items()} == {k: p.data.shape for k, p in net.params().items()}
    assert net2.summary() == net.summary()
    # same seed, same initial weights; a different seed gives different ones
    for k, p in net.params().items():
        np.testing.assert_array_equal(p.data, net2.params()[k].data)
    other = build_network(spec, seed=4)
    assert not np.array_equal(other.params()["fc1.W"].data, net.params()["fc1.W"].data)


def test_spec_round_trip_custom_net():
    spec = {"name": "custom", "input_shape": [6, 6, 1], "layers": CONV_LAYERS}
    net = build_network(spec)
    net2 = build_network(net.spec())
    assert net2.spec() == net.spec() == {**spec, "origin": {
        "conv1": {"weights": 18, "params": 20, "macs": 648}, "fc1": {"weights": 72, "params": 76, "macs": 72},
        "fc2": {"weights": 12, "params": 15, "macs": 12}}}
    assert [p.data.shape for p in net2.params().values()] == [(2, 3, 3, 1), (2,), (4, 18), (4,), (3, 4), (3,)]


def test_first_layer_needs_no_input_gradient():
    net = build_model("lenet-5")
    assert [l.need_gx for l in net.layers] == [False] + [True] * (len(net.layers) - 1)


# ----------------------------------------------------------------------------- gradient checks
CONV_LAYERS = [
    {"kind": "conv2d", "name": "conv1", "c_in": 1, "c_out": 2, "k": 3, "stride": 1, "pad": 1},
    {"kind": "maxpool2d", "name": "pool1", "k": 2, "stride": 2},
    {"kind": "relu", "name": "relu1"},
    {"kind": "flatten", "name": "flatten"},
    {"kind": "linear", "name": "fc1", "n_in": 18, "n_out": 4},
    {"kind": "relu", "name": "relu2"},
    {"kind": "dropout", "name": "drop", "rate": 0.0, "base_rate": 0.0},
    {"kind": "linear", "name": "fc2", "n_in": 4, "n_out": 3},
]
MLP_LAYERS = [
    {"kind": "linear", "name": "fc1", "n_in": 8, "n_out": 5},
    {"kind": "relu", "name": "relu1"},
    {"kind": "linear", "name": "fc2", "n_in": 5, "n_out": 4},
    {"kind": "relu", "name": "relu2"},
    {"kind": "linear", "name": "fc3", "n_in": 4, "n_out": 3},
]


def float64_net(xp, input_shape, layer_specs, seed, n):
    """A float64 network with random (non-zero) biases, an input batch and labels."""
    net = build_network({"name": "tiny", "input_shape": list(input_shape), "layers": layer_specs}, seed=seed, xp=xp)
    rng = np.random.default_rng(seed + 1000)
    for key, p in net.params().items():
        p.cast(xp.float64)
        if key.endswith(".b"):
            p.data = xp.asarray(rng.uniform(-0.5, 0.5, p.data.shape))
    x = xp.asarray(rng.standard_normal((n, *input_shape)))
    t = xp.asarray(rng.integers(0, 3, n))
    return net, x, t


def kink_margin(net, x):
    """Distance of the forward pass from any non-differentiable point: the smallest |pre-ReLU
    activation| and the smallest gap between the largest and second-largest entry of a
    max-pool window."""
    margin = np.inf
    for layer in net.layers:
        if isinstance(layer, L.ReLU):
            margin = min(margin, float(np.abs(asnumpy(x)).min()))
        if isinstance(layer, L.MaxPool2d):
            h = asnumpy(x)
            k, s = layer.k, layer.stride
            Ho, Wo = (h.shape[1] - k) // s + 1, (h.shape[2] - k) // s + 1
            for p in range(Ho):
                for q in range(Wo):
                    win = h[:, s * p:s * p + k, s * q:s * q + k, :].reshape(h.shape[0], k * k, -1)
                    top2 = np.sort(win, axis=1)[:, -2:, :]
                    margin = min(margin, float((top2[:, 1] - top2[:, 0]).min()))
        x = layer.forward(x)
        layer.cache = None
    return margin


def check_network_gradients(net, x, t, xp):
    assert kink_margin(net, x) > 1e-4  # FD with eps 1e-6 cannot cross a kink
    loss, z = net.loss_and_backward(x, t)
    assert z.shape == (x.shape[0], 3)
    assert abs(float(loss) - float(L.softmax_cross_entropy_forward(net.forward(x), t)[0])) < 1e-12

    def f():
        return L.softmax_cross_entropy_forward(net.forward(x, train=False), t)[0]

    params = net.params()
    assert all(p.grad is not None for p in params.values())
    for key, p in params.items():
        num = numerical_grad(f, p.data) * asnumpy(p.mask)
        assert_grad(p.grad, num)
        assert np.any(num != 0), key  # the check is not vacuous
        assert np.all(asnumpy(p.grad)[asnumpy(p.mask) == 0] == 0.0), key


# seeds chosen so that no ReLU input / max-pool gap is within 1e-4 of a kink (asserted)
CONV_SEED, MLP_SEED = 0, 0


def test_network_gradient_conv(xp):
    net, x, t = float64_net(xp, (6, 6, 1), CONV_LAYERS, CONV_SEED, 2)
    check_network_gradients(net, x, t, xp)


def test_network_gradient_mlp(xp):
    net, x, t = float64_net(xp, (8,), MLP_LAYERS, MLP_SEED, 3)
    check_network_gradients(net, x, t, xp)


@pytest.mark.parametrize("layers,shape", [(MLP_LAYERS, (8,)), (CONV_LAYERS, (6, 6, 1))])
def test_network_gradient_masked(xp, layers, shape):
    """With pruned weights (W == W ⊙ M), every grad equals FD ⊙ M, exactly 0 where pruned."""
    net, x, t = float64_net(xp, shape, layers, 0, 3)
    rng = np.random.default_rng(5)
    for key, p in net.params().items():
        if p.prunable:
            m = rng.random(p.data.shape) < 0.6
            m.reshape(-1)[0] = False
            p.prune(xp.asarray(m))
    assert net.count_nonzero() < net.count_params()
    check_network_gradients(net, x, t, xp)


def test_network_float32_default(xp):
    """Default networks compute in float32 on the requested array module."""
    net = build_model("lenet-5", xp=xp)
    assert net.xp is xp
    x = xp.asarray(np.random.default_rng(0).random((2, 28, 28, 1)).astype(np.float32))
    t = xp.asarray(np.array([1, 7]))
    loss, z = net.loss_and_backward(x, t)
    assert z.shape == (2, 10) and z.dtype == np.float32
    assert np.isfinite(float(loss))
    for key, p in net.params().items():
        assert p.grad.shape == p.data.shape, key
        assert p.grad.dtype == np.float32, key


@pytest.mark.parametrize("name", ["lenet-300-100", "lenet-5"])
def test_training_step_keeps_float32_and_row_major_state(xp, name):
    """A training step (float32 data) creates no float64 array, and every gradient is
    row-major like its parameter, so the optimiser's in-place updates never mix layouts
    (whatever layouts the layers chose for activations)."""
    import dataclasses

    from sparsenet.engine import TrainConfig
    from sparsenet.optim import SGD

    net = build_model(name, xp=xp)
    opt = SGD.from_settings(net.params(), dataclasses.asdict(TrainConfig(model=name)), batches_per_epoch=1)
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.random((8,) + net.input_shape, dtype=np.float32))
    t = xp.asarray(rng.integers(0, 10, 8))
    loss, z = net.loss_and_backward(x, t)
    assert loss.dtype == np.float32 and z.dtype == np.float32
    for key, p in net.params().items():
        assert p.grad.dtype == np.float32 and p.grad.flags.c_contiguous, key
    opt.step()
    for key, p in net.params().items():
        assert p.data.dtype == np.float32 and p.data.flags.c_contiguous, key
        v = p.state["momentum"]
        assert v.dtype == np.float32 and v.flags.c_contiguous, key
