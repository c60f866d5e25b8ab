"""The CUDA kernels of :mod:`sparsenet.cuda` against the NumPy path.

The kernel source is compiled with ``nvcc`` wherever one is installed (no GPU needed), so a syntax or type
error fails here, not on a GPU later. The GPU cases (marker ``gpu``, skipped without CuPy and a device)
check each kernel against NumPy: the fused update bit for bit, the loss and the CSR product to float32
rounding, and training with CUDA graphs bit for bit against eager training. ``tests/test_cuda_emulated.py``
runs the same kernels on the CPU under an emulator.
"""
import ctypes
import re
import shutil
import subprocess
import types
import warnings

import numpy as np
import pytest

from conftest import _cupy_or_skip
from sparsenet import cuda, layers as L
from sparsenet.data import ArraySplit
from sparsenet.engine import train_epoch
from sparsenet.model import build_model, build_network
from sparsenet.optim import SGD
from sparsenet.param import Param
from sparsenet.pruning import prune_at_random


@pytest.fixture(scope="module")
def cupy():
    return _cupy_or_skip()


gpu = pytest.mark.gpu


# ----------------------------------------------------------------------------- without a GPU
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_kernel_source_compiles_with_nvcc(tmp_path):
    """The source NVRTC compiles at run time, with its options and the -ftz=true CuPy adds, through nvcc;
    every kernel is exported under its C name, and the update's float arithmetic is plain IEEE rounding:
    no fused multiply-add, no flush to zero, no float compare (it must round as NumPy does)."""
    src = tmp_path / "kernels.cu"
    src.write_text(cuda.SOURCE)
    out = tmp_path / "kernels.ptx"
    r = subprocess.run(["nvcc", "--ptx", "-arch=compute_80", *cuda.OPTIONS, "-ftz=true", "-o", str(out), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ptx = out.read_text()
    for name in cuda.KERNELS:
        assert f".entry {name}(" in ptx
    update = ptx[ptx.index(".entry sgd_update("):ptx.index(".entry", ptx.index(".entry sgd_update(") + 1)]
    ops = set(re.findall(r"\b(?:mul|add|sub|fma|setp)\.[a-z0-9.]*f32\b", update))
    assert ops == {"mul.rn.f32", "add.rn.f32", "sub.rn.f32"}, ops
    assert ".ftz" in ptx[ptx.index(".entry softmax_xent("):]  # the flag is on: the PTX above resisted it


def test_graphs_switch(monkeypatch):
    for off in ("0", "false", "No", "off"):
        monkeypatch.setenv(cuda.GRAPHS_ENV, off)
        assert not cuda.graphs_enabled()
    monkeypatch.setenv(cuda.GRAPHS_ENV, "1")
    assert cuda.graphs_enabled()
    monkeypatch.delenv(cuda.GRAPHS_ENV)
    assert cuda.graphs_enabled()


def test_capturable_names_what_prevents_a_graph(monkeypatch):
    net = build_model("lenet-300-100", 0)
    why = cuda.capturable(net, SGD(net.params()))  # None on a GPU machine, else why cuBLAS is out of reach
    assert why is None or "cuBLAS" in why
    monkeypatch.setenv(cuda.GRAPHS_ENV, "0")
    assert "SPARSENET_CUDA_GRAPHS" in cuda.capturable(net, SGD(net.params()))
    monkeypatch.delenv(cuda.GRAPHS_ENV)
    spec = {"name": "d", "input_shape": [4], "layers": [{"kind": "linear", "name": "fc", "n_in": 4, "n_out": 3},
                                                       {"kind": "dropout", "name": "drop", "rate": 0.5}]}
    dropped = build_network(spec, 0)
    assert "dropout" in cuda.capturable(dropped, SGD(dropped.params()))
    p = net.params()["fc1.W"]
    p.share(np.array([-0.1, 0.1], np.float32), (p.data > 0).astype(np.int64))
    assert "shared" in cuda.capturable(net, SGD(net.params()))


class _FakeCuBLAS:
    """``cublasSgemm_v2`` in Python on host memory, with cuBLAS's column-major reading of pointers and
    leading dimensions and its argument checks (status 7, invalid value)."""

    def __init__(self):
        self.calls = []

    def cublasSetStream_v2(self, handle, stream):
        return 0

    def cublasSetPointerMode_v2(self, handle, mode):
        assert mode == 0
        return 0

    def cublasSgemm_v2(self, handle, op_a, op_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc):
        self.calls.append((op_a, op_b, m, n, k, lda, ldb, ldc))
        rows_a, rows_b = (m if op_a == 0 else k), (k if op_b == 0 else n)
        if min(m, n, k) < 0 or lda < max(1, rows_a) or ldb < max(1, rows_b) or ldc < max(1, m):
            return 7

        def column_major(ptr, rows, cols, ld):
            n_floats = ld * (cols - 1) + rows
            buf = np.frombuffer((ctypes.c_float * n_floats).from_address(ptr.value), np.float32)
            return np.lib.stride_tricks.as_strided(buf, (rows, cols), (4, 4 * ld))

        a = column_major(A, rows_a, m + k - rows_a, lda)
        b = column_major(B, rows_b, k + n - rows_b, ldb)
        c = column_major(C, m, n, ldc)
        c[...] = (a if op_a == 0 else a.T).astype(np.float64) @ (b if op_b == 0 else b.T)  # alpha 1, beta 0
        return 0


@pytest.mark.parametrize("a_order, b_order", [("C", "C"), ("F", "C"), ("C", "F"), ("F", "F"), ("S", "S")])
@pytest.mark.parametrize("M, K, N", [(64, 784, 300), (1, 5, 7), (300, 1, 2), (7, 3, 1), (2, 0, 3)])
def test_matmul_passes_cublas_the_right_operands(monkeypatch, a_order, b_order, M, K, N):
    """:func:`sparsenet.cuda.matmul`'s translation of row- and column-major operands into cuBLAS's
    column-major (op, leading dimension) terms, run against a cuBLAS stand-in on host memory."""
    fake = _FakeCuBLAS()
    shim = types.SimpleNamespace(empty=np.empty, zeros=np.zeros, ascontiguousarray=np.ascontiguousarray,
                                 matmul=None, cuda=types.SimpleNamespace(
                                     get_current_stream=lambda: types.SimpleNamespace(ptr=0),
                                     device=types.SimpleNamespace(get_cublas_handle=lambda: 0)))
    monkeypatch.setattr(cuda, "_cupy", lambda: shim)
    monkeypatch.setattr(cuda, "_cublas", (fake, None, None))
    monkeypatch.setattr(cuda, "_ptr", lambda x: ctypes.c_void_p(x.ctypes.data))
    rng = np.random.default_rng(M * K + N)

    def operand(rows, cols, order):
        x = rng.standard_normal((rows, 2 * cols)).astype(np.float32)
        return x[:, ::2] if order == "S" else np.asarray(x[:, :cols], order=order)

    a, b = operand(M, K, a_order), operand(K, N, b_order)
    got = cuda.matmul(a, b)
    assert got.shape == (M, N) and got.flags.c_contiguous
    np.testing.assert_allclose(got, a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5)
    assert len(fake.calls) == (K > 0)


def test_stage_apply_advance_is_step():
    """The split of :meth:`SGD.step` that a recorded graph uses gives the step's values."""
    rng = np.random.default_rng(0)
    a, b = (Param(rng.standard_normal((6, 5)).astype(np.float32)) for _ in range(2))
    b.data = a.data.copy()
    a.prune(rng.random(a.data.shape) < 0.5)
    b.prune(a.mask)
    one, two = SGD({"w": a}, lr=0.1, weight_decay=1e-3, l1=1e-4), SGD({"w": b}, lr=0.1, weight_decay=1e-3, l1=1e-4)
    for _ in range(3):
        g = rng.standard_normal(a.data.shape).astype(np.float32)
        a.grad, b.grad = g * a.mask, g * b.mask
        one.step()
        two.stage()
        two.apply()
        two.advance()
    assert np.array_equal(a.data, b.data) and np.array_equal(a.state["momentum"], b.state["momentum"])
    assert one.iteration == two.iteration == 3


# ----------------------------------------------------------------------------- on a GPU
def _param_pair(cupy, shape, pruned, seed, scale=1.0, **kw):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal(shape) * scale).astype(np.float32)
    host, dev = Param(W.copy(), **kw), Param(cupy.asarray(W), **kw)
    if pruned:
        keep = rng.random(shape) >= pruned
        host.prune(keep)
        dev.prune(cupy.asarray(keep))
    return host, dev, rng


@gpu
@pytest.mark.parametrize("pruned", [0.0, 0.6])
@pytest.mark.parametrize("scale", [1.0, 1e-36])  # 1e-36: subnormal products, which CuPy's -ftz=true would flush
@pytest.mark.parametrize("wd, l1, lr_mult, decay_mult", [(5e-4, 0.0, 1.0, 1.0), (5e-4, 1e-4, 2.0, 0.0),
                                                         (0.0, 1e-3, 1.0, 1.0)])
def test_fused_update_equals_numpy_bit_for_bit(cupy, pruned, scale, wd, l1, lr_mult, decay_mult):
    host, dev, rng = _param_pair(cupy, (300, 257), pruned, 1, scale, lr_mult=lr_mult, decay_mult=decay_mult)
    kw = dict(lr=0.01, momentum=0.9, weight_decay=wd, l1=l1, lr_policy="inv", gamma=1e-4, power=0.75)
    oh, od = SGD({"w": host}, **kw), SGD({"w": dev}, **kw)
    for _ in range(4):
        g = (rng.standard_normal(host.data.shape) * scale).astype(np.float32)
        if pruned:
            g[host.mask == 0] = np.nan  # pruned positions never take a value, whatever the gradient
        host.grad, dev.grad = g.copy(), cupy.asarray(g)
        oh.step()
        od.step()
        assert od._fused == [True]
        assert np.array_equal(host.data.view(np.uint32), cupy.asnumpy(dev.data).view(np.uint32))
        assert np.array_equal(host.state["momentum"].view(np.uint32),
                              cupy.asnumpy(dev.state["momentum"]).view(np.uint32))
        assert dev.grad is None


@gpu
@pytest.mark.parametrize("N, K, order", [(64, 10, "F"), (7, 1000, "C"), (1, 3, "C")])
def test_fused_loss_matches_numpy(cupy, N, K, order):
    rng = np.random.default_rng(N)
    z = np.asarray(rng.standard_normal((N, K)) * 5, np.float32, order=order)
    t = rng.integers(0, K, N)
    loss, cache = L.softmax_cross_entropy_forward(z, t)
    gz = L.softmax_cross_entropy_backward(1.0, cache)
    dloss, dgz = cuda.softmax_cross_entropy(cupy.asarray(z, order=order), cupy.asarray(t.astype(np.int32)))
    np.testing.assert_allclose(float(dloss), float(loss), rtol=1e-5)
    np.testing.assert_allclose(cupy.asnumpy(dgz), gz, rtol=1e-4, atol=1e-7)


@gpu
@pytest.mark.parametrize("a_order, b_order", [("C", "C"), ("F", "C"), ("C", "F"), ("F", "F"), ("S", "C")])
@pytest.mark.parametrize("M, K, N", [(64, 784, 300), (1, 5, 7), (300, 1, 2), (4096, 500, 50), (3, 0, 4)])
def test_cublas_matmul_matches_numpy(cupy, a_order, b_order, M, K, N):
    """Every layout the layers pass (row-major, transposed views, a strided slice copied first) and
    degenerate sizes; the result is a new row-major array."""
    rng = np.random.default_rng(M + K + N)
    full = rng.standard_normal((M, 2 * K)).astype(np.float32)
    a = full[:, ::2] if a_order == "S" else np.asarray(full[:, :K], order=a_order)
    b = np.asarray(rng.standard_normal((K, N)).astype(np.float32), order=b_order)
    da = cupy.asarray(full)[:, ::2] if a_order == "S" else cupy.asarray(a, order=a_order)
    got = cuda.matmul(da, cupy.asarray(b, order=b_order))
    assert isinstance(cuda.cublas(), tuple) and got.flags.c_contiguous and got.shape == (M, N)
    np.testing.assert_allclose(cupy.asnumpy(got), a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)


@gpu
def test_lenet_steps_can_be_recorded(cupy):
    net = build_model("lenet-5", 0, cupy)
    assert cuda.capturable(net, SGD(net.params())) is None


@gpu
@pytest.mark.parametrize("k, stride, ceil", [(2, 2, False), (3, 2, True), (3, 3, True), (2, 1, False)])
@pytest.mark.parametrize("ties", [False, True])
def test_maxpool_kernel_routes_like_numpy(cupy, k, stride, ceil, ties):
    from sparsenet import fast_layers as F

    rng = np.random.default_rng(k * 10 + stride)
    x = (rng.integers(0, 3, (4, 13, 11, 5)) if ties else rng.standard_normal((4, 13, 11, 5))).astype(np.float32)
    y, cache = F.maxpool2d_forward(x, k, stride, ceil)
    dy, dcache = F.maxpool2d_forward(cupy.asarray(x), k, stride, ceil)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    want, got = F.maxpool2d_backward(gy, cache), F.maxpool2d_backward(cupy.asarray(gy), dcache)
    assert np.array_equal(cupy.asnumpy(dy), y)
    assert np.array_equal(cupy.asnumpy(got) + np.float32(0), want + np.float32(0))


@gpu
def test_fused_relu_backward_equals_numpy(cupy):
    rng = np.random.default_rng(0)
    y = np.maximum(rng.standard_normal((64, 300)), 0).astype(np.float32)
    gy = np.asfortranarray(rng.standard_normal((64, 300)).astype(np.float32))
    got = cuda.relu_backward(cupy.asarray(gy, order="F"), cupy.asarray(y))
    assert np.array_equal(cupy.asnumpy(got), L.relu_backward(gy, y))


@gpu
@pytest.mark.parametrize("M", [1, 3, 8, 9, 64])
@pytest.mark.parametrize("F, K, density", [(37, 100, 0.3), (4096, 9216, 0.09), (5, 7, 0.0)])
def test_csr_product_matches_dense(cupy, M, F, K, density):
    from sparsenet.codecs import csr_from_dense

    rng = np.random.default_rng(M)
    W = (rng.standard_normal((F, K)) * (rng.random((F, K)) < density)).astype(np.float32)
    W[::3] = 0  # empty rows
    X = rng.standard_normal((M, K)).astype(np.float32)
    A = cuda.CSRMatrix(*csr_from_dense(W), W.shape)
    got = cupy.asnumpy(A.matmul_t(cupy.asarray(X)))
    np.testing.assert_allclose(got, X.astype(np.float64) @ W.T.astype(np.float64), rtol=1e-4, atol=1e-4)


def _epochs(cupy, name, graphs, monkeypatch, pruned=True, n=1000, batch=64):
    monkeypatch.setenv(cuda.GRAPHS_ENV, "1" if graphs else "0")
    net = build_model(name, 0, cupy)
    if pruned:
        prune_at_random(net, {l.name: 0.3 for l in net.layers if l.params}, 0)
    opt = SGD(net.params(), lr=0.01, momentum=0.9, weight_decay=5e-4, l1=1e-5)
    rng = np.random.default_rng(0)
    x = rng.random((n, *net.input_shape), dtype=np.float32)
    t = rng.integers(0, 10, n)
    split = ArraySplit(cupy.asarray(x), cupy.asarray(t))
    out = [train_epoch(net, opt, split, batch, rng) for _ in range(2)]
    return out, {k: cupy.asnumpy(p.data) for k, p in net.params().items()}, opt.iteration


@gpu
@pytest.mark.parametrize("name", ["lenet-300-100", "lenet-5"])
def test_graph_replay_trains_bit_identically_to_eager_steps(cupy, monkeypatch, name):
    """1000 images at batch 64: 15 full batches (one eager, one recorded, 13 replayed) and a batch of 40
    (eager), two epochs; losses, errors, every parameter and t agree exactly."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        eager = _epochs(cupy, name, False, monkeypatch)
        graph = _epochs(cupy, name, True, monkeypatch)
    assert not [w for w in seen if "capture" in str(w.message)]  # the steps were recorded and replayed
    assert eager[0] == graph[0] and eager[2] == graph[2] == 32
    for k in eager[1]:
        assert np.array_equal(eager[1][k], graph[1][k]), k
    for k, p in graph[1].items():
        assert np.isfinite(p).all()


@gpu
def test_a_step_that_cannot_be_recorded_runs_eagerly_with_a_warning(cupy):
    calls = []

    def body(x, t):
        calls.append(x.shape)
        if cupy.cuda.runtime.streamIsCapturing(cupy.cuda.get_current_stream().ptr):
            float(x.sum())  # waits for the device: not allowed while recording
        x += 1

    x, t = cupy.zeros(4, np.float32), cupy.zeros(4, np.int64)
    try:
        with pytest.warns(UserWarning, match="capture failed"):
            with cuda.CapturedStep(body) as step:
                for _ in range(3):
                    step(x, t)
        assert float(x.sum()) == 4 * 3  # the eager first step, the failed recording's eager rerun, one more
        assert step.failed and "earlier capture" in cuda.capturable(build_model("lenet-5", 0, cupy), SGD({}))
    finally:
        cuda._failed = None  # the other tests record graphs again


@gpu
def test_gpu_auto_inference_measures_and_matches_dense(cupy):
    from sparsenet.inference import SparseNetwork

    spec = {"name": "fc6", "input_shape": [9216], "layers": [{"kind": "linear", "name": "fc6", "n_in": 9216,
                                                              "n_out": 4096}]}
    net = prune_at_random(build_network(spec, 0, cupy), {"fc6": 0.09}, 0)
    auto = SparseNetwork(net)
    x = cupy.asarray(np.random.default_rng(0).random((1, 9216), dtype=np.float32))
    plan = auto.plan(1)
    assert set(plan.values()) <= {"sparse", "dense"} and ("fc6", 1) in auto.measured
    np.testing.assert_allclose(cupy.asnumpy(auto.forward(x)), cupy.asnumpy(net.forward(x)), rtol=1e-4, atol=1e-4)
