"""Layers with hand-derived backpropagation: the equations, in plain NumPy/CuPy.

Each operation is a pair of pure functions, ``y, cache = op_forward(x, ...)`` and ``gx, ... =
op_backward(gy, cache)``, shapes and equations in the docstring; ``gy`` is dL/dy, ``gx`` dL/dx,
``gW`` dL/dW, ``gb`` dL/db. A thin class per layer owns the parameters (:class:`Param`) and the
cache. For linear, conv and max-pool the classes run the tuned kernels of :mod:`sparsenet.fast_layers`
(same signatures, same values up to float rounding; the tests check that they agree).

* Images are NHWC ``(N, H, W, C)``: a convolution is one GEMM whose output is already NHWC.
  Conv weights are ``(F, kh, kw, C)``; linear weights ``(out, in)``.
* Every parameter has a mask ``M`` (1 keeps, 0 pruned); the network computes with ``W ⊙ M``.
  Pruning and the optimiser keep ``W == W ⊙ M`` (:mod:`sparsenet.param`), so the forward pass
  reads ``W`` directly; the backward pass masks ``gW ← gW ⊙ M``.
* Training runs in float32 end to end. The array module comes from the arrays
  (:func:`sparsenet.backend.get_array_module`); nothing here imports CuPy.
"""
import math

import numpy

from .backend import get_array_module
from .param import Param


# ----------------------------------------------------------------------------- linear
def linear_forward(x, W, b):
    """Fully connected layer: x (N, D_in), W (D_out, D_in), b (D_out,) -> y (N, D_out).

    Forward:  ``y = x Wᵀ + b``   (with pruning, W stands for W ⊙ M).
    """
    return x @ W.T + b, (x, W)


def linear_backward(gy, cache, M=None, need_gx=True, need_gW=True):
    """Backward of :func:`linear_forward`. Returns ``(gx, gW, gb)``::

        gx = gy W                 (N, D_in)   -- None when need_gx is False
        gW = (gyᵀ x) ⊙ M          (D_out, D_in)
        gb = Σ_n gy[n]            (D_out,)    -- both None when need_gW is False (frozen)
    """
    x, W = cache
    gx = gy @ W if need_gx else None
    if not need_gW:
        return gx, None, None
    gW = gy.T @ x
    return gx, (gW if M is None else gW * M), gy.sum(axis=0)


# ----------------------------------------------------------------------------- conv
def conv_output_size(size, k, stride, pad):
    """Output length of a convolution/pooling window sweep: ⌊(size + 2·pad − k)/stride⌋ + 1."""
    return (size + 2 * pad - k) // stride + 1


def im2col(x, kh, kw, stride, pad):
    """Unfold receptive fields: x (N, H, W, C) -> cols (N, Ho, Wo, kh, kw, C), row-major.

    ``cols[n, p, q, i, j, c] = x_pad[n, s·p + i, s·q + j, c]`` (x_pad: x with ``pad``
    zeros around H and W). ``cols.reshape(N·Ho·Wo, kh·kw·C)`` is the GEMM operand X.
    """
    xp = get_array_module(x)
    x = xp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    windows = xp.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))  # N, H', W', C, kh, kw
    return xp.ascontiguousarray(windows[:, ::stride, ::stride].transpose(0, 1, 2, 4, 5, 3))


def col2im(cols, x_shape, stride, pad):
    """Adjoint of :func:`im2col`: cols (N, Ho, Wo, kh, kw, C) -> gx (N, H, W, C).

    ``gx_pad[n, s·p + i, s·q + j, c] += cols[n, p, q, i, j, c]``, then the padding cut off.
    """
    xp = get_array_module(cols)
    N, H, W, C = x_shape
    _, Ho, Wo, kh, kw, _ = cols.shape
    gx = xp.zeros((N, H + 2 * pad, W + 2 * pad, C), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            gx[:, i:i + stride * Ho:stride, j:j + stride * Wo:stride] += cols[:, :, :, i, j]
    return gx[:, pad:pad + H, pad:pad + W]


def conv_check(x, W, pad, groups):
    """Raise ValueError unless x (N, H, W, C) suits W (F, kh, kw, C/groups): F divisible by
    groups, and the kernel fitting the padded image."""
    F, kh, kw, Cg = W.shape
    if groups < 1 or F % groups or x.ndim != 4 or x.shape[3] != Cg * groups:
        raise ValueError(f"conv2d of {F} filters in {groups} group(s) expects (N, H, W, {Cg * groups}) input, "
                         f"got {tuple(x.shape)}")
    if min(x.shape[1] + 2 * pad - kh, x.shape[2] + 2 * pad - kw) < 0:
        raise ValueError(f"conv2d kernel {kh}x{kw} larger than the padded input {tuple(x.shape[1:3])} + 2·{pad}")


def conv2d_forward(x, W, b, stride=1, pad=0, groups=1):
    """2-D convolution (cross-correlation, as in Caffe): x (N, H, W, C), W (F, kh, kw, C/G),
    b (F,) -> y (N, Ho, Wo, F), ``Ho = ⌊(H + 2·pad − kh)/stride⌋ + 1`` (likewise Wo).

    ``groups`` G (AlexNet's conv2/4/5 use 2): group g convolves input channels
    [g·C/G, (g+1)·C/G) with filters [g·F/G, (g+1)·F/G) only. With ``X = im2col(x)`` as
    (N·Ho·Wo, kh·kw, G, C/G), ``X_g`` its group-g columns as (N·Ho·Wo, K), K = kh·kw·C/G, and
    ``W_g`` group g's filters as (F/G, K)::

        y_g = X_g W_gᵀ + b_g     i.e.  y[n,p,q,f] = Σ_{i,j,c<C/G} x_pad[n, s·p+i, s·q+j, g·C/G + c] W[f,i,j,c] + b[f]

    where g = ⌊f / (F/G)⌋; G = 1 is the ordinary convolution ``y = X W₂ᵀ + b``.
    """
    conv_check(x, W, pad, groups)
    F, kh, kw, Cg = W.shape
    cols = im2col(x, kh, kw, stride, pad)
    X = cols.reshape(-1, kh * kw, groups, Cg).transpose(2, 0, 1, 3).reshape(groups, -1, kh * kw * Cg)  # (G, ·, K)
    y = X @ W.reshape(groups, F // groups, -1).transpose(0, 2, 1)  # (G, N·Ho·Wo, F/G)
    return y.transpose(1, 0, 2).reshape(*cols.shape[:3], F) + b, (x.shape, X, W, stride, pad)


def conv2d_backward(gy, cache, M=None, need_gx=True, need_gW=True):
    """Backward of :func:`conv2d_forward`. Returns ``(gx, gW, gb)``; with G_g = gy of group g's
    filters as (N·Ho·Wo, F/G)::

        gx = col2im([G_g W_g]_g)       (N, H, W, C)     -- None when need_gx is False
        gW_g = (G_gᵀ X_g) ⊙ M_g        (F/G, K) -> (F/G, kh, kw, C/G), stacked over g
        gb = Σ_rows gy                 (F,)             -- both None when need_gW is False

    ``[·]_g`` puts group g's columns back at channels [g·C/G, (g+1)·C/G) of each offset.
    """
    x_shape, X, W, stride, pad = cache
    groups, F, (N, Ho, Wo) = X.shape[0], W.shape[0], gy.shape[:3]
    G = gy.reshape(-1, groups, F // groups).transpose(1, 0, 2)  # (G, N·Ho·Wo, F/G)
    gx = None
    if need_gx:
        gX = (G @ W.reshape(groups, F // groups, -1)).reshape(groups, N * Ho * Wo, *W.shape[1:3], -1)
        gx = col2im(gX.transpose(1, 2, 3, 0, 4).reshape(N, Ho, Wo, *W.shape[1:3], -1), x_shape, stride, pad)
    if not need_gW:
        return gx, None, None
    gW = (G.transpose(0, 2, 1) @ X).reshape(W.shape)
    return gx, (gW if M is None else gW * M), gy.reshape(-1, F).sum(axis=0)


# ----------------------------------------------------------------------------- pooling
def pool_output_size(size, k, stride, ceil=False):
    """Pooled length: ``⌊(size − k)/stride⌋ + 1``, or with ``ceil`` (Caffe's rounding)
    ``⌈(size − k)/stride⌉ + 1``, less one if the last window would start past the input."""
    if not ceil:
        return (size - k) // stride + 1
    n = -(-(size - k) // stride) + 1
    return n - 1 if (n - 1) * stride >= size else n


def pool_pad(x, k, stride, ceil):
    """``(x_pad, Ho, Wo)`` for a k×k, stride-s max-pool of x (N, H, W, C); ValueError when the
    window does not fit. With ceil rounding x_pad is x padded at the bottom/right with −inf to
    ``(Ho − 1)·s + k`` rows and ``(Wo − 1)·s + k`` columns, so windows overhanging the input take
    the max of their part inside it (the floor kernels on x_pad; the gradient is cropped back)."""
    N, H, W, C = x.shape
    if min(H, W) < k:
        raise ValueError(f"max-pool window {k} larger than input {H}x{W}")
    Ho, Wo = pool_output_size(H, k, stride, ceil), pool_output_size(W, k, stride, ceil)
    ph, pw = max(0, (Ho - 1) * stride + k - H), max(0, (Wo - 1) * stride + k - W)
    if ph or pw:
        x = get_array_module(x).pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), constant_values=-numpy.inf)
    return x, Ho, Wo


def maxpool2d_forward(x, k, stride, ceil=False):
    """Max pooling over k×k windows (overlapping when k > stride): x (N, H, W, C) ->
    y (N, Ho, Wo, C), ``Ho = ⌊(H − k)/stride⌋ + 1``, or with ``ceil`` (Caffe)
    ``Ho = ⌈(H − k)/stride⌉ + 1`` (AlexNet: 55 → 27 → 13 → 6 with k = 3, s = 2).

    Forward: ``y[n,p,q,c] = max_{i,j<k, s·p+i<H, s·q+j<W} x[n, s·p+i, s·q+j, c]``, i.e. the
    max over x_pad of :func:`pool_pad`. The cache keeps, per output, the offset ``o = i·k + j``
    of the first maximum in row-major window order.
    """
    N, H, W, C = x.shape
    x_pad, Ho, Wo = pool_pad(x, k, stride, ceil)
    windows = im2col(x_pad, k, k, stride, 0).reshape(N, Ho, Wo, k * k, C)
    return windows.max(axis=3), (x_pad.shape, (H, W), windows.argmax(axis=3), k, stride)


def maxpool2d_backward(gy, cache):
    """Backward of :func:`maxpool2d_forward`: each gy goes to the input that won its window.

    ``gx = col2im(w ⊙ gy)[:, :H, :W]``, where ``w[n,p,q,i,j,c]`` is 1 at the first offset (i, j)
    in row-major order with ``x_pad[n, s·p+i, s·q+j, c] = y[n,p,q,c]``, else 0 (one input on ties).
    """
    pad_shape, (H, W), first, k, stride = cache
    xp = get_array_module(gy)
    N, Ho, Wo, C = gy.shape
    w = xp.arange(k * k).reshape(k * k, 1) == first[:, :, :, None, :]  # (N, Ho, Wo, k², C)
    return col2im((w * gy[:, :, :, None, :]).reshape(N, Ho, Wo, k, k, C), pad_shape, stride, 0)[:, :H, :W]


# ----------------------------------------------------------------------------- normalisation
def _channel_window_sum(a, size):
    """``out[..., c] = Σ_{|c'−c| ≤ size//2} a[..., c']`` over the last axis (zero beyond its ends):
    ``size`` shifted adds of the zero-padded array, no loop over channels."""
    h, C = size // 2, a.shape[-1]
    a = get_array_module(a).pad(a, [(0, 0)] * (a.ndim - 1) + [(h, h)])
    out = a[..., :C].copy()
    for d in range(1, size):
        out += a[..., d:d + C]
    return out


def lrn_forward(x, size=5, alpha=1e-4, beta=0.75, k=1.0):
    """Local response normalisation across channels (Caffe's ACROSS_CHANNELS; AlexNet's norm1/2):
    x (..., C), channels last -> y of x's shape. With h = size // 2 (size odd)::

        s[..., c] = k + (α/size) Σ_{c'=c−h}^{c+h} x[..., c']²      (terms outside 0..C−1 are 0)
        y = x ⊙ s^(−β)
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"LRN size must be a positive odd number, got {size}")
    s = _channel_window_sum(x * x, size)
    s *= alpha / size
    s += k
    return x * s ** -beta, (x, s, size, alpha, beta)


def lrn_backward(gy, cache):
    """Backward of :func:`lrn_forward`. From ∂s[c']/∂x[c] = (2α/size)·x[c]·[|c'−c| ≤ h] and
    ∂y[c']/∂x[c] = δ_{cc'} s[c]^(−β) − β x[c'] s[c']^(−β−1) ∂s[c']/∂x[c]::

        gx[c] = gy[c] s[c]^(−β) − (2αβ/size) x[c] Σ_{|c'−c| ≤ h} gy[c'] x[c'] s[c']^(−β−1)

    (the window is symmetric, so the sum is the forward's window sum of ``gy ⊙ x ⊙ s^(−β−1)``).
    """
    x, s, size, alpha, beta = cache
    t = s ** -beta
    gx = _channel_window_sum(gy * x * t / s, size)
    gx *= x * (-2.0 * alpha * beta / size)
    gx += gy * t
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
    """Inverted dropout. Training: ``m ~ Bernoulli(1 − rate) / (1 − rate)``, ``y = x ⊙ m``;
    at test time (or rate 0) ``y = x``. ``rng``: a Generator of x's array module.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if not train or rate == 0.0:
        return x, None
    m = (rng.random(x.shape, dtype=numpy.float32) >= rate).astype(x.dtype)
    m *= 1.0 / (1.0 - rate)
    return x * m, m


def dropout_backward(gy, cache):
    """Backward: ``gx = gy ⊙ m`` (identity when the forward was the identity)."""
    return gy if cache is None else gy * cache


def softmax_cross_entropy_forward(z, t):
    """Mean softmax cross-entropy: logits z (N, K), labels t (N,) in [0, K) -> scalar loss.

    Forward (stable: the row max is subtracted before exponentiating)::

        log p[n,k] = z[n,k] − max_j z[n,j] − log Σ_j exp(z[n,j] − max_j z[n,j])
        L = −(1/N) Σ_n log p[n, t_n]
    """
    xp = get_array_module(z)
    s = z - z.max(axis=1, keepdims=True)
    logp = s - xp.log(xp.exp(s).sum(axis=1, keepdims=True))
    return -logp[xp.arange(z.shape[0]), t].mean(), (logp, t)


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

    ``params`` maps short names ("W", "b") to :class:`Param`. ``need_gx`` is False when
    nobody reads the input gradient. A ``frozen`` layer computes no parameter gradients
    (§3.3 retrains the FC layers with the conv layers fixed, and vice versa).
    ``forward``/``backward`` run :func:`kernel` with the layer's :meth:`settings`.
    """

    kind = ""
    params = {}

    def __init__(self, name):
        self.name, self.need_gx, self.frozen, self.cache = name, True, False, None

    def spec(self):
        """JSON-able description from which :func:`sparsenet.model.layer_from_spec` rebuilds it."""
        return {"kind": self.kind, "name": self.name}

    def output_shape(self, input_shape):
        return input_shape

    def settings(self, train):
        """The kernel's arguments after the input."""
        return ()

    def forward(self, x, train=False):
        y, self.cache = kernel(self.kind, "forward")(x, *self.settings(train))
        return y

    def backward(self, gy):
        gx = kernel(self.kind, "backward")(gy, self.cache)
        self.cache = None
        return gx


def kernel(kind, direction):
    """A ``kind`` layer's ``direction`` ("forward"/"backward") function: the tuned one of
    :mod:`sparsenet.fast_layers` when there is one, else the plain one here."""
    return getattr(fast, f"{kind}_{direction}", None) or globals()[f"{kind}_{direction}"]


class Weighted(Layer):
    """A layer with a weight ``W`` (prunable) and a bias ``b`` (``lr_mult`` 2, as in Caffe),
    initialised with Caffe's "xavier" filler, U(−a, a) with a = sqrt(3 / fan_in), drawn from
    ``rng`` (default: seed 0), and zero biases; ``rng=False`` leaves W zero (weights loaded next)."""

    def __init__(self, name, shape, rng=None, xp=numpy):
        super().__init__(name)
        rng = rng if rng is not None else numpy.random.default_rng(0)
        a = math.sqrt(3.0 / math.prod(shape[1:]))
        W = numpy.zeros(shape, numpy.float32) if rng is False else rng.uniform(-a, a, size=shape).astype(numpy.float32)
        b = numpy.zeros(shape[0], dtype=numpy.float32)
        self.params = {"W": Param(xp.asarray(W)), "b": Param(xp.asarray(b), prunable=False, lr_mult=2.0)}

    def settings(self, train):
        return self.params["W"].data, self.params["b"].data

    def backward(self, gy):
        W, b = self.params["W"], self.params["b"]
        # W._mask: the live mask, only read here (Param.mask hands out guarded views: a copy on CuPy)
        gx, W.grad, b.grad = kernel(self.kind, "backward")(gy, self.cache, W._mask, self.need_gx, not self.frozen)
        self.cache = None
        return gx


class Linear(Weighted):
    """Fully connected layer owning ``W`` (out, in) and ``b`` (out,). See :func:`linear_forward`."""

    kind = "linear"

    def __init__(self, name, n_in, n_out, rng=None, xp=numpy):
        super().__init__(name, (n_out, n_in), rng, xp)

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


class Conv2d(Weighted):
    """Convolution owning ``W`` (F, k, k, C/groups) and ``b`` (F,). See :func:`conv2d_forward`."""

    kind = "conv2d"

    def __init__(self, name, c_in, c_out, k, stride=1, pad=0, groups=1, rng=None, xp=numpy):
        if groups < 1 or c_in % groups or c_out % groups:
            raise ValueError(f"conv {name!r}: {c_in} input and {c_out} output channels do not split into {groups} groups")
        super().__init__(name, (c_out, k, k, c_in // groups), rng, xp)
        self.stride, self.pad, self.groups = stride, pad, groups

    def settings(self, train):
        return (*super().settings(train), self.stride, self.pad, self.groups)

    def spec(self):
        F, k, _, C = self.params["W"].data.shape
        spec = {**super().spec(), "c_in": C * self.groups, "c_out": F, "k": k, "stride": self.stride, "pad": self.pad}
        return {**spec, "groups": self.groups} if self.groups > 1 else spec

    def output_shape(self, input_shape):
        H, W, _ = input_shape
        F, k = self.params["W"].data.shape[:2]
        return (conv_output_size(H, k, self.stride, self.pad), conv_output_size(W, k, self.stride, self.pad), F)

    def macs(self, input_shape):
        Ho, Wo, F = self.output_shape(input_shape)
        return Ho * Wo * self.params["W"].data[0].size * F


class MaxPool2d(Layer):
    """Max pooling, k×k windows, given stride, Caffe's rounding up with ``ceil``. See
    :func:`maxpool2d_forward`."""

    kind = "maxpool2d"

    def __init__(self, name, k, stride=None, ceil=False):
        super().__init__(name)
        self.k, self.stride, self.ceil = k, stride or k, bool(ceil)

    def spec(self):
        spec = {**super().spec(), "k": self.k, "stride": self.stride}
        return {**spec, "ceil": True} if self.ceil else spec

    def output_shape(self, input_shape):
        H, W, C = input_shape
        return (pool_output_size(H, self.k, self.stride, self.ceil), pool_output_size(W, self.k, self.stride, self.ceil), C)

    def settings(self, train):
        return self.k, self.stride, self.ceil


class LRN(Layer):
    """Local response normalisation across channels. See :func:`lrn_forward`."""

    kind = "lrn"

    def __init__(self, name, size=5, alpha=1e-4, beta=0.75, k=1.0):
        super().__init__(name)
        if size < 1 or size % 2 == 0:
            raise ValueError(f"LRN {name!r}: size must be a positive odd number, got {size}")
        self.size, self.alpha, self.beta, self.k = int(size), float(alpha), float(beta), float(k)

    def spec(self):
        return {**super().spec(), "size": self.size, "alpha": self.alpha, "beta": self.beta, "k": self.k}

    def settings(self, train):
        return self.size, self.alpha, self.beta, self.k


class ReLU(Layer):
    """Rectifier. See :func:`relu_forward`."""

    kind = "relu"


class Dropout(Layer):
    """Inverted dropout whose ``rate`` §3.2 adjusts; the owning network sets ``rng``."""

    kind = "dropout"

    def __init__(self, name, rate=0.5, base_rate=None):
        super().__init__(name)
        self.rate = float(rate)
        self.base_rate = self.rate if base_rate is None else float(base_rate)  # D_o of §3.2
        self.rng = None

    def spec(self):
        return {**super().spec(), "rate": self.rate, "base_rate": self.base_rate}

    def settings(self, train):
        return self.rate, self.rng, train


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


# Imported last: fast_layers imports the shape helpers from here.
from . import fast_layers as fast  # noqa: E402
