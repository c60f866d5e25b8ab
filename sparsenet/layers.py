"""Layers with hand-derived backpropagation.

Each operation is a pair of pure functions in the CS231n style::

    y, cache = op_forward(x, ...)
    gx, ... = op_backward(gy, cache)

wrapped by a thin class that owns the parameters (:class:`Param`: value, gradient and
pruning mask) and keeps the cache between ``forward`` and ``backward``. Gradients are
named as in Chainer: ``gy`` is dL/dy, ``gx`` dL/dx, ``gW`` dL/dW, ``gb`` dL/db.

Conventions
-----------
* Images are channel-last, ``(N, H, W, C)`` (NHWC): a convolution is then one GEMM whose
  output is already NHWC, with no transpose. Convolution weights are ``(F, kh, kw, C)``.
* Linear weights are ``(out, in)`` and ``y = x Wᵀ + b``.
* Every parameter has a mask ``M`` of its own shape (1 keeps, 0 pruned). The network
  computes with ``W ⊙ M``. Pruning (``sparsenet.pruning``) and the optimiser keep the
  invariant ``W == W ⊙ M`` (pruned weights are exactly 0), so the forward pass reads
  ``W`` directly and needs no masked copy; the backward pass masks the weight gradient,
  ``gW ← gW ⊙ M``, so nothing flows into a pruned position.
* Shapes above are logical. Where a memory layout other than row-major is faster it is
  chosen inside the function and said in its docstring: Linear outputs and input
  gradients are column-major (transposed views of a BLAS result), the im2col of a
  single-channel image is offset-major. Parameters, their gradients and the optimiser
  state are always row-major, so the in-place updates never mix layouts.
* Training runs in float32 end to end (data, activations, gradients, masks, state).
* Code here never imports CuPy: the array module comes from the arrays
  (:func:`sparsenet.backend.get_array_module`).
"""
import math

import numpy

from .backend import get_array_module
from .param import Param


# ----------------------------------------------------------------------------- linear
def linear_forward(x, W, b):
    """Fully connected layer.

    Shapes: x (N, D_in), W (D_out, D_in), b (D_out,) -> y (N, D_out).

    Forward:  ``y = x Wᵀ + b``   (with pruning, W stands for W ⊙ M).

    The product is computed as ``(W xᵀ)ᵀ``: the same product up to float32 rounding (BLAS
    sums in another order), but with the batch as the short side of BLAS's output it runs
    20–40% faster (OpenBLAS, batch 64, 1 or 2 threads). y is then a transposed
    (column-major) view, which the array ops that follow take as it is.
    """
    y = (W @ x.T).T
    y += b
    return y, (x, W)


def linear_backward(gy, cache, M=None, need_gx=True, need_gW=True):
    """Backward of :func:`linear_forward`.

    Backward::

        gx = gy W                 (N, D_in)   -- skipped when need_gx is False
        gW = (gyᵀ x) ⊙ M          (D_out, D_in)
        gb = Σ_n gy[n]            (D_out,)    -- both skipped when need_gW is False (frozen)

    Returns ``(gx, gW, gb)``; a skipped gradient is None. As in the forward pass, gx is
    computed as ``(Wᵀ gyᵀ)ᵀ`` (10–60% faster with 2 OpenBLAS threads at batch 64, 5%
    slower with 1) and comes out in the same column-major layout as the forward
    activations, so the ReLU backward that follows combines two arrays of one layout.
    gW stays row-major like W, which the optimiser updates in place.
    """
    x, W = cache
    gW = gb = None
    if need_gW:
        gW = gy.T @ x
        if M is not None:
            gW *= M
        gb = gy.sum(axis=0)
    gx = (W.T @ gy.T).T if need_gx else None
    return gx, gW, gb


# ----------------------------------------------------------------------------- conv
def _window(a, i, j, n_h, n_w, stride):
    """The view a[:, i + stride*p, j + stride*q, :] for p < n_h, q < n_w."""
    return a[:, i:i + stride * (n_h - 1) + 1:stride, j:j + stride * (n_w - 1) + 1:stride, :]


def conv_output_size(size, k, stride, pad):
    """Output length of a convolution/pooling window sweep: ⌊(size + 2·pad − k)/stride⌋ + 1."""
    return (size + 2 * pad - k) // stride + 1


def im2col(x, kh, kw, stride, pad):
    """Unfold the receptive fields of an NHWC batch.

    x (N, H, W, C) -> cols (N, Ho, Wo, kh, kw, C) with
    ``cols[n, p, q, i, j, c] = x_pad[n, stride·p + i, stride·q + j, c]``.

    ``cols.reshape(N·Ho·Wo, kh·kw·C)`` is the GEMM operand X of the convolution and is a
    view (no copy) for either of the two memory layouts used:

    * C > 1: row-major (N, Ho, Wo, kh, kw, C), written by one copy of a strided
      ``sliding_window_view`` (runs of C contiguous values);
    * C = 1: offset-major, a (kh, kw, N, Ho, Wo) buffer returned transposed, i.e. X is
      stored as Xᵀ (K, M). Each of the k² kernel offsets is then one copy of a shifted
      window of whole image rows; the row-major copy would move runs of a single value
      and is ~3× slower. BLAS takes the transposed X at no cost.

    No Python loop over images or positions.
    """
    xp = get_array_module(x)
    if pad:
        x = xp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    N, H, W, C = x.shape
    if C == 1:
        Ho, Wo = conv_output_size(H, kh, stride, 0), conv_output_size(W, kw, stride, 0)
        cols = xp.empty((kh, kw, N, Ho, Wo, C), dtype=x.dtype)
        for i in range(kh):
            for j in range(kw):
                cols[i, j] = _window(x, i, j, Ho, Wo, stride)
        return cols.transpose(2, 3, 4, 0, 1, 5)
    view = xp.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))  # N,H',W',C,kh,kw
    view = view[:, ::stride, ::stride].transpose(0, 1, 2, 4, 5, 3)
    return xp.ascontiguousarray(view)


def _sum_rows(G):
    """Σ over the rows of a matrix, as the matrix–vector product ``1ᵀ G`` (one BLAS call).

    For the tall, narrow gradient of a convolution (N·Ho·Wo rows, F columns) this is
    ~15× faster than ``G.sum(axis=0)``, which NumPy runs as a strided reduction.
    """
    xp = get_array_module(G)
    return xp.ones(G.shape[0], dtype=G.dtype) @ G


def conv2d_forward(x, W, b, stride=1, pad=0):
    """2-D convolution (cross-correlation, as in Caffe), channel-last.

    Shapes: x (N, H, W, C), W (F, kh, kw, C), b (F,) -> y (N, Ho, Wo, F) with
    ``Ho = ⌊(H + 2·pad − kh)/stride⌋ + 1`` (likewise Wo).

    Forward, with ``X = im2col(x)`` reshaped to (N·Ho·Wo, K), K = kh·kw·C, and
    ``W₂ = W`` reshaped to (F, K)::

        y = X W₂ᵀ + b       i.e.  y[n,p,q,f] = Σ_{i,j,c} x_pad[n, s·p+i, s·q+j, c] W[f,i,j,c] + b[f]
    """
    F, kh, kw, C = W.shape
    if x.ndim != 4 or x.shape[3] != C:
        raise ValueError(f"conv2d expects (N, H, W, {C}) input, got {tuple(x.shape)}")
    cols = im2col(x, kh, kw, stride, pad)
    N, Ho, Wo = cols.shape[:3]
    X = cols.reshape(N * Ho * Wo, kh * kw * C)
    y = X @ W.reshape(F, -1).T
    y += b
    return y.reshape(N, Ho, Wo, F), (x.shape, X, W, stride, pad)


def conv2d_backward(gy, cache, M=None, need_gx=True, need_gW=True):
    """Backward of :func:`conv2d_forward`.

    With ``G = gy`` reshaped to (N·Ho·Wo, F)::

        gW = (Gᵀ X) ⊙ M                (F, K) -> (F, kh, kw, C)
        gb = Σ_rows G                  (F,)
        gx[n, s·p+i, s·q+j, c] += Σ_f G[n,p,q,f] · W[f,i,j,c]     for every kernel offset (i, j)

    The last line is the adjoint of im2col ("col2im") fused with the GEMM: one batched
    product ``D[i, j] = G · W[:, i, j, :]`` gives a row-major (N·Ho·Wo, C) block per
    kernel offset, and each block is added onto a shifted window of the (padded) input
    gradient (k² adds of whole contiguous blocks, no scatter). ``gx`` is skipped when
    ``need_gx`` is False, ``gW`` and ``gb`` when ``need_gW`` is False (a frozen layer).
    A skipped gradient is None.
    """
    x_shape, X, W, stride, pad = cache
    F, kh, kw, C = W.shape
    G = gy.reshape(-1, F)
    gW = gb = None
    if need_gW:
        # Gᵀ X. When im2col stored X transposed (C = 1), Gᵀ X would multiply two
        # transposed operands, BLAS's slow case; (Xᵀ G)ᵀ reads both as stored (~2× faster)
        # and its small (F, K) result is copied row-major, like W.
        gW = (X.T @ G).T.copy() if X.flags.f_contiguous else G.T @ X
        gW = gW.reshape(W.shape)
        if M is not None:
            gW *= M
        gb = _sum_rows(G)
    gx = None
    if need_gx:
        xp = get_array_module(gy)
        N, H, W_, _ = x_shape
        Ho, Wo = gy.shape[1:3]
        gx = xp.zeros((N, H + 2 * pad, W_ + 2 * pad, C), dtype=gy.dtype)
        D = G @ W.transpose(1, 2, 0, 3)  # (kh, kw, F, C) weights -> (kh, kw, N·Ho·Wo, C)
        for i in range(kh):
            for j in range(kw):
                _window(gx, i, j, Ho, Wo, stride)[...] += D[i, j].reshape(N, Ho, Wo, C)
        if pad:
            gx = gx[:, pad:pad + H, pad:pad + W_, :]
    return gx, gW, gb


# ----------------------------------------------------------------------------- pooling
def maxpool2d_forward(x, k, stride):
    """Max pooling over k×k windows with the given stride (overlapping when k > stride).

    Shapes: x (N, H, W, C) -> y (N, Ho, Wo, C), ``Ho = ⌊(H − k)/stride⌋ + 1``.

    Forward: ``y[n,p,q,c] = max_{i,j<k} x[n, s·p+i, s·q+j, c]``, a running maximum over
    the k² strided slabs ``x[:, i::s, j::s, :]`` (one vectorised op each). No argmax is
    kept: the cache holds x and y, and the backward pass finds the winners again by
    comparison, which is cheaper than tracking indices here and free at inference.
    """
    xp = get_array_module(x)
    N, H, W, C = x.shape
    Ho, Wo = conv_output_size(H, k, stride, 0), conv_output_size(W, k, stride, 0)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"max-pool window {k} larger than input {H}x{W}")
    y = _window(x, 0, 0, Ho, Wo, stride).copy()
    for o in range(1, k * k):
        xp.maximum(y, _window(x, o // k, o % k, Ho, Wo, stride), out=y)
    return y, (x, y, k, stride)


def _keep_first(hits):
    """Clear every True of ``hits[o]`` that an earlier ``hits[o' < o]`` already has (in place).

    Afterwards each position is True in at most one of the arrays: ties go to the first.
    """
    taken = hits[0].copy()
    for h in hits[1:]:
        h &= ~taken
        taken |= h


def maxpool2d_backward(gy, cache):
    """Backward of :func:`maxpool2d_forward`: each gy goes to the input that won its window.

    ``gx[n, s·p+i, s·q+j, c] += gy[n,p,q,c] · w[n,p,q,i,j,c]``, where ``w`` is 1 at the
    first offset ``(i, j)`` in row-major order with ``x[n, s·p+i, s·q+j, c] = y[n,p,q,c]``
    and 0 at the others (so on ties the gradient goes to one input only).

    When the windows tile the input (k = stride), ``x`` viewed as (N, Ho, k, Wo, k, C)
    is compared with ``y`` in one broadcast, and ``gx`` is one broadcast product; the
    offset-by-offset tie resolution runs only if some window has two maxima (more
    winners than windows). Otherwise the k² offsets are handled one slab at a time.
    """
    x, y, k, stride = cache
    xp = get_array_module(gy)
    N, Ho, Wo, C = gy.shape
    if k == stride:
        xt = x[:, :Ho * k, :Wo * k].reshape(N, Ho, k, Wo, k, C)
        w = xt == y[:, :, None, :, None, :]
        if int(xp.count_nonzero(w)) > y.size:
            _keep_first([w[:, :, o // k, :, o % k] for o in range(k * k)])
        tiles = (w * gy[:, :, None, :, None, :]).reshape(N, Ho * k, Wo * k, C)
        if tiles.shape == x.shape:
            return tiles
        gx = xp.zeros(x.shape, dtype=gy.dtype)
        gx[:, :Ho * k, :Wo * k] = tiles
        return gx
    w = [_window(x, o // k, o % k, Ho, Wo, stride) == y for o in range(k * k)]
    _keep_first(w)
    gx = xp.zeros(x.shape, dtype=gy.dtype)
    for o in range(k * k):
        _window(gx, o // k, o % k, Ho, Wo, stride)[...] += gy * w[o]
    return gx


# ----------------------------------------------------------------------------- activations
def relu_forward(x):
    """Rectifier. Forward: ``y = max(x, 0)``; any shape."""
    y = get_array_module(x).maximum(x, 0)
    return y, y


def relu_backward(gy, cache):
    """Backward: ``gx = gy · [y > 0]`` (the subgradient at 0 is taken as 0)."""
    return gy * (cache > 0)


def dropout_forward(x, rate, rng, train=True):
    """Inverted dropout.

    Forward (training): ``m ~ Bernoulli(1 − rate) / (1 − rate)``, ``y = x ⊙ m``;
    at test time (or rate 0) ``y = x``, so no rescaling is needed at inference.
    ``rng`` is a NumPy or CuPy ``Generator`` matching x's array module.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if not train or rate == 0.0:
        return x, None
    keep = rng.random(x.shape, dtype=numpy.float32) >= rate
    m = keep.astype(x.dtype)
    m *= 1.0 / (1.0 - rate)
    return x * m, m


def dropout_backward(gy, cache):
    """Backward: ``gx = gy ⊙ m`` (identity when the forward was the identity)."""
    return gy if cache is None else gy * cache


def softmax_cross_entropy_forward(z, t):
    """Mean softmax cross-entropy of logits against integer labels.

    Shapes: z (N, K), t (N,) integers in [0, K) -> scalar loss.

    Forward (stable: the row max is subtracted before exponentiating)::

        log p[n,k] = z[n,k] − max_j z[n,j] − log Σ_j exp(z[n,j] − max_j z[n,j])
        L = −(1/N) Σ_n log p[n, t_n]
    """
    xp = get_array_module(z)
    s = z - z.max(axis=1, keepdims=True)
    logp = s - xp.log(xp.exp(s).sum(axis=1, keepdims=True))
    n = z.shape[0]
    loss = -logp[xp.arange(n), t].mean()
    return loss, (logp, t)


def softmax_cross_entropy_backward(gloss, cache):
    """Backward: ``gz = gloss · (p − onehot(t)) / N``."""
    logp, t = cache
    xp = get_array_module(logp)
    gz = xp.exp(logp)
    n = gz.shape[0]
    gz[xp.arange(n), t] -= 1.0
    gz *= gloss / n
    return gz


# ----------------------------------------------------------------------------- classes
class Layer:
    """Base class: a named stage of a :class:`sparsenet.model.Network`.

    ``params`` maps short names ("W", "b") to :class:`Param`. ``need_gx`` is False for
    the first layer of a network, whose input gradient nobody reads. A ``frozen`` layer
    computes no parameter gradients (they stay None, so the optimiser leaves it alone):
    §3.4 retrains the FC layers with the conv layers fixed, and vice versa.
    """

    kind = ""
    params = {}

    def __init__(self, name):
        self.name = name
        self.need_gx = True
        self.frozen = False
        self.cache = None

    def spec(self):
        """JSON-able description from which :func:`sparsenet.model.layer_from_spec` rebuilds it."""
        return {"kind": self.kind, "name": self.name}

    def output_shape(self, input_shape):
        return input_shape


def _glorot_uniform(rng, shape, fan_in):
    """Caffe's "xavier" filler: U(−a, a) with a = sqrt(3 / fan_in)."""
    a = math.sqrt(3.0 / fan_in)
    return rng.uniform(-a, a, size=shape).astype(numpy.float32)


class Linear(Layer):
    """Fully connected layer owning ``W`` (out, in) and ``b`` (out,). See :func:`linear_forward`."""

    kind = "linear"

    def __init__(self, name, n_in, n_out, rng=None, xp=numpy):
        super().__init__(name)
        rng = rng if rng is not None else numpy.random.default_rng(0)
        W = _glorot_uniform(rng, (n_out, n_in), n_in)
        b = numpy.zeros(n_out, dtype=numpy.float32)
        self.params = {"W": Param(xp.asarray(W)), "b": Param(xp.asarray(b), prunable=False, lr_mult=2.0)}

    @property
    def n_in(self):
        return self.params["W"].data.shape[1]

    @property
    def n_out(self):
        return self.params["W"].data.shape[0]

    def spec(self):
        return {**super().spec(), "n_in": self.n_in, "n_out": self.n_out}

    def output_shape(self, input_shape):
        return (self.n_out,)

    def macs(self, input_shape):
        """Multiply-accumulates per sample of the forward pass."""
        return self.n_in * self.n_out

    def forward(self, x, train=False):
        y, self.cache = linear_forward(x, self.params["W"].data, self.params["b"].data)
        return y

    def backward(self, gy):
        W, b = self.params["W"], self.params["b"]
        gx, W.grad, b.grad = linear_backward(gy, self.cache, W.mask, self.need_gx, not self.frozen)
        self.cache = None
        return gx


class Conv2d(Layer):
    """Convolution owning ``W`` (F, k, k, C) and ``b`` (F,). See :func:`conv2d_forward`."""

    kind = "conv2d"

    def __init__(self, name, c_in, c_out, k, stride=1, pad=0, rng=None, xp=numpy):
        super().__init__(name)
        rng = rng if rng is not None else numpy.random.default_rng(0)
        self.stride, self.pad = stride, pad
        W = _glorot_uniform(rng, (c_out, k, k, c_in), k * k * c_in)
        b = numpy.zeros(c_out, dtype=numpy.float32)
        self.params = {"W": Param(xp.asarray(W)), "b": Param(xp.asarray(b), prunable=False, lr_mult=2.0)}

    def spec(self):
        F, k, _, C = self.params["W"].data.shape
        return {**super().spec(), "c_in": C, "c_out": F, "k": k, "stride": self.stride, "pad": self.pad}

    def output_shape(self, input_shape):
        H, W, _ = input_shape
        F, k = self.params["W"].data.shape[:2]
        return (conv_output_size(H, k, self.stride, self.pad), conv_output_size(W, k, self.stride, self.pad), F)

    def macs(self, input_shape):
        Ho, Wo, F = self.output_shape(input_shape)
        return Ho * Wo * self.params["W"].data[0].size * F

    def forward(self, x, train=False):
        y, self.cache = conv2d_forward(x, self.params["W"].data, self.params["b"].data, self.stride, self.pad)
        return y

    def backward(self, gy):
        W, b = self.params["W"], self.params["b"]
        gx, W.grad, b.grad = conv2d_backward(gy, self.cache, W.mask, self.need_gx, not self.frozen)
        self.cache = None
        return gx


class MaxPool2d(Layer):
    """Max pooling, k×k windows, given stride. See :func:`maxpool2d_forward`."""

    kind = "maxpool2d"

    def __init__(self, name, k, stride=None):
        super().__init__(name)
        self.k, self.stride = k, stride or k

    def spec(self):
        return {**super().spec(), "k": self.k, "stride": self.stride}

    def output_shape(self, input_shape):
        H, W, C = input_shape
        return (conv_output_size(H, self.k, self.stride, 0), conv_output_size(W, self.k, self.stride, 0), C)

    def forward(self, x, train=False):
        y, self.cache = maxpool2d_forward(x, self.k, self.stride)
        return y

    def backward(self, gy):
        gx = maxpool2d_backward(gy, self.cache)
        self.cache = None
        return gx


class ReLU(Layer):
    """Rectifier. See :func:`relu_forward`."""

    kind = "relu"

    def forward(self, x, train=False):
        y, self.cache = relu_forward(x)
        return y

    def backward(self, gy):
        gx = relu_backward(gy, self.cache)
        self.cache = None
        return gx


class Dropout(Layer):
    """Inverted dropout whose ``rate`` may be changed at any time (§3.2 adjusts it).

    ``rng`` is set by the owning network (a Generator of the network's array module).
    """

    kind = "dropout"

    def __init__(self, name, rate=0.5, base_rate=None):
        super().__init__(name)
        self.rate = float(rate)
        self.base_rate = self.rate if base_rate is None else float(base_rate)  # D_o of §3.2
        self.rng = None

    def spec(self):
        return {**super().spec(), "rate": self.rate, "base_rate": self.base_rate}

    def forward(self, x, train=False):
        y, self.cache = dropout_forward(x, self.rate, self.rng, train)
        return y

    def backward(self, gy):
        gx = dropout_backward(gy, self.cache)
        self.cache = None
        return gx


class Flatten(Layer):
    """(N, d1, d2, ...) -> (N, d1·d2·...); backward reshapes back."""

    kind = "flatten"

    def output_shape(self, input_shape):
        return (math.prod(input_shape),)

    def forward(self, x, train=False):
        self.cache = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, gy):
        return gy.reshape(self.cache)
