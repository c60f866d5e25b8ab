"""The layers AlexNet and VGG-16 add: local response normalisation, grouped convolution,
max-pooling with Caffe's rounding up (ceil), and the fast convolution run in chunks of images.

Float64 finite differences as in test_layers.py (loss ``L = sum(y * R)``, so ``gy = R``), plus
direct loop references. Every test runs once per array module (``xp`` fixture).
"""
import itertools

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from sparsenet import fast_layers as F
from sparsenet import layers as L
from sparsenet.backend import asnumpy

from gradcheck import assert_grad, assert_stack_gradients, distinct_values, numerical_grad, randn, random_mask

SEEDS = st.integers(0, 2**32 - 1)
TOL = dict(rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- LRN
def loop_lrn(x, size, alpha, beta, k):
    """Caffe's formula, one channel at a time."""
    C, h = x.shape[-1], size // 2
    y = np.empty_like(x)
    for c in range(C):
        s = k + alpha / size * (x[..., max(0, c - h):c + h + 1] ** 2).sum(axis=-1)
        y[..., c] = x[..., c] * s ** -beta
    return y


@pytest.mark.parametrize("shape,size,alpha,beta,k", [
    ((2, 3, 3, 8), 5, 1e-4, 0.75, 1.0),   # AlexNet's settings
    ((2, 3, 3, 8), 5, 2.0, 0.75, 1.0),    # large alpha: the window matters
    ((4, 3), 3, 0.5, 0.5, 2.0),           # (N, C)
    ((1, 2, 2, 2), 7, 1.0, 1.0, 0.5),     # window wider than the channels
    ((3, 1), 1, 0.3, 0.75, 1.0),          # size 1: each channel by itself
])
def test_lrn_matches_channel_loop(xp, shape, size, alpha, beta, k):
    x = np.random.default_rng(size).standard_normal(shape) * 3
    y, _ = L.lrn_forward(xp.asarray(x), size, alpha, beta, k)
    np.testing.assert_allclose(asnumpy(y), loop_lrn(x, size, alpha, beta, k), **TOL)


@given(shape=st.lists(st.integers(1, 3), min_size=1, max_size=3), c=st.integers(1, 7), size=st.sampled_from([1, 3, 5]),
       alpha=st.floats(1e-4, 2.0), beta=st.floats(0.5, 1.0), k=st.floats(0.5, 2.0), seed=SEEDS)
def test_lrn_gradients(xp, shape, c, size, alpha, beta, k, seed):
    rng = np.random.default_rng(seed)
    x = randn(xp, rng, *shape, c)
    R = randn(xp, rng, *shape, c)
    _, cache = L.lrn_forward(x, size, alpha, beta, k)
    gx = L.lrn_backward(R, cache)
    assert_grad(gx, numerical_grad(lambda: xp.sum(L.lrn_forward(x, size, alpha, beta, k)[0] * R), x))


def test_lrn_class_round_trip(xp):
    layer = L.LRN("norm1", size=3, alpha=0.5, beta=0.75, k=2)
    spec = layer.spec()
    assert spec == {"kind": "lrn", "name": "norm1", "size": 3, "alpha": 0.5, "beta": 0.75, "k": 2.0}
    again = L.LRN(**{key: v for key, v in spec.items() if key != "kind"})
    assert again.spec() == spec and again.settings(True) == (3, 0.5, 0.75, 2.0)
    rng = np.random.default_rng(0)
    x, R = randn(xp, rng, 2, 3, 3, 4), randn(xp, rng, 2, 3, 3, 4)
    y = again.forward(x, train=True)
    assert again.output_shape((3, 3, 4)) == (3, 3, 4)
    np.testing.assert_array_equal(asnumpy(y), asnumpy(L.lrn_forward(x, 3, 0.5, 0.75, 2.0)[0]))
    assert_grad(again.backward(R), numerical_grad(lambda: xp.sum(again.forward(x) * R), x))
    for size in (0, 2, 4):
        with pytest.raises(ValueError, match="odd"):
            L.LRN("n", size=size)
        with pytest.raises(ValueError, match="odd"):
            L.lrn_forward(x, size)


# ----------------------------------------------------------------------------- grouped conv
group_shapes = dict(groups=st.sampled_from([2, 3]), cg=st.integers(1, 2), fg=st.integers(1, 2), n=st.integers(1, 2),
                    h=st.integers(1, 5), w=st.integers(1, 5), k=st.integers(1, 3), stride=st.integers(1, 2),
                    pad=st.integers(0, 1), seed=SEEDS)


def draw_grouped(xp, groups, cg, fg, n, h, w, k, stride, pad, seed):
    assume(h + 2 * pad >= k and w + 2 * pad >= k)
    rng = np.random.default_rng(seed)
    x, W, b = randn(xp, rng, n, h, w, groups * cg), randn(xp, rng, groups * fg, k, k, cg), randn(xp, rng, groups * fg)
    return rng, x, W, b


@given(**group_shapes)
def test_grouped_conv2d_gradients(xp, groups, cg, fg, n, h, w, k, stride, pad, seed):
    rng, x, W, b = draw_grouped(xp, groups, cg, fg, n, h, w, k, stride, pad, seed)
    M = random_mask(xp, rng, W.shape)
    y, cache = L.conv2d_forward(x, W, b, stride, pad, groups)
    R = randn(xp, rng, *y.shape)
    gx, gW, gb = L.conv2d_backward(R, cache)
    _, gW_masked, _ = L.conv2d_backward(R, cache, M)

    def fn():
        return xp.sum(L.conv2d_forward(x, W, b, stride, pad, groups)[0] * R)

    num_gW = numerical_grad(fn, W)
    assert_grad(gx, numerical_grad(fn, x))
    assert_grad(gW, num_gW)
    assert_grad(gW_masked, num_gW * asnumpy(M))
    assert_grad(gb, numerical_grad(fn, b))


@given(**group_shapes)
def test_grouped_conv2d_is_separate_convs_and_block_diagonal(xp, groups, cg, fg, n, h, w, k, stride, pad, seed):
    """y equals each group convolved on its own, and one ungrouped conv whose weights are zero
    outside the diagonal (filter group, channel group) blocks; so do gx and gW on the blocks."""
    rng, x, W, b = draw_grouped(xp, groups, cg, fg, n, h, w, k, stride, pad, seed)
    y, cache = L.conv2d_forward(x, W, b, stride, pad, groups)
    separate = [L.conv2d_forward(x[..., g * cg:(g + 1) * cg], W[g * fg:(g + 1) * fg], b[g * fg:(g + 1) * fg],
                                 stride, pad)[0] for g in range(groups)]
    np.testing.assert_allclose(asnumpy(y), np.concatenate([asnumpy(s) for s in separate], axis=3), **TOL)

    W_full = xp.zeros((groups * fg, k, k, groups * cg))
    for g in range(groups):
        W_full[g * fg:(g + 1) * fg, :, :, g * cg:(g + 1) * cg] = W[g * fg:(g + 1) * fg]
    y_full, cache_full = L.conv2d_forward(x, W_full, b, stride, pad)
    np.testing.assert_allclose(asnumpy(y), asnumpy(y_full), **TOL)
    R = randn(xp, rng, *y.shape)
    (gx, gW, gb), (gx_full, gW_full, gb_full) = L.conv2d_backward(R, cache), L.conv2d_backward(R, cache_full)
    np.testing.assert_allclose(asnumpy(gx), asnumpy(gx_full), **TOL)
    np.testing.assert_allclose(asnumpy(gb), asnumpy(gb_full), **TOL)
    for g in range(groups):
        np.testing.assert_allclose(asnumpy(gW[g * fg:(g + 1) * fg]),
                                   asnumpy(gW_full[g * fg:(g + 1) * fg, :, :, g * cg:(g + 1) * cg]), **TOL)


def test_grouped_conv2d_class():
    conv = L.Conv2d("conv2", 4, 6, 3, stride=1, pad=1, groups=2)
    assert conv.params["W"].data.shape == (6, 3, 3, 2)
    assert conv.spec() == {"kind": "conv2d", "name": "conv2", "c_in": 4, "c_out": 6, "k": 3, "stride": 1, "pad": 1,
                           "groups": 2}
    assert "groups" not in L.Conv2d("conv1", 4, 6, 3).spec()
    assert conv.output_shape((5, 7, 4)) == (5, 7, 6)
    assert conv.macs((5, 7, 4)) == 5 * 7 * 6 * 3 * 3 * 4 // 2
    with pytest.raises(ValueError):
        L.Conv2d("bad", 4, 5, 3, groups=2)


# ----------------------------------------------------------------------------- chunked fast conv
@pytest.mark.parametrize("c,groups,stride,pad", [(1, 1, 1, 1), (3, 1, 2, 0), (4, 2, 1, 1)])
@pytest.mark.parametrize("images", [1, 2])  # per chunk; 2 leaves a last chunk of 1
def test_chunked_conv2d(xp, monkeypatch, c, groups, stride, pad, images):
    rng = np.random.default_rng(images * 10 + c)
    x, W, b = randn(xp, rng, 3, 5, 6, c), randn(xp, rng, 4, 3, 3, c // groups), randn(xp, rng, 4)
    M = random_mask(xp, rng, W.shape)
    W *= M
    y, cache = F.conv2d_forward(x, W, b, stride, pad, groups)
    R = randn(xp, rng, *y.shape)
    grads = F.conv2d_backward(R, cache, M)
    Ho, Wo = y.shape[1:3]
    monkeypatch.setattr(F, "WORKSPACE", images * Ho * Wo * 9 * c * 8)
    y_chunked, cache_chunked = F.conv2d_forward(x, W, b, stride, pad, groups)
    assert cache_chunked[1] is None  # x cached, not the im2col matrix
    np.testing.assert_allclose(asnumpy(y_chunked), asnumpy(y), **TOL)
    gx, gW, gb = F.conv2d_backward(R, cache_chunked, M)
    for a, ref in zip((gx, gW, gb), grads):
        np.testing.assert_allclose(asnumpy(a), asnumpy(ref), **TOL)

    def fn():
        return xp.sum(F.conv2d_forward(x, W, b, stride, pad, groups)[0] * R)

    assert_grad(gx, numerical_grad(fn, x))
    assert_grad(gW, numerical_grad(fn, W) * asnumpy(M))
    assert_grad(gb, numerical_grad(fn, b))


# ----------------------------------------------------------------------------- ceil max-pool
@pytest.mark.parametrize("size,k,stride,floor,ceil", [
    (55, 3, 2, 27, 27), (54, 3, 2, 26, 27), (27, 3, 2, 13, 13), (13, 3, 2, 6, 6),  # AlexNet
    (224, 2, 2, 112, 112), (7, 2, 2, 3, 4), (3, 3, 2, 1, 1),
    (5, 1, 3, 2, 2),  # a third window would start past the input: dropped, as Caffe does with padding
])
def test_pool_output_size(size, k, stride, floor, ceil):
    assert L.pool_output_size(size, k, stride) == L.conv_output_size(size, k, stride, 0) == floor
    assert L.pool_output_size(size, k, stride, ceil=True) == ceil
    pool = L.MaxPool2d("pool", k, stride, ceil=True)
    assert pool.output_shape((size, size + 1, 2))[::2] == (ceil, 2)
    assert pool.spec() == {"kind": "maxpool2d", "name": "pool", "k": k, "stride": stride, "ceil": True}
    assert "ceil" not in L.MaxPool2d("pool", k, stride).spec()


def clipped_maxpool(x, k, stride, Ho, Wo, gy):
    """y by loops over the windows clipped to the input, and gx: gy to each window's first maximum."""
    N, H, W, C = x.shape
    y, gx = np.zeros((N, Ho, Wo, C)), np.zeros(x.shape)
    for n, p, q, c in itertools.product(range(N), range(Ho), range(Wo), range(C)):
        win = x[n, stride * p:min(stride * p + k, H), stride * q:min(stride * q + k, W), c]
        a = int(np.argmax(win))
        y[n, p, q, c] = win.max()
        gx[n, stride * p + a // win.shape[1], stride * q + a % win.shape[1], c] += gy[n, p, q, c]
    return y, gx


@given(n=st.integers(1, 2), h=st.integers(1, 8), w=st.integers(1, 8), c=st.integers(1, 2), k=st.integers(1, 3),
       stride=st.integers(1, 3), seed=SEEDS)
def test_ceil_maxpool(xp, n, h, w, c, k, stride, seed):
    assume(h >= k and w >= k)
    rng = np.random.default_rng(seed)
    x_host = distinct_values(rng, (n, h, w, c))
    Ho, Wo = L.pool_output_size(h, k, stride, True), L.pool_output_size(w, k, stride, True)
    R_host = rng.standard_normal((n, Ho, Wo, c))
    ref_y, ref_gx = clipped_maxpool(x_host, k, stride, Ho, Wo, R_host)
    x, R = xp.asarray(x_host), xp.asarray(R_host)
    for module in (L, F):
        y, cache = module.maxpool2d_forward(x, k, stride, ceil=True)
        np.testing.assert_array_equal(asnumpy(y), ref_y)
        gx = module.maxpool2d_backward(R, cache)
        np.testing.assert_allclose(asnumpy(gx), ref_gx, **TOL)  # overlapping windows: any summation order
    assert_grad(gx, numerical_grad(lambda: xp.sum(F.maxpool2d_forward(x, k, stride, True)[0] * R), x))


# ----------------------------------------------------------------------------- classes together
def test_alexnet_like_classes_gradients(xp, monkeypatch):
    """Grouped convs, LRN and ceil pools as layer classes (fast kernels, convs chunked),
    float64, pruned: every parameter gradient and the input gradient against finite differences."""
    monkeypatch.setattr(F, "WORKSPACE", 1)  # one image per chunk
    rng = np.random.default_rng(0)
    net = [
        L.Conv2d("conv1", 4, 4, 3, pad=1, groups=2, rng=rng, xp=xp), L.ReLU("relu1"),
        L.LRN("norm1", size=3, alpha=0.5, beta=0.75, k=2.0), L.MaxPool2d("pool1", 3, 2, ceil=True),  # 6 -> 3
        L.Conv2d("conv2", 4, 6, 2, groups=2, rng=rng, xp=xp), L.MaxPool2d("pool2", 2, 2, ceil=True),  # 3 -> 2 -> 1
        L.Flatten("flatten"), L.Linear("fc", 6, 3, rng=rng, xp=xp),
    ]
    assert_stack_gradients(xp, net, randn(xp, rng, 2, 6, 6, 4), randn(xp, rng, 2, 3), rng)
