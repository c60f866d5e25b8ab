"""Finite-difference helpers shared by the gradient-check tests (float64 central differences)."""
import math

import numpy as np

from sparsenet.backend import asnumpy

RTOL = 1e-6
# Absolute floor for the FD comparison: central differences in float64 with eps = 1e-6 carry
# a round-off of about 1e-16·|L|/1e-6 ≈ 1e-10·|L|; without a floor a tiny gradient (e.g. a
# softmax that is already confident) fails on round-off alone.
ATOL = 1e-9


# ----------------------------------------------------------------------------- helpers
def numerical_grad(f, x, eps=1e-6):
    """Central-difference gradient of the scalar function ``f()`` w.r.t. the array ``x``.

    ``x`` (NumPy or CuPy) is perturbed in place one entry at a time and restored; ``f``
    reads it through closure. Returns a NumPy array of x's shape.
    """
    g = np.zeros(x.shape, dtype=np.float64)
    for idx in np.ndindex(*x.shape):
        old = float(x[idx])
        x[idx] = old + eps
        fp = float(f())
        x[idx] = old - eps
        fm = float(f())
        x[idx] = old
        g[idx] = (fp - fm) / (2 * eps)
    return g


def rel_err(a, b):
    a, b = np.asarray(asnumpy(a), dtype=np.float64), np.asarray(asnumpy(b), dtype=np.float64)
    return float(np.max(np.abs(a - b), initial=0.0)) / max(
        1e-8, float(np.max(np.abs(a), initial=0.0)) + float(np.max(np.abs(b), initial=0.0))
    )


def assert_grad(analytic, numeric, rtol=RTOL, atol=ATOL):
    """max|a − n| ≤ rtol·(max|a| + max|n|) + atol, i.e. rel_err < rtol up to round-off."""
    assert analytic is not None
    a = asnumpy(analytic)
    assert a.shape == numeric.shape, (a.shape, numeric.shape)
    assert a.dtype == np.float64
    assert np.all(np.isfinite(a))
    diff = float(np.max(np.abs(a - numeric), initial=0.0))
    scale = float(np.max(np.abs(a), initial=0.0)) + float(np.max(np.abs(numeric), initial=0.0))
    assert diff <= rtol * scale + atol, (
        f"relative error {rel_err(a, numeric):.3e} (max abs diff {diff:.3e})\nanalytic\n{a}\nnumeric\n{numeric}"
    )


def randn(xp, rng, *shape):
    return xp.asarray(rng.standard_normal(shape))


def random_mask(xp, rng, shape):
    """0/1 float64 mask with at least one 0 and one 1 when it has ≥ 2 entries."""
    m = (rng.random(shape) < 0.5).astype(np.float64)
    flat = m.reshape(-1)
    if flat.size >= 2:
        flat[0], flat[-1] = 0.0, 1.0
    return xp.asarray(m)


def distinct_values(rng, shape):
    """Values of a random permutation, spaced ≥ 0.098 apart: FD never flips a max."""
    n = math.prod(shape)
    v = rng.permutation(n) * 0.1 - 0.05 * n + rng.uniform(-1e-3, 1e-3, n)
    return v.reshape(shape)


def assert_stack_gradients(xp, layers, x, R, rng, keep=0.7):
    """A stack of layer classes in float64, each prunable weight pruned at random (``keep``):
    with ``L = Σ out ⊙ R``, dL/dx and every parameter's gradient (masked) against finite differences."""
    params = {f"{layer.name}.{k}": p for layer in layers for k, p in layer.params.items()}
    for p in params.values():
        p.cast(np.float64)
        if p.prunable:
            p.prune(xp.asarray(rng.random(p.data.shape) < keep))

    def f():
        h = x
        for layer in layers:
            h = layer.forward(h, train=True)
        return xp.sum(h * R)

    f()
    g = R
    for layer in reversed(layers):
        g = layer.backward(g)
    assert_grad(g, numerical_grad(f, x))
    for name, p in params.items():
        assert p.grad.dtype == np.float64, name
        assert_grad(p.grad, numerical_grad(f, p.data) * asnumpy(p.mask))
