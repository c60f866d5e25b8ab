"""Pruning: criteria, the mask invariants, §3.2 dropout adjustment, §3.3 freezing, §3.5 neurons."""
import math
import re

import numpy
import pytest
from hypothesis import given, settings, strategies as st

from sparsenet import pruning as P
from sparsenet.backend import asnumpy
from sparsenet.model import build_model, build_network
from sparsenet.optim import SGD
from sparsenet.util import SparsenetError

from gradcheck import distinct_values

MLP = {"name": "mlp", "input_shape": [6], "layers": [
    {"kind": "linear", "name": "fc1", "n_in": 6, "n_out": 8},
    {"kind": "relu", "name": "relu1"},
    {"kind": "dropout", "name": "drop1", "rate": 0.5},
    {"kind": "linear", "name": "fc2", "n_in": 8, "n_out": 5},
    {"kind": "relu", "name": "relu2"},
    {"kind": "linear", "name": "fc3", "n_in": 5, "n_out": 3},
]}


def conv_spec(pad2=0):
    """conv → relu → pool → conv(pad2) → pool → flatten → fc → relu → fc on 10×10×2 inputs."""
    s2 = (10 - 2) // 2  # conv1 3×3 valid → 8, pool → 4
    s3 = (s2 + 2 * pad2 - 2) // 2  # conv2 3×3 → s2 + 2·pad2 − 2, pool
    return {"name": "cnn", "input_shape": [10, 10, 2], "layers": [
        {"kind": "conv2d", "name": "conv1", "c_in": 2, "c_out": 5, "k": 3},
        {"kind": "relu", "name": "relu1"},
        {"kind": "maxpool2d", "name": "pool1", "k": 2, "stride": 2},
        {"kind": "conv2d", "name": "conv2", "c_in": 5, "c_out": 4, "k": 3, "pad": pad2},
        {"kind": "maxpool2d", "name": "pool2", "k": 2, "stride": 2},
        {"kind": "flatten", "name": "flatten"},
        {"kind": "linear", "name": "fc1", "n_in": s3 * s3 * 4, "n_out": 6},
        {"kind": "relu", "name": "relu3"},
        {"kind": "linear", "name": "fc2", "n_in": 6, "n_out": 3},
    ]}


def weights(net):
    return {n: asnumpy(p.data).copy() for n, p in net.params().items()}


def masks(net):
    return {n: asnumpy(p.mask).copy() for n, p in net.params().items()}


# ----------------------------------------------------------------------------- criteria
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 2.5))
@settings(max_examples=30, deadline=None)
def test_quality_prunes_below_q_times_std_of_survivors(seed, q):
    rng = numpy.random.default_rng(seed)
    W = rng.normal(size=(7, 9)).astype(numpy.float32)
    M = (rng.random(W.shape) < 0.7).astype(numpy.float32)
    W *= M
    W[0, 0], M[0, 0] = 0.0, 1.0  # a survivor sitting exactly at zero counts in the std
    new = P.quality_mask(W, M, q)
    t = q * W[M == 1].std()
    expect = (M == 1) & (numpy.abs(W) >= t)
    numpy.testing.assert_array_equal(new, expect.astype(numpy.float32))


def test_quality_uses_only_surviving_weights_for_std():
    W = numpy.array([[0.0, 0.0, 1.0, -1.0, 3.0]], dtype=numpy.float32)
    M = numpy.array([[0, 0, 1, 1, 1]], dtype=numpy.float32)
    std = numpy.std([1.0, -1.0, 3.0])  # 1.633; the two pruned zeros would give 1.47
    new = P.quality_mask(W, M, 1.0 / std * 1.5)  # threshold 1.5: keeps only the 3
    numpy.testing.assert_array_equal(new, [[0, 0, 0, 0, 1]])


@given(st.integers(0, 2**31 - 1), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
@settings(max_examples=40, deadline=None)
def test_percentile_reaches_target_and_keeps_the_largest(seed, before, target):
    rng = numpy.random.default_rng(seed)
    W = distinct_values(rng, (6, 11)).astype(numpy.float32)
    M = (rng.random(W.shape) >= before).astype(numpy.float32)
    W *= M
    new = P.percentile_mask(W, M, target)
    n_keep = int(round((1 - target) * W.size))
    assert new.sum() == min(n_keep, M.sum())
    assert numpy.all(new <= M)  # only loses entries
    kept, dropped = numpy.abs(W[new == 1]), numpy.abs(W[(M == 1) & (new == 0)])
    if kept.size and dropped.size:
        assert kept.min() > dropped.max()


def test_percentile_ties_keep_the_first_positions():
    W = numpy.ones((2, 3), dtype=numpy.float32)
    new = P.percentile_mask(W, numpy.ones_like(W), 0.5)
    numpy.testing.assert_array_equal(new, [[1, 1, 1], [0, 0, 0]])


@given(st.integers(0, 2**31 - 1), st.floats(0.0, 0.99))  # MLP: 103 weights, 0.99 keeps one
@settings(max_examples=30, deadline=None)
def test_global_uses_one_threshold_across_layers(seed, target):
    net = build_network(MLP, seed=seed % 1000)
    rng = numpy.random.default_rng(seed)
    prunable = [n for n, p in net.params().items() if p.prunable]
    for n in prunable:  # different scales per layer, all magnitudes distinct
        net.params()[n].data[...] = distinct_values(rng, net.params()[n].data.shape) * (1 + prunable.index(n))
    before = weights(net)
    P.prune(net, "global", target)
    params = net.params()
    kept = numpy.concatenate([numpy.abs(before[n])[asnumpy(params[n].mask) == 1] for n in prunable])
    gone = numpy.concatenate([numpy.abs(before[n])[asnumpy(params[n].mask) == 0] for n in prunable])
    assert kept.size == int(round((1 - target) * (kept.size + gone.size)))
    if kept.size and gone.size:
        assert gone.max() < kept.min()
    assert all(p.nonzero() == p.size for p in params.values() if not p.prunable)


def test_global_prunes_the_smallest_overall():
    net = build_network(MLP)
    params = net.params()
    rng = numpy.random.default_rng(0)
    for name in ("fc1.W", "fc2.W", "fc3.W"):
        params[name].data[...] = distinct_values(rng, params[name].data.shape)
    params["fc3.W"].data *= 100  # fc3 holds all the large weights
    before = weights(net)
    P.prune(net, "global", 0.9)
    survivors = {n: int(params[n].nonzero()) for n in ("fc1.W", "fc2.W", "fc3.W")}
    assert survivors == {"fc1.W": 0, "fc2.W": 0, "fc3.W": 10}  # round(0.1 · 103), all from fc3
    cut = max(numpy.abs(before[n])[asnumpy(params[n].mask) == 0].max() for n in survivors)
    keep = min(numpy.abs(before[n])[asnumpy(params[n].mask) == 1].min() for n in survivors if survivors[n])
    assert cut < keep


def test_prune_per_layer_settings_default_and_untouched_layers():
    net = build_network(MLP)
    stats = P.prune(net, "percentile", {"fc1": 0.5, "default": 0.25})
    assert stats == {"fc1.W": (48, 24), "fc2.W": (40, 30), "fc3.W": (15, 11)}
    stats = P.prune(net, "percentile", {"fc2": 0.5})
    assert set(stats) == {"fc2.W"}
    assert net.params()["fc1.W"].nonzero() == 24 and net.params()["fc2.W"].nonzero() == 20
    assert all(p.nonzero() == p.size for p in net.params().values() if not p.prunable)


@pytest.mark.parametrize("criterion, amount, message", [
    ("quality", {"fc9": 1.0}, "no prunable layer named fc9"),
    ("quality", -1.0, "quality amount for fc1 must be >= 0"),
    ("global", 1.5, "global criterion takes one target sparsity in [0, 1]"),
    ("percentile", 1.5, "percentile amount for fc1 must be in [0, 1]"),
    ("global", {"fc1": 0.5}, "global criterion takes one target"),
    ("magic", 1.0, "unknown pruning criterion"),
    ("quality", "lots", "must be a number"),
])
def test_prune_rejects_bad_settings(criterion, amount, message):
    with pytest.raises(SparsenetError, match=message.replace("[", r"\[").replace("]", r"\]")):
        P.prune(build_network(MLP), criterion, amount)


def test_prune_zeroes_weights_and_momentum_and_keeps_survivors(xp):
    net = build_network(MLP, xp=xp)
    rng = numpy.random.default_rng(1)
    for p in net.params().values():
        p.state["momentum"] = xp.asarray(rng.normal(size=p.data.shape).astype(numpy.float32))
    before_w = weights(net)
    before_v = {n: asnumpy(p.state["momentum"]).copy() for n, p in net.params().items()}
    P.prune(net, "quality", 0.8)  # the momentum is the parameter's: no optimiser argument
    P.check_masks(net)
    for n, p in net.params().items():
        keep = asnumpy(p.mask) == 1
        numpy.testing.assert_array_equal(asnumpy(p.data)[keep], before_w[n][keep])  # survivors untouched
        numpy.testing.assert_array_equal(asnumpy(p.state["momentum"])[keep], before_v[n][keep])
        assert numpy.all(asnumpy(p.state["momentum"])[~keep] == 0)


def _refused(net, criterion, amount):
    """The message of a prune that ``prune`` refuses; the refusal leaves every parameter as it was."""
    before = {n: (asnumpy(p.data).copy(), asnumpy(p.mask).copy()) for n, p in net.params().items()}
    with pytest.raises(SparsenetError) as e:
        P.prune(net, criterion, amount)
    for n, p in net.params().items():
        assert numpy.array_equal(asnumpy(p.data), before[n][0]) and numpy.array_equal(asnumpy(p.mask), before[n][1])
    assert "\n" not in str(e.value)
    return str(e.value)


def _suggested(message):
    return float(re.search(r"the largest that keeps one(?: in every layer)? is ([0-9.]+)", message).group(1))


@given(st.integers(0, 1000), st.booleans())
@settings(max_examples=20, deadline=None)
def test_a_quality_that_prunes_a_whole_layer_is_refused_with_the_largest_that_does_not(seed, per_layer):
    """q above max|w|/std of a layer's survivors prunes all of it: refused, naming the largest q that keeps a
    weight (in every layer, for one q for all), which then prunes and keeps one; nothing changes on refusal."""
    net = build_network(MLP, seed=seed)
    P.prune(net, "percentile", {"fc1": 0.5})  # survivors, not the whole layer, count
    limit = {n: float(numpy.abs(w := asnumpy(p.data)[asnumpy(p.mask) == 1]).max() / w.std())
             for n, p in net.params().items() if p.prunable}
    amount = {"fc2": 1.01 * limit["fc2.W"], "default": 0.0} if per_layer else 10.0
    message = _refused(net, "quality", amount)
    assert "prunes every weight of" in message and "quality amount" in message
    best = _suggested(message)
    want = limit["fc2.W"] if per_layer else min(limit.values())
    assert want - 1e-4 <= best <= want
    P.prune(net, "quality", {"fc2": best, "default": 0.0} if per_layer else best)
    assert all(p.nonzero() >= 1 for p in net.params().values())


@pytest.mark.parametrize("criterion, amount, layer", [
    ("percentile", 1.0, "fc3"), ("percentile", {"fc1": 0.99, "default": 0.5}, "fc1"), ("global", 1.0, None)])
def test_a_fraction_that_prunes_everything_is_refused(criterion, amount, layer):
    """Percentile targets are fractions of the original layer, global of all prunable weights: one that
    rounds to nothing kept is refused with the largest that keeps a weight."""
    net = build_network(MLP)
    message = _refused(net, criterion, amount)
    size = {"fc1": 48, "fc3": 15, None: 103}[layer]  # fc3 the smallest layer: one number must suit it
    assert _suggested(message) == math.floor(1e4 * (1 - 1 / size)) / 1e4, message
    P.prune(net, criterion, _suggested(message) if layer != "fc1" else {"fc1": _suggested(message)})
    assert sum(p.nonzero() for p in net.params().values() if p.prunable) >= 1


def test_later_rounds_are_checked_for_what_the_weights_do_not_decide():
    """Before earlier rounds have pruned, only fractions can be checked; a q is checked on the net it prunes."""
    net = build_network(MLP)
    assert P.check_amount(net, "quality", 100.0, current=False) == dict.fromkeys(["fc1.W", "fc2.W", "fc3.W"], 100.0)
    with pytest.raises(SparsenetError, match="prunes every weight"):
        P.check_amount(net, "quality", 100.0)
    with pytest.raises(SparsenetError, match="prunes every weight of fc1, fc2, fc3; the largest that keeps one in "
                                             "every layer is 0.9333"):  # fc3: 15 weights
        P.check_amount(net, "percentile", 0.99, current=False)


def test_a_survivor_at_exactly_zero_stays_a_survivor():
    net = build_network(MLP)
    W = net.params()["fc1.W"]
    W.data[0, 0] = 0.0
    P.prune(net, "percentile", 0.0)  # nothing to prune: the zero weight is not "already pruned"
    assert W.mask[0, 0] == 1 and W.nonzero() == W.size


# ----------------------------------------------------------------------------- §3.2 dropout
def test_dropout_rate_follows_sqrt_of_connection_ratio():
    net = build_network(MLP)
    P.prune(net, "percentile", {"fc1": 0.75})
    rates = P.adjust_dropout(net)
    assert rates == {"drop1": pytest.approx(0.5 * math.sqrt(12 / 48))}
    assert net.layer("drop1").rate == rates["drop1"] and net.layer("drop1").base_rate == 0.5
    # the original connection count survives dead-neuron removal (C_io is the dense count)
    keep = numpy.ones(net.params()["fc2.W"].data.shape, dtype=bool)
    keep[:, :4] = False
    net.params()["fc2.W"].prune(keep)
    P.remove_dead_neurons(net)
    assert net.params()["fc1.W"].data.shape[0] < 8
    assert P.adjust_dropout(net)["drop1"] == pytest.approx(0.5 * math.sqrt(net.params()["fc1.W"].nonzero() / 48))
    assert build_network(net.spec()).layer("drop1").base_rate == 0.5  # D_o is saved with the network


# ----------------------------------------------------------------------------- §3.3 freezing
def test_frozen_layers_do_not_move_and_backward_stops_early():
    net = build_network(conv_spec())
    rng = numpy.random.default_rng(0)
    x = rng.random((4, 10, 10, 2), dtype=numpy.float32)
    t = rng.integers(0, 3, 4)
    net.freeze(["conv1", "conv2"])
    opt = SGD(net.params(), lr=0.1, momentum=0.9, weight_decay=1e-3, l1=1e-3)
    before = weights(net)
    for _ in range(3):
        net.loss_and_backward(x, t)
        assert net.params()["conv1.W"].grad is None and net.params()["conv2.W"].grad is None
        opt.step()
    after = weights(net)
    for n in before:
        same = numpy.array_equal(before[n], after[n])
        assert same == n.startswith("conv"), n
    assert not net.layers[6].need_gx  # fc1 is the first layer that trains
    net.freeze(["fc1", "fc2"])  # and vice versa (§3.3)
    net.loss_and_backward(x, t)
    assert net.params()["conv1.W"].grad is not None and net.params()["fc1.W"].grad is None
    with pytest.raises(SparsenetError, match="cannot freeze pool1"):
        net.freeze(["pool1"])


# ----------------------------------------------------------------------------- §3.5 neurons
def _random_pruned(spec, seed, density, xp=numpy):
    net = build_network(spec, seed=seed % 1000, xp=xp)
    rng = numpy.random.default_rng(seed)
    for p in net.params().values():
        if p.prunable:
            p.prune(xp.asarray(rng.random(p.data.shape) < density))
        else:
            p.data[...] = xp.asarray(rng.normal(size=p.data.shape).astype(numpy.float32))  # ± biases
    return net


@pytest.mark.parametrize("spec", [MLP, conv_spec(0), conv_spec(1)], ids=["mlp", "cnn", "cnn-padded"])
@given(seed=st.integers(0, 2**31 - 1), density=st.sampled_from([0.05, 0.15, 0.3, 0.6]))
@settings(max_examples=25, deadline=None)
def test_neuron_removal_keeps_outputs_and_leaves_no_dead_unit(spec, seed, density):
    net = _random_pruned(spec, seed, density)
    rng = numpy.random.default_rng(seed + 1)
    x = rng.random((5, *net.input_shape), dtype=numpy.float32)
    y0 = net.forward(x)
    for p in net.params().values():  # identities ride along as a state array
        p.state["ids"] = numpy.where(p.mask == 1, numpy.arange(p.size).reshape(p.data.shape), 0).astype(numpy.float32)
    before = {n: (weights(net)[n], masks(net)[n]) for n in net.params()}
    removed = P.remove_dead_neurons(net)
    numpy.testing.assert_allclose(net.forward(x), y0, rtol=1e-5, atol=1e-5)
    P.check_masks(net)
    for n, p in net.params().items():  # every surviving entry is the same weight, same mask
        idx = p.state["ids"].astype(numpy.int64)
        assert idx.shape == p.data.shape
        alive = p.mask == 1
        if p.prunable:  # (biases may have absorbed folded constants)
            numpy.testing.assert_array_equal(before[n][0].ravel()[idx][alive], p.data[alive])
        assert numpy.all(before[n][1].ravel()[idx][alive] == 1)
    for layer, k in removed.items():
        assert before[f"{layer}.b"][0].size - net.params()[f"{layer}.b"].size == k > 0
    # a second pass finds nothing left to remove (apart from kept exceptions)
    assert P.remove_dead_neurons(net) == {}
    out_layer = [l for l in net.layers if "W" in l.params][-1]
    assert out_layer.params["W"].data.shape[0] == 3
    assert build_network(net.spec()).spec() == net.spec()  # the shrunk network rebuilds


def _cut(p, index):
    """Prune ``p[index]`` through Param (its value and state zeroed with the mask)."""
    keep = numpy.ones(p.data.shape)
    keep[index] = 0
    p.prune(keep)


def test_neuron_removal_folds_constant_units_into_the_next_bias():
    net = build_network(MLP)
    p = net.params()
    _cut(p["fc1.W"], 2)  # unit 2 of fc1 loses all inputs: emits relu(b2)
    p["fc1.b"].data[2] = 0.7
    x = numpy.random.default_rng(0).random((3, 6), dtype=numpy.float32)
    y0 = net.forward(x)
    b2_before = p["fc2.b"].data.copy()
    col = p["fc2.W"].data[:, 2].copy()
    assert P.remove_dead_neurons(net) == {"fc1": 1}
    numpy.testing.assert_allclose(net.params()["fc2.b"].data, b2_before + 0.7 * col, rtol=1e-6)
    numpy.testing.assert_allclose(net.forward(x), y0, rtol=1e-6, atol=1e-6)
    assert net.layer("fc1").n_out == 7 and net.layer("fc2").n_in == 7


def test_constant_unit_before_padded_conv_is_kept():
    net = build_network(conv_spec(pad2=1))
    p = net.params()
    _cut(p["conv1.W"], 1)
    p["conv1.b"].data[1] = 0.5  # relu(0.5) ≠ 0, and conv2 pads with zeros: not a constant there
    assert "conv1" not in P.remove_dead_neurons(net)
    p["conv1.b"].data[1] = -0.5  # relu(−0.5) = 0: the unit is silent and goes
    assert P.remove_dead_neurons(net)["conv1"] == 1


def test_every_layer_keeps_one_unit():
    net = build_network(MLP)
    for p in net.params().values():
        if p.prunable:
            p.prune(numpy.zeros(p.data.shape))
    x = numpy.ones((2, 6), dtype=numpy.float32)
    y0 = net.forward(x)
    P.remove_dead_neurons(net)
    assert [l.params["W"].data.shape for l in net.layers if l.params] == [(1, 6), (1, 1), (3, 1)]
    numpy.testing.assert_allclose(net.forward(x), y0, rtol=1e-6, atol=1e-6)


def test_lenet5_removal_through_flatten():
    net = _random_pruned(build_model("lenet-5").spec(), 3, 0.02)
    fc1 = net.params()["fc1.W"]
    _cut(fc1, (slice(None), slice(7, None, 50)))  # conv2's channel 7 feeds columns 7, 57, 107, … (NHWC flatten)
    x = numpy.random.default_rng(0).random((2, 28, 28, 1), dtype=numpy.float32)
    y0 = net.forward(x)
    removed = P.remove_dead_neurons(net)
    assert removed.get("conv2", 0) > 0 and removed.get("fc1", 0) > 0
    assert net.layer("fc1").n_in == net.layer("conv2").params["W"].data.shape[0] * 16
    numpy.testing.assert_allclose(net.forward(x), y0, rtol=1e-5, atol=1e-5)
    assert P.densities(net)["fc1"] <= 0.02 * 1.5  # still measured against the dense 400,000
