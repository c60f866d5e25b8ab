"""The CUDA kernels of :mod:`sparsenet.cuda` run on the CPU, against the NumPy path.

``tests/cuda_emulator.cpp`` is a C++20 program that ``#include``\\ s :data:`sparsenet.cuda.SOURCE` after a
prelude defining what the kernels use of CUDA C (``__global__``, ``threadIdx``/``blockIdx``/``blockDim``/
``gridDim``, ``__float_as_uint`` and friends, ``fmaxf``/``expf``/``logf``, ``__shfl_down_sync``). It is
compiled once per session with g++ (``-ffp-contract=off``, no fast-math: each float operation rounded on its
own, as the kernels compiled with ``--fmad=false`` and NumPy round it); without g++ the tests skip.

The tests run the real Python wrappers (:func:`sparsenet.cuda.sgd_update`,
:func:`sparsenet.cuda.softmax_cross_entropy`, :meth:`sparsenet.cuda.CSRMatrix.matmul_t`) with NumPy standing
in for CuPy and a launcher standing in for the compiled kernel: it writes the launch's arguments (arrays,
NumPy scalars; the same device pointer twice as an alias) to a file, runs the emulator with the wrapper's
grid and block, and copies what the kernel wrote back into the arrays. The emulator checks each argument's
size against the kernel's parameter type, rejects launch configurations CUDA rejects, and runs each warp's
32 lanes as threads that meet at a barrier in ``__shfl_down_sync``, refusing a full-mask shuffle when a lane
of the warp has exited or does not exist.

Emulated: the kernels' index arithmetic, grid-stride loops and bounds checks, the float32 arithmetic
(``sgd_update`` is compared bit for bit with :class:`sparsenet.optim.SGD`), the warp reductions, and the
wrappers' launch geometry and argument lists. Not emulated: timing and occupancy; the memory model (blocks
and warps run one after another, so a race between blocks or a missing fence passes here); real warp
scheduling (lanes are independent threads that only meet at a shuffle: no lockstep, and divergence is
only caught where a lane has left the kernel); NVRTC itself; the GPU's transcendental functions (glibc's
``expf``/``logf`` here, a few ulp from CUDA's) and its NaN payloads (a GPU returns the canonical NaN, x86
propagates an input's). ``tests/test_cuda.py`` covers those on a real device.
"""
import contextlib
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from sparsenet import cuda
from sparsenet.codecs import csr_from_dense
from sparsenet.layers import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from sparsenet.optim import SGD
from sparsenet.param import Param

HERE = Path(__file__).resolve().parent
# -ffp-contract=off, no -ffast-math: no fused multiply-adds, every float op rounded as NumPy rounds it
FLAGS = ["-std=c++20", "-O1", "-pthread", "-ffp-contract=off", "-Wall", "-Wextra", "-Wno-unknown-pragmas"]
SANITIZE = ["-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]

pytestmark = pytest.mark.skipif(sys.byteorder != "little", reason="the emulator's file format is little-endian")


class EmulatorError(RuntimeError):
    """The emulator refused a launch (bad arguments or configuration) or the kernel broke an emulation rule."""

    def __init__(self, returncode, stderr):
        super().__init__(f"emulator exit {returncode}: {stderr.strip()}")
        self.returncode, self.stderr = returncode, stderr


class Launch:
    """One emulated launch: the kernel's name, grid, block and argument tuple (the wrapper's own arrays)."""

    def __init__(self, name, grid, block, args):
        self.name, self.grid, self.block, self.args = name, tuple(grid), tuple(block), tuple(args)


def _window(a):
    """A 1-D view of the memory an array argument spans, from its first element (what a kernel can reach)."""
    if any(s < 0 or s % a.itemsize for s in a.strides):
        raise TypeError(f"array argument with strides {a.strides}: only non-negative whole-element strides")
    span = 0 if a.size == 0 else sum((n - 1) * s for n, s in zip(a.shape, a.strides)) + a.itemsize
    return np.lib.stride_tricks.as_strided(a, shape=(span // a.itemsize,), strides=(a.itemsize,))


class Emulator:
    """Runs kernels of ``SOURCE`` with the compiled emulator ``exe``; ``calls`` lists the launches made."""

    def __init__(self, exe, sanitized=False):
        self.exe, self.calls, self.sanitized = str(exe), [], sanitized

    def launch(self, name, grid, block, args):
        """What ``cuda.kernel(name)(grid, block, args)`` does on a GPU, on the arguments' NumPy arrays."""
        dims = [*grid, *(1,) * (3 - len(grid)), *block, *(1,) * (3 - len(block))]
        records, windows = [], []
        for i, a in enumerate(args):
            if isinstance(a, np.ndarray):
                w = _window(a)
                same = [j for j, b in windows if b.__array_interface__["data"][0] == w.__array_interface__["data"][0]]
                if same:
                    records.append((2, same[0], b""))
                    continue
                if any(np.shares_memory(w, b) for _, b in windows):
                    raise TypeError(f"argument {i} overlaps an earlier array without being the same pointer")
                windows.append((i, w))
                records.append((1, w.nbytes, w.tobytes()))
            elif isinstance(a, np.generic):  # CuPy passes a NumPy scalar as its C type
                records.append((0, a.nbytes, a.tobytes()))
            else:
                raise TypeError(f"argument {i} is a {type(a).__name__}: a kernel takes arrays and NumPy scalars")
        with tempfile.TemporaryDirectory(prefix="cuem") as d:
            src, dst = os.path.join(d, "in"), os.path.join(d, "out")
            with open(src, "wb") as f:
                f.write(b"CUEM" + struct.pack("<I", len(records)))
                for kind, n, payload in records:
                    f.write(struct.pack("<IQ", kind, n) + payload)
            r = subprocess.run([self.exe, name, *map(str, dims), src, dst], capture_output=True, text=True,
                               timeout=120)
            if r.returncode:
                raise EmulatorError(r.returncode, r.stderr)
            out = Path(dst).read_bytes()
        self.calls.append(Launch(name, grid, block, args))
        assert out[:4] == b"CUEM" and struct.unpack_from("<I", out, 4)[0] == len(records)
        pos, written = 8, {}
        for i in range(len(records)):
            kind, n = struct.unpack_from("<IQ", out, pos)
            pos += 12
            if kind == 0:
                pos += n
            elif kind == 1:
                written[i] = out[pos:pos + n]
                pos += n
        for i, w in windows:
            if written[i] != w.tobytes():
                w[...] = np.frombuffer(written[i], dtype=w.dtype)


def _build(cxx, flags, source, exe):
    return subprocess.run([cxx, *flags, str(source), "-o", str(exe)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    """The emulator built with SOURCE (once per session), with AddressSanitizer and UBSan where they work."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found: the CUDA kernels are emulated by a C++20 program built with g++")
    d = tmp_path_factory.mktemp("cuda_emulator")
    probe = d / "probe.cpp"
    probe.write_text("#include <barrier>\n#include <thread>\n"
                     "int main() { std::barrier<> b(2); std::thread t([&] { b.arrive_and_wait(); });"
                     " b.arrive_and_wait(); t.join(); }\n")
    r = _build(cxx, FLAGS, probe, d / "probe")
    if r.returncode:
        pytest.skip(f"{cxx} cannot build C++20 with std::barrier (g++ 11 or newer needed): "
                    f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    flags = FLAGS
    r = _build(cxx, FLAGS + SANITIZE, probe, d / "probe-san")
    if r.returncode == 0 and subprocess.run([str(d / "probe-san")], capture_output=True, timeout=60).returncode == 0:
        flags = FLAGS + SANITIZE  # out-of-bounds reads and writes of the kernels become errors
    (d / "kernels.cu").write_text(cuda.SOURCE)
    exe = d / "emu"
    r = _build(cxx, [*flags, "-I", str(d)], HERE / "cuda_emulator.cpp", exe)
    if r.returncode:
        pytest.fail(f"the kernels do not build in the emulator:\n{r.stderr}")
    return Emulator(exe, sanitized=flags is not FLAGS)


@contextlib.contextmanager
def emulated(emu, max_blocks=None):
    """Inside: sparsenet.cuda's wrappers run with NumPy as CuPy and every kernel launched on ``emu``.
    ``max_blocks`` caps the wrappers' grid for the grid-stride kernels (several passes of the loop)."""
    real_blocks = cuda._blocks
    blocks = real_blocks if max_blocks is None else (lambda n: min(real_blocks(n), max_blocks))
    del emu.calls[:]
    with mock.patch.object(cuda, "_cupy", lambda: np), \
            mock.patch.object(cuda, "kernel", lambda name: lambda grid, block, args: emu.launch(name, grid, block, args)), \
            mock.patch.object(cuda, "_blocks", blocks):
        yield emu


def bits(a):
    return np.ascontiguousarray(a).view(np.uint32)


# ----------------------------------------------------------------------------- sgd_update
def _sgd_case(seed, n, shape2d, mask, magnitude, fresh):
    """W, gradient, momentum and the keep mask (or None): NaN and inf in the gradient where pruned."""
    rng = np.random.default_rng(seed)
    shape = (n // 7, 7) if shape2d and n % 7 == 0 else (n,)
    W = (rng.standard_normal(shape) * magnitude).astype(np.float32)
    W[rng.random(shape) < 0.05] = 0.0  # survivors at exactly 0: sign(0) = 0 for L1
    G = (rng.standard_normal(shape) * magnitude).astype(np.float32)
    G[rng.random(shape) < 0.05] = 0.0
    V = None if fresh else (rng.standard_normal(shape) * 0.1 * magnitude).astype(np.float32)
    keep = None
    if mask == "pruned":
        keep = rng.random(shape) < 0.6
        keep.flat[0], keep.flat[-1] = False, n > 1  # something pruned, and kept where there is room
        G[~keep] = np.where(rng.random(int((~keep).sum())) < 0.5, np.nan, np.inf)  # a diverged layer's gradient
    elif mask == "all kept":
        keep = np.ones(shape, dtype=bool)
    return W, G, V, keep


def _param(W, V, keep, prunable, lr_mult, decay_mult):
    p = Param(W.copy(), prunable=prunable, lr_mult=lr_mult, decay_mult=decay_mult)
    if V is not None:
        p.state["momentum"] = V.copy()
    if keep is not None:
        p.prune(keep)  # sets the mask (and zeroes W, V where pruned) with Param's own API
    return p


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 1600), shape2d=st.booleans(),
       mask=st.sampled_from(["pruned", "none", "all kept"]), prunable=st.booleans(),
       wd=st.sampled_from([0.0, 5e-4, 0.03]), l1=st.sampled_from([0.0, 1e-4, 0.02]),
       lr=st.floats(1e-4, 1.0), lr_mult=st.sampled_from([1.0, 2.0]), decay_mult=st.sampled_from([0.0, 1.0]),
       magnitude=st.sampled_from([1.0, 1e-3, 1e-36]), fresh=st.booleans(), max_blocks=st.sampled_from([None, 1, 2, 3]))
@example(seed=1, n=1543, shape2d=False, mask="pruned", prunable=True, wd=5e-4, l1=1e-4, lr=0.01, lr_mult=2.0,
         decay_mult=1.0, magnitude=1.0, fresh=False, max_blocks=2)  # 4 passes of the grid-stride loop
@example(seed=2, n=256 * 7, shape2d=True, mask="pruned", prunable=True, wd=0.03, l1=0.02, lr=0.5, lr_mult=1.0,
         decay_mult=1.0, magnitude=1e-36, fresh=False, max_blocks=None)  # subnormals, whole blocks
def test_sgd_update_equals_numpy_sgd_bit_for_bit(emulator, seed, n, shape2d, mask, prunable, wd, l1, lr, lr_mult,
                                                 decay_mult, magnitude, fresh, max_blocks):
    prunable = prunable or mask != "none"
    W, G, V, keep = _sgd_case(seed, n, shape2d, mask, magnitude, fresh)

    ref = _param(W, V, keep, prunable, lr_mult, decay_mult)
    opt = SGD({"w": ref}, lr=lr, momentum=0.9, weight_decay=wd, l1=l1, lr_policy="fixed")
    ref.grad = G.copy()
    opt.step()

    p = _param(W, V, keep, prunable, lr_mult, decay_mult)
    assert (p._keep is not None) == (mask == "pruned")
    p.grad = G.copy()
    # SGD.stage's device buffer: lr_t * lr_mult of each parameter, this one in slot 1
    scales = np.array([123.0, lr * lr_mult, -7.0], dtype=np.float32)
    with emulated(emulator, max_blocks) as emu:
        cuda.sgd_update(p, opt.settings, scales, 1)

    (call,) = emu.calls
    assert call.name == "sgd_update" and call.block == (256,)
    assert call.grid == (min(math.ceil(n / 256), max_blocks or 65535),)
    assert np.array_equal(bits(p.data), bits(ref.data)), "W differs from NumPy's SGD step"
    assert np.array_equal(bits(p.state["momentum"]), bits(ref.state["momentum"])), "V differs from NumPy's SGD step"
    assert np.array_equal(bits(p.grad), bits(G)), "the kernel changed the gradient"
    assert p.data.shape == W.shape and p.data.dtype == np.float32
    if keep is not None:
        assert np.all(bits(p.data)[~keep] == 0) and np.all(bits(p.state["momentum"])[~keep] == 0)


def test_sgd_update_steps_a_parameter_several_times(emulator):
    """Five steps, momentum carried in p.state, a pruned layer with NaN gradients where pruned."""
    W, G, V, keep = _sgd_case(7, 777, False, "pruned", 1.0, True)
    ref, p = _param(W, V, keep, True, 1.0, 1.0), _param(W, V, keep, True, 1.0, 1.0)
    opt = SGD({"w": ref}, lr=0.05, momentum=0.9, weight_decay=5e-4, l1=1e-4, lr_policy="inv")
    rng = np.random.default_rng(3)
    with emulated(emulator, max_blocks=2):
        for _ in range(5):
            g = rng.standard_normal(W.shape).astype(np.float32)
            g[~keep] = np.nan
            lr = opt.current_lr()
            ref.grad, p.grad = g.copy(), g.copy()
            opt.step()
            cuda.sgd_update(p, opt.settings, np.array([lr], np.float32), 0)
            assert np.array_equal(bits(p.data), bits(ref.data))
            assert np.array_equal(bits(p.state["momentum"]), bits(ref.state["momentum"]))


def test_sgd_update_l1_sign_of_negative_zero(emulator):
    """numpy.sign(-0.0) is +0.0: a survivor at -0.0 with gradient and momentum -0.0 keeps NumPy's zero signs."""
    W = np.array([-0.0, -0.0, 1.0], np.float32)
    G = np.array([-0.0, -0.0, 0.5], np.float32)
    V = np.array([-0.0, 0.0, 0.0], np.float32)
    ref, p = _param(W, V, None, True, 1.0, 1.0), _param(W, V, None, True, 1.0, 1.0)
    opt = SGD({"w": ref}, lr=0.1, momentum=0.9, weight_decay=0.0, l1=1e-3, lr_policy="fixed")
    ref.grad, p.grad = G.copy(), G.copy()
    opt.step()
    with emulated(emulator):
        cuda.sgd_update(p, opt.settings, np.array([0.1], np.float32), 0)
    assert np.array_equal(bits(p.state["momentum"]), bits(ref.state["momentum"]))
    assert np.array_equal(bits(p.data), bits(ref.data))


# ----------------------------------------------------------------------------- softmax_xent
def _logits(rng, N, K, layout, scale):
    if layout == "C":
        return (rng.standard_normal((N, K)) * scale).astype(np.float32)
    if layout == "F":
        return np.asfortranarray((rng.standard_normal((N, K)) * scale).astype(np.float32))
    if layout == "transposed":  # a (K, N) array's transpose: element strides (1, N)
        return (rng.standard_normal((K, N)) * scale).astype(np.float32).T
    base = (rng.standard_normal((2 * N + 1, 3 * K)) * scale).astype(np.float32)
    return base[1::2, 2::3]  # element strides (6K, 3), an offset view


def _softmax_reference(z, t, gloss):
    loss, cache = softmax_cross_entropy_forward(z, t)
    return loss, cache[0], softmax_cross_entropy_backward(gloss, cache)


@given(seed=st.integers(0, 2**32 - 1), N=st.integers(1, 300), K=st.integers(1, 12),
       layout=st.sampled_from(["C", "F", "transposed", "strided"]), scale=st.sampled_from([0.1, 1.0, 4.0]),
       gloss=st.sampled_from([1.0, 0.25, 3.0]), int32_labels=st.booleans())
def test_softmax_xent_matches_numpy(emulator, seed, N, K, layout, scale, gloss, int32_labels):
    rng = np.random.default_rng(seed)
    z = _logits(rng, N, K, layout, scale)
    t = rng.integers(0, K, N).astype(np.int32 if int32_labels else np.int64)
    with emulated(emulator) as emu:
        loss, gz = cuda.softmax_cross_entropy(z, t, gloss)
    (call,) = emu.calls
    assert call.name == "softmax_xent" and call.grid == (math.ceil(N / 128),) and call.block == (128,)
    assert (int(call.args[1]), int(call.args[2])) == (z.strides[0] // 4, z.strides[1] // 4)
    rows = call.args[6]

    ref_loss, logp, ref_gz = _softmax_reference(z, t, gloss)
    np.testing.assert_allclose(rows, -logp[np.arange(N), t], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert gz.shape == (N, K) and gz.dtype == np.float32 and gz.flags.c_contiguous
    np.testing.assert_allclose(gz, ref_gz, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [-1, 10, 11, 2**40, -(2**40)])
@pytest.mark.parametrize("layout", ["C", "F"])
def test_softmax_xent_out_of_range_label_gives_a_nan_row(emulator, bad, layout):
    rng = np.random.default_rng(abs(bad) % 1000)
    N, K, gloss = 9, 10, 2.0
    z = _logits(rng, N, K, layout, 2.0)
    t = rng.integers(0, K, N)
    wrong = np.array([1, 4, 8])
    t[wrong] = bad
    with emulated(emulator) as emu:
        loss, gz = cuda.softmax_cross_entropy(z, t, gloss)
    rows = emu.calls[0].args[6]
    assert np.isnan(loss)
    assert np.isnan(rows[wrong]).all() and not np.isnan(np.delete(rows, wrong)).any()

    good = t.copy()
    good[wrong] = 0
    _, logp, ref_gz = _softmax_reference(z, good, gloss)
    ref_gz[wrong] = np.exp(logp[wrong]) * (gloss / N)  # no class is the label: no one-hot term
    ok = np.delete(np.arange(N), wrong)
    np.testing.assert_allclose(rows[ok], -logp[ok, t[ok]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gz, ref_gz, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- csr_matmul_t
def _sparse(rng, F, K, density):
    W = rng.standard_normal((F, K)).astype(np.float32) * (rng.random((F, K)) < density)
    W[rng.random(F) < 0.25] = 0.0  # empty rows
    return W.astype(np.float32)


@given(seed=st.integers(0, 2**32 - 1), F=st.integers(1, 40), K=st.integers(1, 80), density=st.floats(0.0, 1.0),
       M=st.sampled_from([1, 3, 8, 9, 17]))
@example(seed=5, F=37, K=80, density=1.0, M=17)  # rows of 80 non-zeros: three strides of the warp's lanes
@example(seed=6, F=13, K=5, density=0.0, M=9)  # no non-zeros at all
def test_csr_matmul_t_matches_dense_product(emulator, seed, F, K, density, M):
    rng = np.random.default_rng(seed)
    W = _sparse(rng, F, K, density)
    X = rng.standard_normal((M, K)).astype(np.float32)
    data, indices, indptr = csr_from_dense(W)
    with emulated(emulator) as emu:
        Y = cuda.CSRMatrix(data, indices, indptr, W.shape).matmul_t(X)
    b = 1 if M == 1 else 8
    (call,) = emu.calls
    assert call.name == f"csr_matmul_t_{b}"
    assert call.grid == (math.ceil(F / 8), math.ceil(M / b)) and call.block == (256,)
    assert Y.shape == (M, F) and Y.dtype == np.float32
    np.testing.assert_allclose(Y, X.astype(np.float64) @ W.astype(np.float64).T, rtol=1e-5, atol=1e-5)


def test_csr_matmul_t_on_a_column_major_x(emulator):
    """The wrapper makes X row-major before the launch (the kernel indexes X as (M, K) row-major)."""
    rng = np.random.default_rng(11)
    W = _sparse(rng, 19, 33, 0.5)
    X = np.asfortranarray(rng.standard_normal((9, 33)).astype(np.float32))
    with emulated(emulator):
        Y = cuda.CSRMatrix(*csr_from_dense(W), W.shape).matmul_t(X)
    np.testing.assert_allclose(Y, X.astype(np.float64) @ W.astype(np.float64).T, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the emulator itself
def test_emulator_refuses_a_full_mask_shuffle_in_a_partial_warp(emulator):
    """A block of 48 threads leaves lanes 16..31 of its second warp missing: the kernel's shuffle with mask
    0xffffffff is undefined there on a GPU, and the emulator says so instead of inventing values."""
    rng = np.random.default_rng(0)
    W = _sparse(rng, 3, 5, 1.0)
    data, indices, indptr = csr_from_dense(W)
    Y = np.zeros((1, 3), np.float32)
    args = (data, indices, indptr, np.int32(3), np.ones((1, 5), np.float32), np.int32(1), np.int32(5), Y)
    with pytest.raises(EmulatorError, match="names lane 16") as e:
        emulator.launch("csr_matmul_t_1", (1, 1), (48,), args)
    assert e.value.returncode == 3


def test_emulator_checks_argument_types(emulator):
    """A scalar of the wrong width (int64 where the kernel takes int) is refused, as a mismatch would be a bug."""
    W = np.eye(3, dtype=np.float32)
    data, indices, indptr = csr_from_dense(W)
    args = (data, indices, indptr, np.int64(3), np.ones((1, 3), np.float32), np.int32(1), np.int32(3),
            np.zeros((1, 3), np.float32))
    with pytest.raises(EmulatorError, match="argument 3 should be a 4-byte scalar"):
        emulator.launch("csr_matmul_t_1", (1, 1), (256,), args)


def test_emulator_catches_an_out_of_bounds_read(emulator):
    """Built with AddressSanitizer, the emulator turns a kernel's read past an array into an error: here X
    is one row of 3 columns but the launch says K = 5, so the kernel reads X[3] and X[4]."""
    if not emulator.sanitized:
        pytest.skip("g++ here cannot build or run with -fsanitize=address,undefined")
    W = np.ones((2, 5), np.float32)
    args = (*csr_from_dense(W), np.int32(2), np.ones((1, 3), np.float32), np.int32(1), np.int32(5),
            np.zeros((1, 2), np.float32))
    with pytest.raises(EmulatorError, match="heap-buffer-overflow"):
        emulator.launch("csr_matmul_t_1", (1, 1), (256,), args)


# ----------------------------------------------------------------------------- maxpool_backward
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), pool=st.sampled_from([(2, 2, False), (3, 2, False), (3, 2, True), (2, 1, False),
                                                          (3, 3, True)]),
       N=st.integers(1, 2), H=st.integers(3, 9), W=st.integers(3, 9), C=st.integers(1, 3), levels=st.sampled_from([3, 0]))
@example(seed=0, pool=(3, 2, True), N=1, H=7, W=6, C=2, levels=2)
def test_maxpool_backward_routes_like_the_cpu(emulator, seed, pool, N, H, W, C, levels):
    """The kernel's gradient equals fast_layers.maxpool2d_backward's on the CPU: tiling and overlapping windows,
    ceil padding, ties (``levels``: inputs drawn from a few values, so windows hold several maxima; 0: distinct
    values) and a NaN. Values agree exactly (up to the sign of zero: the CPU multiplies a losing gy by 0)."""
    from sparsenet import fast_layers as F

    k, s, ceil = pool
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, levels, (N, H, W, C)) if levels else rng.standard_normal((N, H, W, C))).astype(np.float32)
    if x.size > 4:
        x.flat[rng.integers(x.size)] = np.nan
    y, cache = F.maxpool2d_forward(x, k, s, ceil)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    want = F.maxpool2d_backward(gy, cache)
    xp_, y_ = cache[0], cache[1]  # the padded input the kernel sees
    with emulated(emulator) as emu:
        got = cuda.maxpool_backward(xp_, y_, gy, k, s)[:, :H, :W]
    (call,) = emu.calls
    assert call.name == "maxpool_backward" and call.block == (256,)
    assert got.shape == want.shape
    assert np.array_equal(got + np.float32(0), want + np.float32(0))
