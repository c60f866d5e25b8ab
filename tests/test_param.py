"""The mask rule has one owner (sparsenet.param.Param): pruned entries are exactly 0 in
the value and every state array, masks only shrink, and a connection is never inferred
from a value (a survivor at exactly 0.0 stays a connection)."""
import ast
import pathlib

import numpy
import pytest
from hypothesis import given, settings, strategies as st

from sparsenet import pruning as P
from sparsenet.checkpoint import load_checkpoint, save_checkpoint
from sparsenet.model import build_network
from sparsenet.modelfile import LOSSLESS, export_model, load_model
from sparsenet.optim import SGD
from sparsenet.param import Param
from sparsenet.util import SparsenetError

from test_pruning import MLP, conv_spec

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "sparsenet"


def test_only_param_assign_writes_a_mask():
    """No code in the package assigns a mask except Param._assign."""
    writers = []
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                targets = node.targets if isinstance(node, ast.Assign) else (
                    [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
                for t in targets:
                    for sub in ast.walk(t):
                        if isinstance(sub, ast.Attribute) and sub.attr in ("mask", "_mask"):
                            writers.append(f"{path.name}:{fn.name}")
    assert sorted(set(writers)) == ["param.py:_assign"]


def test_prune_only_narrows_and_zeroes_value_and_state():
    p = Param(numpy.arange(1, 7, dtype=numpy.float32).reshape(2, 3))
    p.state["momentum"] = numpy.ones((2, 3), dtype=numpy.float32)
    assert p.prune(numpy.array([[1, 0, 1], [1, 1, 0]], dtype=bool)) == (6, 4)
    assert p.prune(numpy.array([[0, 1, 1], [1, 1, 1]], dtype=bool)) == (4, 3)  # a one where pruned stays 0
    assert p.mask.tolist() == [[0, 0, 1], [1, 1, 0]]
    assert p.data.tolist() == [[0, 0, 3], [4, 5, 0]] and p.state["momentum"].tolist() == [[0, 0, 1], [1, 1, 0]]
    with pytest.raises(AttributeError):
        p.mask = numpy.ones((2, 3), dtype=numpy.float32)
    with pytest.raises(SparsenetError, match="shape"):
        p.prune(numpy.ones(3, dtype=bool))


def test_load_checks_the_rule_and_changes_nothing_on_failure():
    p = Param(numpy.ones((2, 2), dtype=numpy.float32))
    M = numpy.array([[1, 0], [1, 1]], dtype=numpy.float32)
    with pytest.raises(SparsenetError, match="value is non-zero at a pruned position"):
        p.load(numpy.ones((2, 2), dtype=numpy.float32), M)
    with pytest.raises(SparsenetError, match="momentum is non-zero"):
        p.load(M.copy(), M, {"momentum": numpy.ones((2, 2), dtype=numpy.float32)})
    with pytest.raises(SparsenetError, match="other than 0 and 1"):
        p.load(M.copy(), M * 2)
    assert p.nonzero() == 4  # untouched by the failed loads
    p.load(numpy.array([[0, 0], [2, 0]], dtype=numpy.float32), M)  # survivors may be 0.0
    assert p.nonzero() == 3


def test_take_keeps_value_mask_state_and_grad_together():
    p = Param(numpy.arange(12, dtype=numpy.float32).reshape(3, 4))
    p.state["momentum"] = numpy.arange(12, dtype=numpy.float32).reshape(3, 4) + 100
    p.grad = -p.data
    p.prune(numpy.arange(12).reshape(3, 4) % 5 != 0)
    p.take(numpy.array([0, 2]), 1)
    assert p.data.tolist() == [[0, 2], [4, 6], [8, 0]]
    assert p.mask.tolist() == [[0, 1], [1, 1], [1, 0]]
    assert p.state["momentum"].tolist() == [[0, 102], [104, 106], [108, 0]]
    assert p.grad.shape == (3, 2) and p.data.flags.c_contiguous


@pytest.mark.parametrize("spec", [MLP, conv_spec(1)], ids=["mlp", "cnn"])
@given(seed=st.integers(0, 2**31 - 1), density=st.sampled_from([0.2, 0.5, 0.8]), n_zero=st.integers(1, 5),
       encoding=st.sampled_from(LOSSLESS))
@settings(max_examples=15, deadline=None)
def test_a_survivor_trained_to_zero_stays_a_connection(tmp_path_factory, spec, seed, density, n_zero, encoding):
    """Through save, load, export, load of the model file and further training."""
    d = tmp_path_factory.mktemp("z")
    net = build_network(spec, seed=seed % 100)
    P.prune_at_random(net, {l: density for l in P.prunable_layers(net)}, seed)
    rng = numpy.random.default_rng(seed)
    for p in net.params().values():
        if p.prunable and p.nonzero():
            alive = numpy.flatnonzero(p.mask)
            p.data.flat[rng.choice(alive, min(n_zero, alive.size), replace=False)] = 0.0
    masks = {n: p.mask.copy() for n, p in net.params().items()}
    save_checkpoint(d / "ck.h5", net, SGD(net.params()), rng)
    net = load_checkpoint(d / "ck.h5").net
    export_model(net, d / "m.h5", encoding)
    net = load_model(d / "m.h5")
    for n, p in net.params().items():
        assert numpy.array_equal(p.mask, masks[n]), (n, encoding)
    x = rng.random((4, *net.input_shape), dtype=numpy.float32)
    t = rng.integers(0, 3, 4)
    opt = SGD(net.params(), lr=0.1, lr_policy="fixed")
    for _ in range(2):
        net.loss_and_backward(x, t)
        opt.step()
    for n, p in net.params().items():
        assert numpy.array_equal(p.mask, masks[n]), n
        assert numpy.all(p.data[masks[n] == 0] == 0)
