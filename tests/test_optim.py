import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from sparsenet.param import Param
from sparsenet.optim import SGD, learning_rate
from sparsenet.util import SparsenetError


def test_learning_rate_policies():
    assert learning_rate("fixed", 0.1, 12345) == 0.1
    assert learning_rate("step", 0.1, 0, gamma=0.5, step_size=10) == 0.1
    assert learning_rate("step", 0.1, 9, gamma=0.5, step_size=10) == 0.1
    assert learning_rate("step", 0.1, 25, gamma=0.5, step_size=10) == pytest.approx(0.025)
    # Caffe's MNIST solver: after 10,000 iterations lr = 0.01 * 2^-0.75
    assert learning_rate("inv", 0.01, 10000, gamma=1e-4, power=0.75) == pytest.approx(0.01 * 2 ** -0.75)
    with pytest.raises(SparsenetError):
        learning_rate("cosine", 0.1, 0)


@given(mu=st.floats(0, 0.99), wd=st.floats(0, 0.1), l1=st.floats(0, 0.1), lr=st.floats(1e-4, 1.0),
       lr_mult=st.sampled_from([1.0, 2.0]), seed=st.integers(0, 2**31))
def test_sgd_matches_hand_written_update(mu, wd, l1, lr, lr_mult, seed):
    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((4, 3))
    p = Param(W0.copy(), lr_mult=lr_mult)
    opt = SGD({"w": p}, lr=lr, momentum=mu, weight_decay=wd, l1=l1, lr_policy="fixed")
    W, V = W0.copy(), np.zeros_like(W0)
    for _ in range(3):
        g = rng.standard_normal(W.shape)
        p.grad = g.copy()
        opt.step()
        V = mu * V + lr * lr_mult * (g + wd * W + l1 * np.sign(W))
        W = W - V
        np.testing.assert_allclose(p.data, W, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(p.state["momentum"], V, rtol=1e-12, atol=1e-12)
    assert opt.iteration == 3


@given(seed=st.integers(0, 2**31), mu=st.floats(0, 0.99), wd=st.floats(0, 0.1), l1=st.floats(0, 0.1))
def test_pruned_entries_stay_exactly_zero(seed, mu, wd, l1):
    """With the mask applied to W (and gW, as layers do), nothing at a pruned position moves."""
    rng = np.random.default_rng(seed)
    p = Param(rng.standard_normal((5, 6)).astype(np.float32))
    p.prune(rng.random(p.data.shape) < 0.5)
    opt = SGD({"w": p}, lr=0.1, momentum=mu, weight_decay=wd, l1=l1, lr_policy="fixed")
    pruned = p.mask == 0
    survivors = p.data[~pruned].copy()
    for _ in range(5):
        p.grad = rng.standard_normal(p.data.shape).astype(np.float32) * p.mask
        opt.step()
        assert np.all(p.data[pruned] == 0.0)
        assert np.all(p.state["momentum"][pruned] == 0.0)
    assert not np.array_equal(p.data[~pruned], survivors) or survivors.size == 0


def test_params_without_gradient_are_left_alone():
    p = Param(np.ones(3))
    opt = SGD({"w": p}, lr_policy="fixed")
    opt.step()
    assert np.array_equal(p.data, np.ones(3)) and opt.iteration == 1


@pytest.mark.parametrize("kwargs", [dict(lr=-1), dict(momentum=1.0), dict(weight_decay=math.nan),
                                    dict(l1=-0.1), dict(lr_policy="cosine"), dict(lr_policy="step", step_size=0)])
def test_bad_hyper_parameters_are_rejected(kwargs):
    with pytest.raises(SparsenetError):
        SGD({"w": Param(np.ones(2))}, **kwargs)


def test_a_diverging_update_leaves_pruned_entries_exactly_zero():
    """NaN/inf in the gradient (a diverged run) never reach a pruned position: the mask is
    applied as a select, not a product (NaN · 0 = NaN)."""
    p = Param(np.ones((3, 4), dtype=np.float32))
    keep = np.ones((3, 4), dtype=bool)
    keep[0] = False
    p.prune(keep)
    opt = SGD({"w": p}, lr=1e30, momentum=0.9, weight_decay=1.0, l1=1.0, lr_policy="fixed")
    with np.errstate(all="ignore"):
        for g in (np.full((3, 4), np.inf, np.float32), np.full((3, 4), np.nan, np.float32)):
            p.grad = g
            opt.step()
    assert np.all(p.data[0] == 0.0) and np.all(p.state["momentum"][0] == 0.0)
    assert not np.isfinite(p.data[1:]).any()
    p.check()  # the rule holds whatever the survivors do


def test_state_dict_round_trip():
    p = Param(np.ones(3, dtype=np.float32))
    opt = SGD({"w": p}, lr=0.1, lr_policy="step", step_size=2)
    for _ in range(3):
        p.grad = np.ones(3, dtype=np.float32)
        opt.step()
    other = SGD({"w": p}, lr=0.1, lr_policy="step", step_size=2)
    other.load_state_dict(opt.state_dict())
    assert other.iteration == 3 and other.current_lr() == opt.current_lr()
    with pytest.raises(SparsenetError):
        other.load_state_dict({"iteration": -1})


def test_the_step_policy_in_epochs_follows_the_epoch_length():
    """step_epochs becomes iterations from the epoch's batches, which train_epoch measures on its data; the
    defaults keep the iteration counts they had on all of MNIST at batch 64 (938 batches an epoch)."""
    import dataclasses

    from sparsenet.data import ArraySplit
    from sparsenet.engine import RETRAIN_DEFAULTS, TrainConfig, train_epoch
    from sparsenet.model import build_network

    w = {"w": Param(np.ones(2))}
    assert SGD.from_settings(w, dataclasses.asdict(TrainConfig()), batches_per_epoch=938).step_size() == 6566
    assert SGD.from_settings(w, RETRAIN_DEFAULTS, batches_per_epoch=938).step_size() == 1876
    with pytest.raises(SparsenetError, match="epoch's length"):
        SGD(w, lr_policy="step", step_epochs=2).current_lr()
    net = build_network({"name": "mlp", "input_shape": [4], "layers": [
        {"kind": "linear", "name": "fc1", "n_in": 4, "n_out": 3}]}, seed=0)
    rng = np.random.default_rng(0)
    data = ArraySplit(rng.random((200, 4), dtype=np.float32), rng.integers(0, 3, 200))  # 4 batches of 64
    opt = SGD(net.params(), lr=0.1, lr_policy="step", step_epochs=1.5)
    lrs = []
    for _ in range(3):
        train_epoch(net, opt, data, 64, rng)
        lrs.append(opt.current_lr())
    assert opt.batches_per_epoch == 4 and opt.step_size() == 6
    assert lrs == pytest.approx([0.1, 0.01, 0.001])  # iterations 4, 8, 12: steps at 6 and 12


@pytest.mark.parametrize("settings, message", [
    (dict(step_size=100, step_epochs=2), "not both"), (dict(step_epochs=0), "step_epochs must be"),
    (dict(), "needs step_epochs or step_size")])
def test_the_step_policy_takes_one_length(settings, message):
    with pytest.raises(SparsenetError, match=message):
        SGD({"w": Param(np.ones(2))}, lr_policy="step", **settings)


def test_configs_in_iterations_still_load():
    """Configs and schedules written before step_epochs give step_size, which then replaces the default."""
    from sparsenet.engine import Schedule, TrainConfig

    assert TrainConfig.from_dict({"step_size": 6566}).step_epochs is None
    assert TrainConfig().step_epochs == 7 and TrainConfig(step_size=10).step_epochs is None
    old = Schedule.from_dict({"retrain": {"step_size": 1876}, "rounds": [{}, {"step_epochs": 3}]}).rounds
    assert [(r["step_size"], r["step_epochs"]) for r in old] == [(1876, None), (None, 3)]
