"""Sparse inference: pruned layers as sparse matrix products (sparsenet.inference)."""
import numpy as np
import pytest

from sparsenet.backend import asnumpy
from sparsenet.data import load_split
from sparsenet.inference import SparseNetwork, prefer_sparse
from sparsenet.model import build_model, build_network
from sparsenet.modelfile import LOSSLESS, export_model, load_model
from sparsenet.paper import weights_left
from sparsenet.pruning import prune_at_random as prune
from sparsenet.util import SparsenetError


def pruned(model, seed=0, xp=np):
    """A named model pruned at random to the paper's per-layer densities (Tables 2 and 3)."""
    return prune(build_model(model, seed, xp), weights_left(model), seed)


@pytest.mark.parametrize("model", ["lenet-300-100", "lenet-5"])
def test_sparse_inference_matches_dense(xp, model):
    net = pruned(model, xp=xp)
    for n in (1, 7):
        x = xp.asarray(np.random.default_rng(n).random((n, *net.input_shape), dtype=np.float32))
        z = asnumpy(net.forward(x))
        for mode in ("sparse", "dense", "auto"):
            snet = SparseNetwork(net, mode)
            zs = asnumpy(snet.forward(x))
            np.testing.assert_allclose(zs, z, rtol=1e-5, atol=1e-5)
            assert np.array_equal(zs.argmax(axis=1), z.argmax(axis=1))
            assert set(snet.plan(n).values()) <= {"sparse", "dense"}


def test_zero_valued_survivors_change_nothing():
    """A surviving weight of value 0.0 adds nothing to a product: the CSR copy holds the
    non-zero weights, and the predictions stay the dense network's."""
    net = pruned("lenet-300-100")
    p = net.params()["fc1.W"]
    p.data[(p.mask == 1) & (np.arange(p.size).reshape(p.data.shape) % 3 == 0)] = 0.0
    x = np.random.default_rng(0).random((5, 784), dtype=np.float32)
    snet = SparseNetwork(net, "sparse")
    assert snet.mats["fc1"][1].nnz == np.count_nonzero(p.data) < p.nonzero()
    np.testing.assert_allclose(snet.forward(x), net.forward(x), rtol=1e-5, atol=1e-5)


def test_unknown_mode_is_refused():
    with pytest.raises(SparsenetError, match="unknown inference mode"):
        SparseNetwork(pruned("lenet-300-100"), "fast")


def test_plan_follows_density_and_batch_size():
    big = build_network({"name": "", "input_shape": [9216], "layers": [
        {"kind": "linear", "name": "fc6", "n_in": 9216, "n_out": 512}, {"kind": "relu", "name": "r"},
        {"kind": "linear", "name": "fc7", "n_in": 512, "n_out": 10}]})
    prune(big, {"fc6": 0.08, "fc7": 0.01})
    plan = SparseNetwork(big).plan
    assert plan(1) == {"fc6": "sparse", "fc7": "dense"}  # fc7 is too small to gain
    assert plan(64) == {"fc6": "dense", "fc7": "dense"}  # 8% is too dense for a GEMM
    assert set(SparseNetwork(big, "sparse").plan(64).values()) == {"sparse"}
    assert prefer_sparse(0.04, 64, 400_000) and not prefer_sparse(0.04, 1, 30_000)
    assert prefer_sparse(0.02, 512, 235_200) and not prefer_sparse(0.05, 512, 235_200)
    assert prefer_sparse(0.09, 1, 4096 * 9216) and not prefer_sparse(0.05, 1, 1024 * 1024)
    assert prefer_sparse(0.04, 64, 400_000) and not prefer_sparse(0.04, 65, 400_000)
    with pytest.raises(SparsenetError, match="measured"):  # the GPU's choice is timed by SparseNetwork
        prefer_sparse(0.09, 1, 4096 * 9216, xp=object())


@pytest.mark.mnist
def test_mnist_predictions_identical_across_formats_and_engines(tmp_path):
    """End to end on the real MNIST test set: every file format, dense and sparse engines."""
    net = pruned("lenet-300-100")
    x, t = load_split("mnist", net.input_shape, np, None, split="test")["test"]
    assert len(t) == 10_000
    want = net.predict(x)
    for encoding in LOSSLESS:
        export_model(net, tmp_path / f"{encoding}.h5", encoding)
        back = load_model(tmp_path / f"{encoding}.h5")
        assert np.array_equal(back.predict(x), want)
        assert np.array_equal(SparseNetwork(back, "sparse").predict(x, batch_size=500), want)
        assert np.array_equal(SparseNetwork(back).predict(x[:64], batch_size=1), want[:64])
