"""Weight sharing (Deep Compression's trained quantisation): the sharing rule owned by
sparsenet.param.Param (value == codebook[codes] ⊙ mask, codes < K ≤ 256, code 0 where
pruned), k-means codebooks, the codebook gradient, and checkpoints of shared networks."""
import ast
import pathlib

import h5py
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.cluster.vq import kmeans2

from sparsenet import layers as L, pruning as P
from sparsenet.backend import asnumpy
from sparsenet.checkpoint import load_checkpoint, save_checkpoint
from sparsenet.model import build_network
from sparsenet.optim import SGD
from sparsenet.param import Param
from sparsenet.quantise import kmeans_codebook, share_weights
from sparsenet.util import SparsenetError

from gradcheck import assert_grad
from test_pruning import MLP, conv_spec

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "sparsenet"
TINY = {"name": "tiny", "input_shape": [6], "layers": [
    {"kind": "linear", "name": "fc1", "n_in": 6, "n_out": 7}, {"kind": "relu", "name": "relu1"},
    {"kind": "linear", "name": "fc2", "n_in": 7, "n_out": 3}]}


def shared_param(dtype=np.float32):
    """A 3×4 weight, entries 0 and 5 pruned, sharing the codebook [-1, 0.5, 2]."""
    p = Param(np.arange(12, dtype=dtype).reshape(3, 4))
    p.prune(np.arange(12).reshape(3, 4) % 5 != 0)
    p.share(np.array([-1.0, 0.5, 2.0]), np.arange(12).reshape(3, 4) % 3)
    return p


def assert_shared(p):
    """The sharing rule, spelled out (independently of Param.check)."""
    c, I, M = asnumpy(p.codebook), asnumpy(p.codes), asnumpy(p.mask)
    assert I.dtype == np.uint8 and I.shape == p.data.shape and c.ndim == 1 and c.dtype == p.data.dtype
    assert np.all(I < c.size) and np.all(I[M == 0] == 0)
    assert np.array_equal(asnumpy(p.data), np.where(M == 1, c[I], 0))
    p.check()


# ----------------------------------------------------------------------------- the rule
SHARED_ATTRS = ("codebook", "_codebook", "codes", "_codes")


def test_only_param_assign_writes_a_codebook_or_codes():
    """Like the mask (tests/test_param.py): no package code assigns, even in place, a codebook or codes
    except Param._assign."""
    writers = []
    for path in PACKAGE.glob("*.py"):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    targets = node.targets if isinstance(node, ast.Assign) else (
                        [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
                    writers += [f"{path.name}:{fn.name}" for t in targets for sub in ast.walk(t)
                                if isinstance(sub, ast.Attribute) and sub.attr in SHARED_ATTRS]
    assert sorted(set(writers)) == ["param.py:_assign"]


def test_share_derives_the_value_and_zeroes_codes_where_pruned():
    p = shared_param()
    assert p.data.tolist() == [[0, 0.5, 2, -1], [0.5, 0, -1, 0.5], [2, -1, 0, 2]]
    assert p.codes[0, 0] == 0 and p.codes[1, 1] == 0 and p.codebook.dtype == np.float32
    assert p.codebook_state == {} and p.nonzero() == 9
    assert_shared(p)
    for codebook, codes, message in [
        ([1.0, 2.0], np.full((3, 4), 2), "outside the codebook"),
        ([1.0, 2.0], np.zeros((4, 3), int), "shape \\(3, 4\\)"),
        ([[1.0, 2.0]], np.zeros((3, 4), int), "1-D"),
        ([1.0, 2.0], np.zeros((3, 4)), "integer"),
        (np.arange(257.0), np.zeros((3, 4), int), "1 to 256"),
        ([np.nan, 1.0], np.zeros((3, 4), int), "NaN"),
        ([], np.zeros((3, 4), int), "outside"),
    ]:
        with pytest.raises(SparsenetError, match=message):
            p.share(codebook, codes)
    assert_shared(p)  # unchanged by the failures
    c = np.full((3, 4), 255)
    c[p.mask == 1] = 1
    p.share(np.arange(256.0), c)  # K = 256 is the limit; pruned codes may be anything on the way in
    assert p.codebook.size == 256 and set(p.data[p.mask == 1].tolist()) == {1.0}


def test_prune_zeroes_codes_value_and_momentum_where_newly_pruned():
    p = shared_param()
    p.state["momentum"] = np.ones((3, 4), np.float32) * p.mask
    p.codebook_state["momentum"] = np.ones(3, np.float32)
    p.prune(p.data > 0)
    assert p.mask.tolist() == [[0, 1, 1, 0], [1, 0, 0, 1], [1, 0, 0, 1]]
    assert p.codes.tolist() == [[0, 1, 2, 0], [1, 0, 0, 1], [2, 0, 0, 2]]
    assert np.array_equal(p.state["momentum"], p.mask) and p.codebook_state["momentum"].tolist() == [1, 1, 1]
    assert_shared(p)


def test_take_cuts_codes_with_the_rows_and_columns():
    p = shared_param()
    p.take(np.array([0, 2, 3]), 1)
    assert p.codes.tolist() == [[0, 2, 0], [1, 0, 1], [2, 0, 2]] and p.codes.flags.c_contiguous
    p.take(np.array([2]), 0)
    assert p.data.tolist() == [[2, 0, 2]] and p.codebook.tolist() == [-1, 0.5, 2]
    assert_shared(p)


def test_cast_converts_codebook_and_its_state_and_keeps_the_rule():
    p = shared_param()
    p.codebook_state["momentum"] = np.array([0.1, 0, 0.3], np.float32)
    p.cast(np.float64)
    assert p.codebook.dtype == p.codebook_state["momentum"].dtype == np.float64 and p.codes.dtype == np.uint8
    assert_shared(p)
    p.cast(np.float32)
    assert p.codebook.dtype == np.float32
    assert_shared(p)


def _loaded(p, **change):
    kw = dict(data=p.data.copy(), mask=p.mask.copy(), codebook=p.codebook.copy(), codes=p.codes.copy(),
              codebook_state={"momentum": np.zeros(3, np.float32)})
    kw.update(change)
    return kw


def test_load_checks_the_sharing_rule_and_changes_nothing_on_failure():
    p = shared_param()
    bad_codes, moved, at_pruned = p.codes.copy(), p.data.copy(), p.codes.copy()
    bad_codes[0, 1] = 3
    moved[0, 1] = 0.25
    at_pruned[0, 0] = 1
    for change, message in [
        (dict(codes=bad_codes), "a code is >= the codebook's size 3"),
        (dict(data=moved), "value differs from codebook\\[code\\]"),
        (dict(codes=at_pruned), "code is non-zero at a pruned position"),
        (dict(codebook=None), "codes without a codebook"),
        (dict(codes=None), "a codebook without codes"),
        (dict(codebook=None, codes=None), "codebook state without a codebook"),
        (dict(codebook=np.array([-1, 0.5, np.inf], np.float32)), "NaN or infinite"),
        (dict(codebook=np.zeros(300, np.float32)), "1 to 256"),
        (dict(codebook=p.codebook.astype(np.float64)), "dtype float64"),
        (dict(codes=p.codes.astype(np.uint16)), "uint8"),
        (dict(codes=p.codes[:, :2]), "codes has shape"),
        (dict(codebook_state={"momentum": np.zeros(4, np.float32)}), "momentum has shape \\(4,\\)"),
    ]:
        with pytest.raises(SparsenetError, match=message):
            p.load(**_loaded(p, **change))
        assert_shared(p)
    p.load(**_loaded(p))
    assert_shared(p)
    p.load(p.data.copy(), p.mask.copy())  # loading plain arrays unshares
    assert p.codebook is None and p.codes is None and p.codebook_state == {}


def test_check_finds_a_value_off_its_codebook():
    p = shared_param()
    p.data[2, 3] += 1
    with pytest.raises(SparsenetError, match="differs from codebook"):
        p.check()


# ----------------------------------------------------------------------------- k-means
def test_kmeans_is_scipys_with_linear_initialisation():
    v = np.random.default_rng(0).standard_normal(500).astype(np.float32)
    codebook, codes = kmeans_codebook(v, 3)
    c, labels = kmeans2(v.astype(np.float64), np.linspace(v.min(), v.max(), 8), iter=20, minit="matrix")
    assert codebook.dtype == np.float32 and codes.dtype == np.uint8 and codebook.size == 8
    assert np.array_equal(codebook, c.astype(np.float32)) and np.array_equal(codes, labels)


def test_linear_initialisation_keeps_a_rare_large_weight():
    """Deep Compression §3.2: linear initialisation gives the few large weights their own centroid."""
    v = np.concatenate([np.random.default_rng(1).normal(0, 0.05, 1000), [1.5]])
    codebook, codes = kmeans_codebook(v, 2)
    assert codebook[codes[-1]] == np.float32(1.5) and np.sum(codes == codes[-1]) == 1


@given(seed=st.integers(0, 2**31), n=st.integers(0, 300), distinct=st.integers(1, 400), bits=st.integers(1, 8))
@settings(max_examples=40, deadline=None)
def test_kmeans_codebook_properties(seed, n, distinct, bits):
    rng = np.random.default_rng(seed)
    v = rng.choice(rng.standard_normal(distinct), n).astype(np.float32)
    codebook, codes = kmeans_codebook(v, bits)
    assert codebook.dtype == np.float32 and codes.dtype == np.uint8 and codes.shape == (n,)
    assert 1 <= codebook.size <= 2 ** bits and np.all(codes < codebook.size)
    if n == 0:
        assert codebook.tolist() == [0.0]
    elif np.unique(v).size <= 2 ** bits:  # no more distinct values than codes: kept exactly
        assert np.array_equal(codebook[codes], v)
    else:  # every centroid is used and is the mean of its members
        assert np.array_equal(np.unique(codes), np.arange(codebook.size))
        means = [v[codes == k].astype(np.float64).mean() for k in range(codebook.size)]
        np.testing.assert_allclose(codebook, means, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bits", [0, 9, 2.5, True, "3", None])
def test_bits_out_of_range_are_one_line_errors(bits):
    with pytest.raises(SparsenetError, match="whole number in 1..8") as e:
        kmeans_codebook(np.ones(3), bits)
    assert "\n" not in str(e.value)
    with pytest.raises(SparsenetError, match="NaN"):
        kmeans_codebook(np.array([1.0, np.nan]), 2)


def test_share_weights_by_layer():
    net = build_network(MLP, seed=0)
    P.prune(net, "percentile", {"fc1": 0.5})
    net.params()["fc3.W"].prune(np.zeros(net.params()["fc3.W"].data.shape))  # an empty layer (prune refuses one)
    before = {n: p.data.copy() for n, p in net.params().items()}
    sizes = share_weights(net, {"fc1": 2, "default": 3})
    assert sizes == {"fc1.W": 4, "fc2.W": sizes["fc2.W"], "fc3.W": 1} and sizes["fc2.W"] <= 8
    for n, p in net.params().items():
        if n.endswith(".b"):
            assert p.codebook is None and np.array_equal(p.data, before[n])
            continue
        assert_shared(p)
        assert np.unique(p.data[p.data != 0]).size <= sizes[n]
        assert np.array_equal(p.mask, (before[n] != 0).astype(np.float32))  # no mask changes
    assert not net.params()["fc3.W"].data.any()  # no survivors: codebook [0]
    net = build_network(MLP, seed=0)
    assert share_weights(net, {"fc2": 8}) == {"fc2.W": 40} and net.params()["fc1.W"].codebook is None
    for bits, message in [({"fc9": 3}, "no prunable layer named fc9"), ({"fc1": 0}, "bits for fc1"),
                          (9, "bits for every layer"), ({"default": "x"}, "bits for default")]:
        with pytest.raises(SparsenetError, match=message):
            share_weights(net, bits)


# ----------------------------------------------------------------------------- training
def test_sgd_moves_the_codebook_by_the_momentum_rule():
    rng = np.random.default_rng(0)
    p = Param(rng.standard_normal((5, 6)), lr_mult=2.0)
    p.prune(rng.random((5, 6)) < 0.7)
    p.share(np.array([-0.7, -0.1, 0.4, 1.2]), rng.integers(0, 4, (5, 6)))
    opt = SGD({"w": p}, lr=0.05, momentum=0.9, weight_decay=0.01, l1=0.003, lr_policy="fixed")
    c, V, I, M = p.codebook.copy(), np.zeros(4), p.codes.copy(), p.mask.copy()
    for _ in range(3):
        G = rng.standard_normal((5, 6)) * M
        W = c[I] * M
        g = G + 0.01 * W + 0.003 * np.sign(W)
        gc = np.array([g[(M == 1) & (I == k)].sum() for k in range(4)])
        V = 0.9 * V + 0.05 * 2.0 * gc
        c = c - V
        p.grad = G.copy()
        opt.step()
        np.testing.assert_allclose(p.codebook, c, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(p.codebook_state["momentum"], V, rtol=1e-12, atol=1e-12)
        assert_shared(p)
        assert "momentum" not in p.state and p.grad is None


def test_a_nan_gradient_at_a_pruned_position_does_not_reach_the_codebook():
    p = shared_param()
    g = np.zeros((3, 4), np.float32)
    g[0, 0], g[0, 1] = np.nan, 1.0
    assert p.codebook_grad(g).tolist() == [0, 1, 0]


@pytest.mark.parametrize("spec", [TINY, conv_spec(1)], ids=["mlp", "cnn"])
def test_codebook_gradient_matches_finite_differences(spec):
    """∂L/∂c_k = Σ_{M_i = 1, I_i = k} g_i against central differences of the loss (with its L2 and
    L1 terms, whose gradients SGD adds) w.r.t. each codebook entry, float64."""
    wd, l1, eps = 0.03, 0.01, 1e-6
    net = build_network(spec, seed=3)
    rng = np.random.default_rng(3)
    P.prune_at_random(net, dict.fromkeys(P.prunable_layers(net), 0.6), seed=3)
    share_weights(net, {"default": 2, P.prunable_layers(net)[0]: 3})
    for p in net.params().values():
        p.cast(np.float64)
    x = rng.standard_normal((4, *net.input_shape))
    t = rng.integers(0, 3, 4)
    shared = {n: p for n, p in net.params().items() if p.codebook is not None}

    def loss():
        reg = sum(wd / 2 * np.sum(p.data ** 2) + l1 * np.sum(np.abs(p.data)) for p in shared.values())
        return L.softmax_cross_entropy_forward(net.forward(x, train=True), t)[0] + reg

    numeric = {}
    for n, p in shared.items():
        base = p.codebook.copy()
        numeric[n] = np.zeros(base.size)
        for k in range(base.size):
            f = []
            for d in (eps, -eps):
                c = base.copy()
                c[k] += d
                p.share(c, p.codes)
                f.append(loss())
            numeric[n][k] = (f[0] - f[1]) / (2 * eps)
        p.share(base, p.codes)
    net.loss_and_backward(x, t)
    SGD(net.params(), lr=1.0, momentum=0.0, weight_decay=wd, l1=l1, lr_policy="fixed").step()
    for n, p in shared.items():  # V_c = 0·0 + 1·1·∂L/∂c
        assert p.codebook.size > 1 and np.abs(numeric[n]).max() > 1e-3, n
        assert_grad(p.codebook_state["momentum"], numeric[n])


def test_shared_training_on_the_array_module(xp):
    """Share, train, prune, remove neurons, save and load on NumPy or CuPy: the rule holds."""
    net = build_network(MLP, seed=1, xp=xp)
    P.prune(net, "percentile", 0.6)
    share_weights(net, 2)
    rng = np.random.default_rng(1)
    x, t = xp.asarray(rng.random((8, 6), dtype=np.float32)), xp.asarray(rng.integers(0, 3, 8))
    opt = SGD(net.params(), lr=0.1, momentum=0.9, weight_decay=1e-3, l1=1e-3, lr_policy="fixed")
    for _ in range(3):
        net.loss_and_backward(x, t)
        opt.step()
    P.prune(net, "percentile", 0.8)
    P.remove_dead_neurons(net)
    for n, p in net.params().items():
        if n.endswith(".W"):
            assert_shared(p)
            assert np.unique(asnumpy(p.data)[asnumpy(p.mask) == 1]).size <= 4
    P.check_masks(net)


# ----------------------------------------------------------------------------- checkpoints
def _shared_checkpoint(tmp_path, optimizer=True):
    net = build_network(MLP, seed=2)
    P.prune(net, "percentile", 0.5)
    share_weights(net, {"fc1": 3, "fc2": 2})
    rng = np.random.default_rng(2)
    opt = SGD(net.params(), lr=0.1, lr_policy="fixed")
    net.loss_and_backward(rng.random((8, 6), dtype=np.float32), rng.integers(0, 3, 8))
    opt.step()
    save_checkpoint(tmp_path / "ck.h5", net, opt if optimizer else None)
    return net, tmp_path / "ck.h5"


def test_a_shared_network_round_trips_bit_for_bit(tmp_path):
    net, path = _shared_checkpoint(tmp_path)
    with h5py.File(path, "r") as f:
        assert sorted(f["codebooks"]) == sorted(f["codes"]) == sorted(f["codebook_velocity"]) == ["fc1.W", "fc2.W"]
        assert f["codebooks/fc1.W"].dtype == np.float32 and f["codes/fc1.W"].dtype == np.uint8
        assert f["codes/fc1.W"].shape == (8, 6) and f.attrs["version"] == 1
    q = load_checkpoint(path).net.params()
    for n, p in net.params().items():
        V = p.state.get("momentum", np.zeros_like(p.data))  # a shared weight's own V is never used: zeros
        for a, b in [(p.data, q[n].data), (p.mask, q[n].mask), (V, q[n].state["momentum"])]:
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), n
        if p.codebook is None:
            assert q[n].codebook is None and q[n].codes is None, n
            continue
        assert p.codebook.tobytes() == q[n].codebook.tobytes() and np.array_equal(p.codes, q[n].codes)
        assert p.codebook_state["momentum"].tobytes() == q[n].codebook_state["momentum"].tobytes()
    net, path = _shared_checkpoint(tmp_path, optimizer=False)
    with h5py.File(path, "r") as f:
        assert "codebook_velocity" not in f and "codebooks" in f
    q = load_checkpoint(path).net.params()["fc1.W"]
    assert q.codebook_state == {} and np.array_equal(q.codebook, net.params()["fc1.W"].codebook)


def _set(key, index, value):
    def edit(f):
        a = f[key][()]
        a[index] = value
        del f[key]
        f.create_dataset(key, data=a)
    return edit


def _replace(key, value):
    def edit(f):
        if key in f:
            del f[key]
        f.create_dataset(key, data=value)
    return edit


def _first_kept(f):
    return tuple(np.argwhere(f["masks/fc1.W"][()] == 1)[0])


@pytest.mark.parametrize("edit, message", [
    (lambda f: _set("codes/fc1.W", _first_kept(f), 200)(f), "fc1.W: a code is >= the codebook's size"),
    (lambda f: _set("params/fc1.W", _first_kept(f), 123.0)(f), "fc1.W: value differs from codebook"),
    (lambda f: _set("codes/fc2.W", tuple(np.argwhere(f["masks/fc2.W"][()] == 0)[0]), 1)(f), "non-zero at a pruned"),
    (lambda f: _set("codebooks/fc2.W", 0, np.nan)(f), "NaN"),
    (_replace("codebooks/fc2.W", np.zeros(300, np.float32)), "1 to 256"),
    (_replace("codebooks/fc2.W", np.zeros((2, 2), np.float32)), "codebook of shape \\(2, 2\\)"),
    (lambda f: f.__delitem__("codebooks/fc1.W"), "'codebooks/fc1.W' is missing"),
    (lambda f: f.__delitem__("codes/fc1.W"), "'codes/fc1.W' is missing"),
    (lambda f: f.__delitem__("codebook_velocity/fc1.W"), "'codebook_velocity/fc1.W' is missing"),
    (_replace("codebook_velocity/fc1.W", np.zeros(3, np.float32)), "fc1.W: codebook momentum has shape \\(3,\\)"),
    (_replace("codes/fc1.W", np.zeros((8, 6), np.uint16)), "uint8"),
    (_replace("codes/fc1.W", np.zeros((8, 6), np.float32)), "dtype float32"),
    (_replace("codes/fc1.W", np.zeros((6, 8), np.uint8)), "shape"),
    (_replace("codes/fc3.b", np.zeros(3, np.uint8)), "'codebooks/fc3.b' is missing"),
])
def test_tampered_shared_checkpoints_are_rejected(tmp_path, edit, message):
    _, path = _shared_checkpoint(tmp_path)
    with h5py.File(path, "r+") as f:
        edit(f)
    with pytest.raises(SparsenetError, match=message) as e:
        load_checkpoint(path)
    assert "ck.h5" in str(e.value) and "\n" not in str(e.value)
