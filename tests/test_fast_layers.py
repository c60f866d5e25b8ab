"""The tuned kernels of sparsenet.fast_layers agree with the plain ones of sparsenet.layers.

Float64 throughout: forward outputs and all three gradients agree to round-off (the two
families sum in other orders) and exactly where no sum is reordered (im2col, max-pool,
including the tie rule: the first maximum of a window in row-major order wins). Every
test runs once per array module (``xp`` fixture: numpy, and cupy when a GPU is present).
"""
from unittest import mock

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from sparsenet import fast_layers as F
from sparsenet import layers as L
from sparsenet.backend import asnumpy

from gradcheck import randn, random_mask

SEEDS = st.integers(0, 2**32 - 1)
TOL = dict(rtol=1e-12, atol=1e-12)


def assert_same_grads(plain, fast, exact=False):
    """The (gx, gW, gb) triples agree: the same entries are None, the others match."""
    for name, a, b in zip(("gx", "gW", "gb"), plain, fast):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.shape == b.shape, name
        if exact:
            np.testing.assert_array_equal(asnumpy(a), asnumpy(b), err_msg=name)
        else:
            np.testing.assert_allclose(asnumpy(a), asnumpy(b), **TOL, err_msg=name)


# ----------------------------------------------------------------------------- linear
@given(n=st.sampled_from([1, 2, 5, 64]), d_in=st.integers(1, 7), d_out=st.integers(1, 6), masked=st.booleans(),
       need_gx=st.booleans(), need_gW=st.booleans(), seed=SEEDS)
def test_linear_plain_equals_fast(xp, n, d_in, d_out, masked, need_gx, need_gW, seed):
    rng = np.random.default_rng(seed)
    M = random_mask(xp, rng, (d_out, d_in)) if masked else None
    x, W, b = randn(xp, rng, n, d_in), randn(xp, rng, d_out, d_in), randn(xp, rng, d_out)
    if masked:
        W = W * M
    y, cache = L.linear_forward(x, W, b)
    y_fast, cache_fast = F.linear_forward(x, W, b)
    assert y.shape == y_fast.shape == (n, d_out)
    np.testing.assert_allclose(asnumpy(y), asnumpy(y_fast), **TOL)

    gy = randn(xp, rng, n, d_out)
    assert_same_grads(L.linear_backward(gy, cache, M, need_gx, need_gW),
                      F.linear_backward(gy, cache_fast, M, need_gx, need_gW))


# ----------------------------------------------------------------------------- conv
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("pad", [0, 1])
@given(n=st.integers(1, 2), h=st.integers(1, 9), w=st.integers(1, 9), f=st.integers(1, 3), k=st.integers(1, 5),
       masked=st.booleans(), need_gx=st.booleans(), need_gW=st.booleans(), seed=SEEDS)
def test_conv2d_plain_equals_fast(xp, c, stride, pad, n, h, w, f, k, masked, need_gx, need_gW, seed):
    assume(h + 2 * pad >= k and w + 2 * pad >= k)
    rng = np.random.default_rng(seed)
    M = random_mask(xp, rng, (f, k, k, c)) if masked else None
    x, W, b = randn(xp, rng, n, h, w, c), randn(xp, rng, f, k, k, c), randn(xp, rng, f)
    if masked:
        W = W * M

    cols, cols_fast = L.im2col(x, k, k, stride, pad), F.im2col(x, k, k, stride, pad)
    assert cols.shape == cols_fast.shape
    np.testing.assert_array_equal(asnumpy(cols), asnumpy(cols_fast))

    y, cache = L.conv2d_forward(x, W, b, stride, pad)
    y_fast, cache_fast = F.conv2d_forward(x, W, b, stride, pad)
    assert y.shape == y_fast.shape == (n, L.conv_output_size(h, k, stride, pad),
                                       L.conv_output_size(w, k, stride, pad), f)
    np.testing.assert_allclose(asnumpy(y), asnumpy(y_fast), **TOL)

    gy = randn(xp, rng, *y.shape)
    assert_same_grads(L.conv2d_backward(gy, cache, M, need_gx, need_gW),
                      F.conv2d_backward(gy, cache_fast, M, need_gx, need_gW))


@given(groups=st.sampled_from([1, 2, 3]), cg=st.integers(1, 2), fg=st.integers(1, 2), n=st.integers(1, 3),
       h=st.integers(1, 7), w=st.integers(1, 7), k=st.integers(1, 3), stride=st.integers(1, 2), pad=st.integers(0, 1),
       chunk=st.integers(0, 2), masked=st.booleans(), need_gx=st.booleans(), need_gW=st.booleans(), seed=SEEDS)
def test_grouped_chunked_conv2d_plain_equals_fast(xp, groups, cg, fg, n, h, w, k, stride, pad, chunk, masked,
                                                  need_gx, need_gW, seed):
    """Grouped convolutions, and the fast kernel run `chunk` images at a time (0: the whole batch)."""
    assume(h + 2 * pad >= k and w + 2 * pad >= k)
    rng = np.random.default_rng(seed)
    c, f = groups * cg, groups * fg
    M = random_mask(xp, rng, (f, k, k, cg)) if masked else None
    x, W, b = randn(xp, rng, n, h, w, c), randn(xp, rng, f, k, k, cg), randn(xp, rng, f)
    if masked:
        W = W * M
    y, cache = L.conv2d_forward(x, W, b, stride, pad, groups)
    per_image = L.conv_output_size(h, k, stride, pad) * L.conv_output_size(w, k, stride, pad) * k * k * c * 8
    with mock.patch.object(F, "WORKSPACE", chunk * per_image if chunk else F.WORKSPACE):
        y_fast, cache_fast = F.conv2d_forward(x, W, b, stride, pad, groups)
        gy = randn(xp, rng, *y.shape)
        grads_fast = F.conv2d_backward(gy, cache_fast, M, need_gx, need_gW)
    assert y.shape == y_fast.shape
    np.testing.assert_allclose(asnumpy(y), asnumpy(y_fast), **TOL)
    assert_same_grads(L.conv2d_backward(gy, cache, M, need_gx, need_gW), grads_fast)


def test_sum_rows(xp):
    G = randn(xp, np.random.default_rng(0), 37, 5)
    np.testing.assert_allclose(asnumpy(F.sum_rows(G)), asnumpy(G).sum(axis=0), **TOL)


# ----------------------------------------------------------------------------- maxpool
@pytest.mark.parametrize("k,stride", [
    (2, 2), (3, 3),   # tiling (k = stride), H and W drawn also as non-multiples of k
    (3, 2), (2, 1),   # overlapping (k > stride)
    (2, 3), (1, 2),   # gapped (k < stride)
    (1, 1),           # identity
])
@given(n=st.integers(1, 2), h=st.integers(1, 10), w=st.integers(1, 10), c=st.integers(1, 3), ties=st.booleans(),
       ceil=st.booleans(), seed=SEEDS)
def test_maxpool_plain_equals_fast(xp, k, stride, n, h, w, c, ties, ceil, seed):
    assume(h >= k and w >= k)
    rng = np.random.default_rng(seed)
    shape = (n, h, w, c)
    # integer values in {0, 1, 2}: most windows have several maxima, both must pick the first
    x = xp.asarray(rng.integers(0, 3, shape).astype(np.float64) if ties else rng.standard_normal(shape))
    y, cache = L.maxpool2d_forward(x, k, stride, ceil)
    y_fast, cache_fast = F.maxpool2d_forward(x, k, stride, ceil)
    assert y.shape == y_fast.shape == (n, L.pool_output_size(h, k, stride, ceil), L.pool_output_size(w, k, stride, ceil), c)
    np.testing.assert_array_equal(asnumpy(y), asnumpy(y_fast))

    gy = randn(xp, rng, *y.shape)
    gx, gx_fast = L.maxpool2d_backward(gy, cache), F.maxpool2d_backward(gy, cache_fast)
    assert gx.shape == gx_fast.shape == shape
    np.testing.assert_array_equal(asnumpy(gx), asnumpy(gx_fast))


def test_maxpool_ties_are_resolved_beside_a_nan_window(xp):
    """A window whose maximum is NaN has no winner; a tied window beside it still sends its gradient to
    its first maximum only (counting winners against all windows would miss the tie)."""
    x = np.array([[1.0, 1.0, np.nan, 0.0],
                  [0.0, 0.0, 0.0, 0.0]], np.float32).reshape(1, 2, 4, 1)
    y, cache = F.maxpool2d_forward(xp.asarray(x), 2, 2)
    gx = asnumpy(F.maxpool2d_backward(xp.asarray(np.array([[[[3.0], [5.0]]]], np.float32)), cache))
    assert np.isnan(asnumpy(y)[0, 0, 1, 0])
    np.testing.assert_array_equal(gx.reshape(2, 4), [[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


def test_both_reject_bad_shapes(xp):
    W, b = xp.zeros((2, 3, 3, 2)), xp.zeros(2)
    for module in (L, F):
        for x, groups in [(xp.zeros((1, 5, 5, 3)), 1), (xp.zeros((1, 5, 5, 2)), 2), (xp.zeros((1, 5, 5, 6)), 3),
                          (xp.zeros((1, 2, 5, 2)), 1)]:  # channels, F not divisible by groups, kernel too large
            with pytest.raises(ValueError):
                module.conv2d_forward(x, W, b, groups=groups)
        for ceil in (False, True):
            with pytest.raises(ValueError):
                module.maxpool2d_forward(xp.zeros((1, 2, 5, 1)), 3, 1, ceil)
