"""Finite-difference checks of every hand-derived backward pass in sparsenet.layers.

Each backward is compared, in float64, with central differences of the scalar loss
``L = sum(y * R)`` for a fixed random ``R`` (so ``gy = R``). The pure functions checked
here are the plain ones of sparsenet.layers; the layer classes, which run the tuned
kernels of sparsenet.fast_layers, are checked end to end in ``test_layer_classes_gradients``
(and the two families against each other in test_fast_layers.py). Every test runs once
per array module (``xp`` fixture: numpy, and cupy when a GPU is present).
"""
import itertools
import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from sparsenet import layers as L
from sparsenet.backend import asnumpy

from gradcheck import (assert_grad, assert_stack_gradients, distinct_values, numerical_grad, randn, random_mask,  # noqa: F401
                       rel_err)

SEEDS = st.integers(0, 2**32 - 1)


# ----------------------------------------------------------------------------- linear
@given(n=st.integers(1, 4), d_in=st.integers(1, 6), d_out=st.integers(1, 5), seed=SEEDS)
def test_linear_gradients(xp, n, d_in, d_out, seed):
    rng = np.random.default_rng(seed)
    x, W, b = randn(xp, rng, n, d_in), randn(xp, rng, d_out, d_in), randn(xp, rng, d_out)
    R = randn(xp, rng, n, d_out)

    y, cache = L.linear_forward(x, W, b)
    np.testing.assert_allclose(asnumpy(y), asnumpy(x) @ asnumpy(W).T + asnumpy(b), rtol=1e-12, atol=1e-12)
    gx, gW, gb = L.linear_backward(R, cache)

    def f():
        return xp.sum(L.linear_forward(x, W, b)[0] * R)

    assert_grad(gx, numerical_grad(f, x))
    assert_grad(gW, numerical_grad(f, W))
    assert_grad(gb, numerical_grad(f, b))


@given(n=st.integers(1, 4), d_in=st.integers(1, 6), d_out=st.integers(1, 5), seed=SEEDS)
def test_linear_masked_gradient(xp, n, d_in, d_out, seed):
    rng = np.random.default_rng(seed)
    M = random_mask(xp, rng, (d_out, d_in))
    x, W, b = randn(xp, rng, n, d_in), randn(xp, rng, d_out, d_in) * M, randn(xp, rng, d_out)
    R = randn(xp, rng, n, d_out)

    _, cache = L.linear_forward(x, W, b)
    gx, gW, gb = L.linear_backward(R, cache, M)

    def f():
        return xp.sum(L.linear_forward(x, W, b)[0] * R)

    num_gW = numerical_grad(f, W)
    assert_grad(gW, num_gW * asnumpy(M))
    assert np.all(asnumpy(gW)[asnumpy(M) == 0] == 0.0)
    assert_grad(gx, numerical_grad(f, x))
    assert_grad(gb, numerical_grad(f, b))


def test_linear_need_gx_false(xp):
    rng = np.random.default_rng(0)
    x, W, b = randn(xp, rng, 3, 4), randn(xp, rng, 2, 4), randn(xp, rng, 2)
    R = randn(xp, rng, 3, 2)
    _, cache = L.linear_forward(x, W, b)
    gx, gW, gb = L.linear_backward(R, cache, need_gx=False)
    assert gx is None
    np.testing.assert_allclose(asnumpy(gW), asnumpy(R).T @ asnumpy(x), rtol=1e-12)
    np.testing.assert_allclose(asnumpy(gb), asnumpy(R).sum(0), rtol=1e-12)


# ----------------------------------------------------------------------------- im2col / conv
def naive_im2col(x, kh, kw, stride, pad):
    N, H, W, C = x.shape
    xp_ = np.zeros((N, H + 2 * pad, W + 2 * pad, C), dtype=x.dtype)
    xp_[:, pad:pad + H, pad:pad + W, :] = x
    Ho, Wo = (H + 2 * pad - kh) // stride + 1, (W + 2 * pad - kw) // stride + 1
    out = np.zeros((N, Ho, Wo, kh, kw, C), dtype=x.dtype)
    for n, p, q, i, j, c in itertools.product(range(N), range(Ho), range(Wo), range(kh), range(kw), range(C)):
        out[n, p, q, i, j, c] = xp_[n, stride * p + i, stride * q + j, c]
    return out


def naive_conv(x, W, b, stride, pad):
    F, kh, kw, C = W.shape
    cols = naive_im2col(x, kh, kw, stride, pad)
    N, Ho, Wo = cols.shape[:3]
    y = np.zeros((N, Ho, Wo, F))
    for n, p, q, f in itertools.product(range(N), range(Ho), range(Wo), range(F)):
        y[n, p, q, f] = np.sum(cols[n, p, q] * W[f]) + b[f]
    return y


@given(
    n=st.integers(1, 2), h=st.integers(1, 7), w=st.integers(1, 7), c=st.integers(1, 3),
    kh=st.integers(1, 4), kw=st.integers(1, 4), stride=st.integers(1, 3), pad=st.integers(0, 2), seed=SEEDS,
)
def test_im2col_matches_naive_loop(xp, n, h, w, c, kh, kw, stride, pad, seed):
    assume(h + 2 * pad >= kh and w + 2 * pad >= kw)
    x = np.random.default_rng(seed).standard_normal((n, h, w, c))
    cols = L.im2col(xp.asarray(x), kh, kw, stride, pad)
    ref = naive_im2col(x, kh, kw, stride, pad)
    assert cols.shape == ref.shape
    assert ref.shape[1] == L.conv_output_size(h, kh, stride, pad)
    assert ref.shape[2] == L.conv_output_size(w, kw, stride, pad)
    np.testing.assert_array_equal(asnumpy(cols), ref)


@pytest.mark.parametrize("shape,k,stride,pad", [
    ((1, 5, 5, 1), 3, 1, 0), ((2, 6, 5, 2), 2, 2, 1), ((1, 7, 7, 3), 3, 3, 2), ((1, 4, 6, 1), 1, 2, 0),
])
def test_im2col_fixed_cases(xp, shape, k, stride, pad):
    x = np.arange(math.prod(shape), dtype=np.float64).reshape(shape) + 1.0  # distinct, none 0
    cols = L.im2col(xp.asarray(x), k, k, stride, pad)
    np.testing.assert_array_equal(asnumpy(cols), naive_im2col(x, k, k, stride, pad))


@given(
    n=st.integers(1, 2), h=st.integers(1, 7), w=st.integers(1, 7), c=st.integers(1, 3),
    k=st.integers(1, 4), stride=st.integers(1, 3), pad=st.integers(0, 2), seed=SEEDS,
)
def test_col2im_is_adjoint_of_im2col(xp, n, h, w, c, k, stride, pad, seed):
    # <im2col(x), R> = <x, col2im(R)> for all x, R: col2im is im2col's transpose
    assume(h + 2 * pad >= k and w + 2 * pad >= k)
    rng = np.random.default_rng(seed)
    x = randn(xp, rng, n, h, w, c)
    cols = L.im2col(x, k, k, stride, pad)
    R = randn(xp, rng, *cols.shape)
    back = L.col2im(R, x.shape, stride, pad)
    assert back.shape == x.shape
    assert_grad(back, numerical_grad(lambda: xp.sum(L.im2col(x, k, k, stride, pad) * R), x))
    np.testing.assert_allclose(float(xp.sum(cols * R)), float(xp.sum(x * back)), rtol=1e-12, atol=1e-12)


conv_shapes = dict(
    n=st.integers(1, 2), h=st.integers(1, 8), w=st.integers(1, 8), c=st.integers(1, 3), f=st.integers(1, 3),
    k=st.integers(1, 4), stride=st.integers(1, 3), pad=st.integers(0, 2), seed=SEEDS,
)


@given(**conv_shapes)
def test_conv2d_gradients(xp, n, h, w, c, f, k, stride, pad, seed):
    assume(L.conv_output_size(h, k, stride, pad) >= 1 and L.conv_output_size(w, k, stride, pad) >= 1)
    rng = np.random.default_rng(seed)
    x, W, b = randn(xp, rng, n, h, w, c), randn(xp, rng, f, k, k, c), randn(xp, rng, f)

    y, cache = L.conv2d_forward(x, W, b, stride, pad)
    ref = naive_conv(asnumpy(x), asnumpy(W), asnumpy(b), stride, pad)
    assert y.shape == ref.shape
    np.testing.assert_allclose(asnumpy(y), ref, rtol=1e-10, atol=1e-10)
    R = randn(xp, rng, *y.shape)
    gx, gW, gb = L.conv2d_backward(R, cache)

    def fn():
        return xp.sum(L.conv2d_forward(x, W, b, stride, pad)[0] * R)

    assert_grad(gx, numerical_grad(fn, x))
    assert_grad(gW, numerical_grad(fn, W))
    assert_grad(gb, numerical_grad(fn, b))


@given(**conv_shapes)
def test_conv2d_masked_gradient(xp, n, h, w, c, f, k, stride, pad, seed):
    assume(L.conv_output_size(h, k, stride, pad) >= 1 and L.conv_output_size(w, k, stride, pad) >= 1)
    rng = np.random.default_rng(seed)
    M = random_mask(xp, rng, (f, k, k, c))
    x, W, b = randn(xp, rng, n, h, w, c), randn(xp, rng, f, k, k, c) * M, randn(xp, rng, f)
    y, cache = L.conv2d_forward(x, W, b, stride, pad)
    R = randn(xp, rng, *y.shape)
    gx, gW, gb = L.conv2d_backward(R, cache, M)

    def fn():
        return xp.sum(L.conv2d_forward(x, W, b, stride, pad)[0] * R)

    assert_grad(gW, numerical_grad(fn, W) * asnumpy(M))
    assert np.all(asnumpy(gW)[asnumpy(M) == 0] == 0.0)
    assert_grad(gx, numerical_grad(fn, x))
    assert_grad(gb, numerical_grad(fn, b))


def test_conv2d_need_gx_false_and_bad_channels(xp):
    rng = np.random.default_rng(1)
    x, W, b = randn(xp, rng, 2, 5, 5, 2), randn(xp, rng, 3, 3, 3, 2), randn(xp, rng, 3)
    y, cache = L.conv2d_forward(x, W, b, 1, 1)
    R = randn(xp, rng, *y.shape)
    gx_full, gW_full, gb_full = L.conv2d_backward(R, cache)
    gx, gW, gb = L.conv2d_backward(R, cache, need_gx=False)
    assert gx is None and gx_full is not None
    np.testing.assert_array_equal(asnumpy(gW), asnumpy(gW_full))
    np.testing.assert_array_equal(asnumpy(gb), asnumpy(gb_full))
    with pytest.raises(ValueError):
        L.conv2d_forward(randn(xp, rng, 2, 5, 5, 3), W, b)


# ----------------------------------------------------------------------------- maxpool
def naive_maxpool(x, k, stride):
    """Forward by loops, and the backward of gy = 1 per window via first-argmax (row-major)."""
    N, H, W, C = x.shape
    Ho, Wo = (H - k) // stride + 1, (W - k) // stride + 1
    y = np.zeros((N, Ho, Wo, C), dtype=x.dtype)
    first = np.zeros((N, Ho, Wo, C, 2), dtype=int)
    for n, p, q, c in itertools.product(range(N), range(Ho), range(Wo), range(C)):
        win = x[n, stride * p:stride * p + k, stride * q:stride * q + k, c]
        a = int(np.argmax(win))  # first maximal entry in row-major order
        y[n, p, q, c] = win.max()
        first[n, p, q, c] = (stride * p + a // k, stride * q + a % k)
    return y, first


def naive_maxpool_backward(gy, first, x_shape):
    gx = np.zeros(x_shape)
    N, Ho, Wo, C = gy.shape
    for n, p, q, c in itertools.product(range(N), range(Ho), range(Wo), range(C)):
        i, j = first[n, p, q, c]
        gx[n, i, j, c] += gy[n, p, q, c]
    return gx


def check_maxpool(xp, x_host, k, stride, R_host):
    x = xp.asarray(x_host)
    R = xp.asarray(R_host)
    y, cache = L.maxpool2d_forward(x, k, stride)
    ref_y, first = naive_maxpool(x_host, k, stride)
    assert y.shape == ref_y.shape
    np.testing.assert_array_equal(asnumpy(y), ref_y)
    gx = L.maxpool2d_backward(R, cache)
    assert gx.shape == x_host.shape
    np.testing.assert_allclose(asnumpy(gx), naive_maxpool_backward(R_host, first, x_host.shape), rtol=1e-12, atol=0)

    def f():
        return xp.sum(L.maxpool2d_forward(x, k, stride)[0] * R)

    assert_grad(gx, numerical_grad(f, x))


@given(
    n=st.integers(1, 2), h=st.integers(1, 7), w=st.integers(1, 7), c=st.integers(1, 3),
    k=st.integers(1, 3), stride=st.integers(1, 3), seed=SEEDS,
)
def test_maxpool_gradients(xp, n, h, w, c, k, stride, seed):
    assume(h >= k and w >= k)
    rng = np.random.default_rng(seed)
    x = distinct_values(rng, (n, h, w, c))
    Ho, Wo = (h - k) // stride + 1, (w - k) // stride + 1
    check_maxpool(xp, x, k, stride, rng.standard_normal((n, Ho, Wo, c)))


@pytest.mark.parametrize("shape,k,stride", [
    ((2, 6, 6, 2), 3, 2),   # overlapping (k > stride)
    ((1, 7, 5, 3), 3, 1),   # overlapping, stride 1
    ((2, 6, 4, 2), 2, 2),   # non-overlapping, divisible
    ((1, 7, 5, 2), 2, 2),   # non-overlapping, H and W not divisible by k
    ((1, 7, 7, 1), 3, 3),   # non-overlapping, 7 = 2·3 + 1
    ((2, 7, 6, 2), 2, 3),   # gapped (k < stride)
    ((1, 7, 7, 2), 1, 3),   # gapped, k = 1 (strided subsampling)
    ((1, 4, 4, 2), 1, 1),   # identity
])
def test_maxpool_cases(xp, shape, k, stride):
    rng = np.random.default_rng(sum(shape) * 10 + k * 3 + stride)
    x = distinct_values(rng, shape)
    N, H, W, C = shape
    check_maxpool(xp, x, k, stride, rng.standard_normal((N, (H - k) // stride + 1, (W - k) // stride + 1, C)))


@pytest.mark.parametrize("k,stride", [(2, 2), (3, 3), (2, 1), (3, 2), (2, 3)])
def test_maxpool_ties_go_to_first(xp, k, stride):
    # all-equal windows: the whole gy lands on the window's first (top-left) input
    x_host = np.full((1, 6, 6, 2), 0.5)
    y, cache = L.maxpool2d_forward(xp.asarray(x_host), k, stride)
    Ho = (6 - k) // stride + 1
    assert y.shape == (1, Ho, Ho, 2)
    assert np.all(asnumpy(y) == 0.5)
    gy = np.arange(1, Ho * Ho * 2 + 1, dtype=np.float64).reshape(1, Ho, Ho, 2)
    gx = asnumpy(L.maxpool2d_backward(xp.asarray(gy), cache))
    expected = np.zeros_like(x_host)
    for p, q in itertools.product(range(Ho), range(Ho)):
        expected[0, stride * p, stride * q, :] += gy[0, p, q, :]
    np.testing.assert_array_equal(gx, expected)
    assert gx.sum() == gy.sum()

    # many ties (values in {0, 1, 2}): y is the loop maximum, gy goes to the first maximum
    rng = np.random.default_rng(k * 10 + stride)
    x_host = rng.integers(0, 3, (2, 7, 7, 3)).astype(np.float64)
    y, cache = L.maxpool2d_forward(xp.asarray(x_host), k, stride)
    ref_y, first = naive_maxpool(x_host, k, stride)
    np.testing.assert_array_equal(asnumpy(y), ref_y)
    gy = rng.standard_normal(ref_y.shape)
    gx = asnumpy(L.maxpool2d_backward(xp.asarray(gy), cache))
    np.testing.assert_allclose(gx, naive_maxpool_backward(gy, first, x_host.shape), rtol=1e-12, atol=0)


def test_maxpool_window_larger_than_input(xp):
    with pytest.raises(ValueError):
        L.maxpool2d_forward(xp.zeros((1, 2, 5, 1)), 3, 1)


# ----------------------------------------------------------------------------- classes
@pytest.mark.parametrize("seed", [0, 1])
def test_layer_classes_gradients(xp, seed):
    """A small net of the layer classes (fast kernels), float64, masks pruned: every
    parameter gradient and the input gradient against finite differences."""
    rng = np.random.default_rng(seed)
    net = [
        L.Conv2d("conv1", 1, 3, 3, stride=1, pad=1, rng=rng, xp=xp), L.ReLU("relu1"), L.MaxPool2d("pool1", 2),
        L.Conv2d("conv2", 3, 4, 2, stride=2, pad=0, rng=rng, xp=xp), L.MaxPool2d("pool2", 3, 2),
        L.Flatten("flatten"), L.Linear("fc1", 4, 5, rng=rng, xp=xp), L.ReLU("relu2"),
        L.Linear("fc2", 5, 3, rng=rng, xp=xp),
    ]
    x = randn(xp, rng, 2, 14, 14, 1)  # 14 -> conv1 14 -> pool1 7 -> conv2 3 -> pool2 1
    assert_stack_gradients(xp, net, x, randn(xp, rng, 2, 3), rng)


# ----------------------------------------------------------------------------- relu
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=SEEDS)
def test_relu_gradients(xp, shape, seed):
    rng = np.random.default_rng(seed)
    mag = rng.uniform(1e-3, 2.0, shape)
    sign = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    x_host = mag * sign
    x = xp.asarray(x_host)
    R = randn(xp, rng, *shape)
    y, cache = L.relu_forward(x)
    np.testing.assert_array_equal(asnumpy(y), np.maximum(x_host, 0.0))
    gx = L.relu_backward(R, cache)
    np.testing.assert_array_equal(asnumpy(gx), np.where(x_host > 0, asnumpy(R), 0.0))

    def f():
        return xp.sum(L.relu_forward(x)[0] * R)

    assert_grad(gx, numerical_grad(f, x))


def test_relu_zero_subgradient(xp):
    y, cache = L.relu_forward(xp.asarray([-1.0, 0.0, 2.0]))
    np.testing.assert_array_equal(asnumpy(L.relu_backward(xp.asarray([5.0, 5.0, 5.0]), cache)), [0.0, 0.0, 5.0])


# ----------------------------------------------------------------------------- dropout
def make_rng(xp, seed):
    return np.random.default_rng(seed) if xp is np else xp.random.default_rng(seed)


def nonzero_input(rng, shape):
    return rng.uniform(0.5, 2.0, shape) * np.where(rng.random(shape) < 0.5, -1.0, 1.0)


@pytest.mark.parametrize("rate,train", [(0.0, True), (0.0, False), (0.5, False), (0.9, False)])
def test_dropout_identity(xp, rate, train):
    rng = np.random.default_rng(3)
    x_host = nonzero_input(rng, (4, 5))
    gy_host = rng.standard_normal((4, 5))
    y, cache = L.dropout_forward(xp.asarray(x_host), rate, make_rng(xp, 0), train=train)
    np.testing.assert_array_equal(asnumpy(y), x_host)
    np.testing.assert_array_equal(asnumpy(L.dropout_backward(xp.asarray(gy_host), cache)), gy_host)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_dropout_training(xp, rate):
    rng = np.random.default_rng(4)
    x_host = nonzero_input(rng, (50, 40))
    gy_host = rng.standard_normal(x_host.shape)
    y, cache = L.dropout_forward(xp.asarray(x_host), rate, make_rng(xp, 1), train=True)
    y = asnumpy(y)
    assert y.dtype == np.float64
    kept = y != 0
    scaled = x_host / (1.0 - rate)
    # each entry is either dropped or scaled by 1/(1 - rate)
    np.testing.assert_allclose(y[kept], scaled[kept], rtol=1e-12)
    assert 0 < kept.sum() < kept.size
    gx = asnumpy(L.dropout_backward(xp.asarray(gy_host), cache))
    np.testing.assert_allclose(gx, np.where(kept, gy_host / (1.0 - rate), 0.0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.7])
def test_dropout_keep_fraction(xp, rate):
    n = 200_000
    y, _ = L.dropout_forward(xp.ones(n), rate, make_rng(xp, 7), train=True)
    frac = float(np.count_nonzero(asnumpy(y))) / n
    p = 1.0 - rate
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - p) < 5 * sigma, (frac, p, sigma)


def test_dropout_masks_differ_between_calls(xp):
    rng = make_rng(xp, 2)
    x = xp.ones(1000)
    a, _ = L.dropout_forward(x, 0.5, rng, train=True)
    b, _ = L.dropout_forward(x, 0.5, rng, train=True)
    assert not np.array_equal(asnumpy(a), asnumpy(b))


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5])
def test_dropout_invalid_rate(xp, rate):
    with pytest.raises(ValueError):
        L.dropout_forward(xp.ones((3, 3)), rate, make_rng(xp, 0), train=True)


# ----------------------------------------------------------------------------- softmax CE
def stable_ce(z, t):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(lse - z[np.arange(len(z)), t]))


@given(n=st.integers(1, 4), k=st.integers(2, 6), seed=SEEDS)
def test_softmax_ce_gradient(xp, n, k, seed):
    rng = np.random.default_rng(seed)
    z_host = rng.standard_normal((n, k)) * 3
    t_host = rng.integers(0, k, n)
    z, t = xp.asarray(z_host), xp.asarray(t_host)
    loss, cache = L.softmax_cross_entropy_forward(z, t)
    assert abs(float(loss) - stable_ce(z_host, t_host)) < 1e-12 * max(1.0, abs(float(loss)))
    gz = L.softmax_cross_entropy_backward(1.0, cache)

    def f():
        return L.softmax_cross_entropy_forward(z, t)[0]

    assert_grad(gz, numerical_grad(f, z))
    # gloss scales the gradient; each row of gz sums to 0
    gz2 = L.softmax_cross_entropy_backward(2.5, L.softmax_cross_entropy_forward(z, t)[1])
    np.testing.assert_allclose(asnumpy(gz2), 2.5 * asnumpy(gz), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(asnumpy(gz).sum(axis=1), 0.0, atol=1e-12)


def test_softmax_ce_stability(xp):
    z_host = np.array([[1000.0, 0.0, -1000.0], [1000.0, 0.0, -1000.0], [-1000.0, 1000.0, 999.0], [0.0, 0.0, 800.0]])
    t_host = np.array([0, 2, 2, 1])
    loss, cache = L.softmax_cross_entropy_forward(xp.asarray(z_host), xp.asarray(t_host))
    gz = asnumpy(L.softmax_cross_entropy_backward(1.0, cache))
    assert math.isfinite(float(loss))
    assert np.all(np.isfinite(gz))
    # by hand: row losses 0, 2000, log(1 + e) (the max is 1000, the target 999 -> 1 + log(1 + e^-1)), 800
    by_hand = np.mean([0.0, 2000.0, 1.0 + math.log1p(math.exp(-1.0)), 800.0])
    assert abs(float(loss) - by_hand) < 1e-9
    assert abs(float(loss) - stable_ce(z_host, t_host)) < 1e-9
    p = np.array([[1, 0, 0], [1, 0, 0], [0, 1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))], [0, 0, 1]])
    onehot = np.eye(3)[t_host]
    np.testing.assert_allclose(gz, (p - onehot) / 4, atol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 10])
def test_softmax_ce_uniform_logits(xp, k):
    z = xp.full((5, k), 3.7)
    t = xp.asarray(np.arange(5) % k)
    loss, _ = L.softmax_cross_entropy_forward(z, t)
    assert abs(float(loss) - math.log(k)) < 1e-12


# ----------------------------------------------------------------------------- flatten
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 8, 8, 50), (3, 7), (4, 1, 1, 1)])
def test_flatten_round_trip(xp, shape):
    x_host = np.random.default_rng(0).standard_normal(shape)
    layer = L.Flatten("flatten")
    y = layer.forward(xp.asarray(x_host))
    assert y.shape == (shape[0], math.prod(shape[1:]))
    assert layer.output_shape(shape[1:]) == (math.prod(shape[1:]),)
    np.testing.assert_array_equal(asnumpy(y), x_host.reshape(shape[0], -1))
    g = layer.backward(y * 2)
    assert g.shape == shape
    np.testing.assert_array_equal(asnumpy(g), 2 * x_host)
