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
