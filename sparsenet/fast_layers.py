"""Speed-tuned kernels for the layers that dominate training time: linear, conv, max-pool.

Each function has the signature of its plain counterpart in :mod:`sparsenet.layers`,
where the equations and shapes are written out; read those first. The cache objects
differ between the two families: a backward here accepts the cache of the forward here.
The layer classes (:class:`sparsenet.layers.Linear`, ...) run these kernels, so they
fix the arithmetic of training: change them only if bit-identical results may change.

The kernels compute the same values (up to float rounding, from another summation
order) with other memory layouts:

* Linear outputs and input gradients are column-major (transposed views of a BLAS
  result); the array ops that follow take them as they are.
* The im2col of a single-channel image is offset-major (stored as Xᵀ).
* Parameters, their gradients and the optimiser state are always row-major, so the
  in-place updates never mix layouts.

Timings behind these choices: ``benchmarks/README.md``.
"""
import numpy

from . import cuda
from .backend import get_array_module
from .layers import conv_check, conv_output_size, pool_pad, softmax_cross_entropy_backward, \
    softmax_cross_entropy_forward

WORKSPACE = 1 << 28
"""Bytes: a convolution whose im2col matrix X for the whole batch would be larger runs in
chunks of images (VGG-16's conv1_2 at batch 32 would need 3.7 GB for X, as much again for
the backward's D). Tests set it small."""


# ----------------------------------------------------------------------------- linear
def linear_forward(x, W, b):
    """:func:`sparsenet.layers.linear_forward` computed as ``(W xᵀ)ᵀ``.

    The batch is the short side of BLAS's output; y is a transposed (column-major) view.
    """
    y = matmul(W, x.T).T
    y += b
    return y, (x, W)


def linear_backward(gy, cache, M=None, need_gx=True, need_gW=True):
    """:func:`sparsenet.layers.linear_backward` with gx computed as ``(Wᵀ gyᵀ)ᵀ``.

    gx comes out column-major like the forward activations, so the ReLU backward that
    follows combines two arrays of one layout; gW stays row-major like W, which the
    optimiser updates in place.
    """
    x, W = cache
    gW = gb = None
    if need_gW:
        gW = matmul(gy.T, x)
        if M is not None:
            gW *= M
        gb = gy.sum(axis=0)
    gx = matmul(W.T, gy.T).T if need_gx else None
    return gx, gW, gb


# ----------------------------------------------------------------------------- conv
def _window(a, i, j, n_h, n_w, stride):
    """The view a[:, i + stride*p, j + stride*q, :] for p < n_h, q < n_w."""
    return a[:, i:i + stride * (n_h - 1) + 1:stride, j:j + stride * (n_w - 1) + 1:stride, :]


def im2col(x, kh, kw, stride, pad):
    """:func:`sparsenet.layers.im2col` (same values and shape) in a layout per channel count.

    ``cols.reshape(N·Ho·Wo, kh·kw·C)`` is the GEMM operand X and a view (no copy) for
    either layout:

    * C > 1 (on the GPU, any C): row-major (N, Ho, Wo, kh, kw, C), one copy of a strided
      ``sliding_window_view`` (runs of C contiguous values);
    * C = 1 on the CPU: offset-major, a (kh, kw, N, Ho, Wo) buffer returned transposed, i.e.
      X is stored as Xᵀ (K, M): each of the k² kernel offsets is one copy of a shifted window
      of whole image rows (a row-major copy would move runs of one value). BLAS takes
      the transposed X at no cost. (On the GPU the row-major copy is one launch, not k².)
    """
    xp = get_array_module(x)
    if pad:
        x = xp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    N, H, W, C = x.shape
    if C == 1 and xp is numpy:  # the GPU copies the row-major layout in one launch rather than k²
        Ho, Wo = conv_output_size(H, kh, stride, 0), conv_output_size(W, kw, stride, 0)
        cols = xp.empty((kh, kw, N, Ho, Wo, C), dtype=x.dtype)
        for i in range(kh):
            for j in range(kw):
                cols[i, j] = _window(x, i, j, Ho, Wo, stride)
        return cols.transpose(2, 3, 4, 0, 1, 5)
    view = xp.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))  # N,H',W',C,kh,kw
    view = view[:, ::stride, ::stride].transpose(0, 1, 2, 4, 5, 3)
    return xp.ascontiguousarray(view)


def add_bias(y, b, run):
    """``y += b`` over the rows of ``y`` (M, F), row-major, in place, with ``run`` a divisor of M.

    The same additions as ``y += b``, but over (M/run, run·F) against ``b`` tiled run times: NumPy's
    broadcast runs an inner loop per row, which for a conv's F = 20 output channels costs 4× the add.
    """
    xp = get_array_module(y)
    M, F = y.shape
    if xp is not numpy or run <= 1 or M % run or not y.flags.c_contiguous:
        y += b
    else:
        y.reshape(M // run, run * F)[...] += xp.tile(b, run)


def matmul(a, b):
    """``a @ b`` of two matrices: NumPy's on the CPU, one cuBLAS call on the GPU (:func:`sparsenet.cuda.matmul`,
    which a CUDA graph can record)."""
    return numpy.matmul(a, b) if get_array_module(a) is numpy else cuda.matmul(a, b)


def sum_rows(G):
    """Σ over the rows of a matrix, as the matrix–vector product ``1ᵀ G`` (one BLAS call).

    For the tall, narrow gradient of a convolution (N·Ho·Wo rows, F columns) a GEMV beats
    ``G.sum(axis=0)``, which NumPy runs as a strided reduction. On the GPU it is CuPy's reduction.
    """
    xp = get_array_module(G)
    return xp.ones(G.shape[0], dtype=G.dtype) @ G if xp is numpy else G.sum(axis=0)


def _operands(x, W, stride, pad, groups, n):
    """Yield ``(r, g, X)`` over chunks of n images and over groups: X is the GEMM operand
    (:func:`im2col`, either layout) of images r:r+n and group g's C/G input channels."""
    _, kh, kw, Cg = W.shape
    for r in range(0, x.shape[0], n):
        for g in range(groups):
            yield r, g, im2col(x[r:r + n, :, :, g * Cg:(g + 1) * Cg], kh, kw, stride, pad).reshape(-1, kh * kw * Cg)


def conv2d_forward(x, W, b, stride=1, pad=0, groups=1):
    """:func:`sparsenet.layers.conv2d_forward` on the :func:`im2col` layouts above.

    While the batch's X fits in :data:`WORKSPACE` bytes the cache keeps X (one per group) in
    whichever layout im2col chose; without groups this is one GEMM, ``y = X W₂ᵀ + b``.
    Beyond it the batch runs in chunks of n = ⌊WORKSPACE / (bytes of X per image)⌋ images
    (at least 1): per chunk and group, im2col and one GEMM into that block of a preallocated
    y; the cache keeps x and the backward builds each chunk's X again.
    """
    conv_check(x, W, pad, groups)
    F, kh, kw, Cg = W.shape
    N, H, W_, C = x.shape
    Ho, Wo, Fg = conv_output_size(H, kh, stride, pad), conv_output_size(W_, kw, stride, pad), F // groups
    n = max(1, WORKSPACE // (Ho * Wo * kh * kw * C * x.itemsize))  # images per chunk
    if groups == 1 and n >= N:
        X = im2col(x, kh, kw, stride, pad).reshape(N * Ho * Wo, kh * kw * C)
        y = matmul(X, W.reshape(F, -1).T)
        add_bias(y, b, Wo)
        return y.reshape(N, Ho, Wo, F), (x, [X], W, stride, pad, groups, n)
    y, Xs = get_array_module(x).empty((N, Ho, Wo, F), dtype=x.dtype), ([] if n >= N else None)
    for r, g, X in _operands(x, W, stride, pad, groups, n):
        y[r:r + n, :, :, g * Fg:(g + 1) * Fg] = matmul(X, W[g * Fg:(g + 1) * Fg].reshape(Fg, -1).T).reshape(-1, Ho, Wo, Fg)
        if Xs is not None:
            Xs.append(X)
        del X  # before the next chunk's im2col
    add_bias(y.reshape(-1, F), b, Wo)
    return y, (x, Xs, W, stride, pad, groups, n)


def conv2d_backward(gy, cache, M=None, need_gx=True, need_gW=True):
    """:func:`sparsenet.layers.conv2d_backward` with col2im fused into the GEMM, per chunk of
    images and group (one piece without groups below :data:`WORKSPACE`), X the piece's
    operand (cached, or built again) and G its gradient rows (·, F/G):

    * gW: ``(Xᵀ G)ᵀ`` when X is stored transposed (C = 1), so that BLAS reads both
      operands as stored (``Gᵀ X`` would multiply two transposed operands, BLAS's slow
      case); otherwise ``Gᵀ X``; summed over chunks into the row-major gW, like W.
    * gb: :func:`sum_rows` of the whole gy.
    * gx: one batched product ``D[i, j] = G · W[:, i, j, :]`` gives a row-major
      (·, C/G) block per kernel offset, each added onto a shifted window of the
      (padded) input gradient: k² adds of whole contiguous blocks, no scatter.
    """
    x, Xs, W, stride, pad, groups, n = cache
    xp = get_array_module(gy)
    F, kh, kw, Cg = W.shape
    N, H, W_, C = x.shape
    Ho, Wo, Fg = gy.shape[1], gy.shape[2], F // groups
    gW = xp.zeros(W.shape, dtype=gy.dtype) if need_gW else None
    gx = xp.zeros((N, H + 2 * pad, W_ + 2 * pad, C), dtype=gy.dtype) if need_gx else None
    pieces = _operands(x, W, stride, pad, groups, n) if Xs is None else ((0, g, X) for g, X in enumerate(Xs))
    for r, g, X in pieces:
        f = slice(g * Fg, (g + 1) * Fg)
        G = gy[r:r + n, :, :, f].reshape(-1, Fg)
        if need_gW:
            gW[f] += (matmul(X.T, G).T if X.flags.f_contiguous else matmul(G.T, X)).reshape(Fg, kh, kw, Cg)
        if need_gx:
            gx_piece = gx[r:r + n, :, :, g * Cg:(g + 1) * Cg]
            if xp is numpy:
                D = G @ W[f].transpose(1, 2, 0, 3)  # (kh, kw, F/G, C/G) weights -> (kh, kw, rows, C/G)
                blocks = [D[i, j].reshape(-1, Ho, Wo, Cg) for i in range(kh) for j in range(kw)]
            else:  # one GEMM; the GPU adds strided blocks as fast as contiguous ones
                D = matmul(G, W[f].reshape(Fg, -1)).reshape(-1, Ho, Wo, kh, kw, Cg)
                blocks = [D[:, :, :, i, j] for i in range(kh) for j in range(kw)]
            for o, block in enumerate(blocks):
                _window(gx_piece, o // kw, o % kw, Ho, Wo, stride)[...] += block
            del D, blocks
        del X  # before the next chunk's im2col
    gb = None
    if need_gW:
        if M is not None:
            gW *= M
        gb = sum_rows(gy.reshape(-1, F))
    if need_gx and pad:
        gx = gx[:, pad:pad + H, pad:pad + W_, :]
    return gx, gW, gb


# ----------------------------------------------------------------------------- pooling
def maxpool2d_forward(x, k, stride, ceil=False):
    """:func:`sparsenet.layers.maxpool2d_forward` as a running maximum over strided slabs.

    ``y = max_o x[:, i_o::s, j_o::s, :]`` over the kernel offsets, one vectorised op each
    (no im2col copy), on x padded with −inf for ``ceil`` (:func:`sparsenet.layers.pool_pad`).
    When the windows tile the input (k = stride) the rows of a window are reduced first, over
    whole image rows (W·C contiguous values per op, rather than runs of C), then its columns.
    No argmax is kept: the cache holds x and y, and the backward pass finds the winners
    again by comparison, which is free at inference.
    """
    xp = get_array_module(x)
    shape = x.shape
    x, Ho, Wo = pool_pad(x, k, stride, ceil)
    if k == stride:
        N, C = x.shape[0], x.shape[3]
        rows = x[:, :Ho * k, :Wo * k].reshape(N, Ho, k, Wo * k * C)
        m = rows[:, :, 0].copy()
        for i in range(1, k):
            xp.maximum(m, rows[:, :, i], out=m)
        m = m.reshape(N, Ho, Wo, k, C)
        y = m[:, :, :, 0].copy()
        for j in range(1, k):
            xp.maximum(y, m[:, :, :, j], out=y)
        return y, (x, y, k, stride, shape)
    y = _window(x, 0, 0, Ho, Wo, stride).copy()
    for o in range(1, k * k):
        xp.maximum(y, _window(x, o // k, o % k, Ho, Wo, stride), out=y)
    return y, (x, y, k, stride, shape)


def _keep_first(hits):
    """Clear every True of ``hits[o]`` that an earlier ``hits[o' < o]`` already has (in place).

    Afterwards each position is True in at most one of the arrays: ties go to the first.
    """
    taken = hits[0].copy()
    for h in hits[1:]:
        h &= ~taken
        taken |= h


def maxpool2d_backward(gy, cache):
    """:func:`sparsenet.layers.maxpool2d_backward`: winners found by comparing x with y.

    When the windows tile the input (k = stride), ``x`` viewed as (N, Ho, k, Wo·k·C) is
    compared with ``y`` repeated along each image row in one broadcast, and ``gx`` is one
    broadcast product; the offset-by-offset tie resolution (first offset in row-major order
    wins) runs only if some window has two maxima (more winners than windows whose maximum
    is a number: a NaN window has no winner). Otherwise the k² offsets are
    handled one slab at a time. A ceil-padded x's gradient is cropped back to the input.
    """
    x, y, k, stride, shape = cache
    xp = get_array_module(gy)
    N, Ho, Wo, C = gy.shape
    if xp is not numpy and x.dtype == numpy.float32:  # the GPU: one kernel, no wait for the device (a graph records it)
        gx = cuda.maxpool_backward(x, y, gy, k, stride)
    elif k == stride:
        # (N, Ho, k, Wo·k·C): a window row per middle index, y and gy repeated k times along each row,
        # so every op runs over whole image rows (W·C values) rather than runs of C
        xt = x[:, :Ho * k, :Wo * k].reshape(N, Ho, k, Wo * k * C)
        def spread(a):
            return xp.repeat(a, k, axis=2).reshape(N, Ho, 1, Wo * k * C)
        w = xt == spread(y)
        # some window has two maxima: more winners than windows with a maximum (a NaN window has none)
        if int(xp.count_nonzero(w)) > y.size - int(xp.count_nonzero(xp.isnan(y))):
            w6 = w.reshape(N, Ho, k, Wo, k, C)
            _keep_first([w6[:, :, o // k, :, o % k] for o in range(k * k)])
        tiles = (w * spread(gy)).reshape(N, Ho * k, Wo * k, C)
        if tiles.shape == x.shape:
            gx = tiles
        else:
            gx = xp.zeros(x.shape, dtype=gy.dtype)
            gx[:, :Ho * k, :Wo * k] = tiles
    else:
        w = [_window(x, o // k, o % k, Ho, Wo, stride) == y for o in range(k * k)]
        _keep_first(w)
        gx = xp.zeros(x.shape, dtype=gy.dtype)
        for o in range(k * k):
            _window(gx, o // k, o % k, Ho, Wo, stride)[...] += gy * w[o]
    return gx if gx.shape == shape else gx[:, :shape[1], :shape[2]]


# ----------------------------------------------------------------------------- activations and loss
def relu_backward(gy, cache):
    """:func:`sparsenet.layers.relu_backward`; on the GPU one fused kernel (:func:`sparsenet.cuda.relu_backward`)."""
    return gy * (cache > 0) if get_array_module(gy) is numpy else cuda.relu_backward(gy, cache)


def softmax_cross_entropy(z, t):
    """``(loss, gz)``: :func:`sparsenet.layers.softmax_cross_entropy_forward` and its backward for dL/dloss = 1;
    on the GPU one kernel and one mean (:func:`sparsenet.cuda.softmax_cross_entropy`)."""
    if get_array_module(z) is not numpy and z.dtype == numpy.float32:
        return cuda.softmax_cross_entropy(z, t)
    loss, cache = softmax_cross_entropy_forward(z, t)
    return loss, softmax_cross_entropy_backward(1.0, cache)
