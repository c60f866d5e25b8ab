"""Weight sharing by k-means (Han, Mao & Dally 2016, Deep Compression §3): trained quantisation.

For a layer's surviving weights w_1 … w_n, :func:`kmeans_codebook` finds K ≤ 2^bits shared
values c_1 … c_K and a code I_i per weight minimising the within-cluster sum of squares

    Σ_i (w_i − c_{I_i})²,   I_i = argmin_k |w_i − c_k|,   c_k = mean{w_i : I_i = k}

by Lloyd's k-means (SciPy's ``kmeans2``) started from K values spaced *linearly* over
[min w, max w] (Deep Compression's §3.2 found linear initialisation best: it keeps the rare
large weights, which matter most, their own centroids). Unused centroids are dropped, and a
layer with no more than 2^bits distinct survivors keeps them exactly (codebook = the distinct
values). :func:`share_weights` installs ``W = c[I] ⊙ M`` in every chosen weight
(:meth:`sparsenet.param.Param.share`); training then moves the codebook, with
∂L/∂c_k = Σ_{i: M_i = 1, I_i = k} ∂L/∂W_i (:mod:`sparsenet.optim`).
"""
import warnings

import numpy
from scipy.cluster.vq import kmeans2

from .backend import asnumpy
from .pruning import layer_amounts
from .util import SparsenetError


def _check_bits(bits, where):
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or bits not in range(1, 9):
        raise SparsenetError(f"bits for {where} must be a whole number in 1..8, got {bits!r}")
    return int(bits)


def kmeans_codebook(values, bits, iterations=20):
    """``(codebook, codes)``: float32 (K,) shared values, K ≤ 2**bits, and a uint8 code per entry
    of ``values`` (flattened) with ``codebook[codes]`` ≈ values (module docstring; at most
    ``iterations`` Lloyd steps). No values: codebook ``[0]``."""
    bits = _check_bits(bits, "k-means")
    v = asnumpy(values).astype(numpy.float64).ravel()
    if not numpy.all(numpy.isfinite(v)):
        raise SparsenetError("cannot share weights that are NaN or infinite")
    distinct, inverse = numpy.unique(v, return_inverse=True)
    if distinct.size <= 2 ** bits:  # includes no values at all
        return (distinct if distinct.size else numpy.zeros(1)).astype(numpy.float32), inverse.astype(numpy.uint8)
    with warnings.catch_warnings():  # an empty cluster keeps its centroid and is dropped below
        warnings.filterwarnings("ignore", "One of the clusters is empty")
        centroids, labels = kmeans2(v, numpy.linspace(v.min(), v.max(), 2 ** bits), iter=iterations, minit="matrix")
    used, codes = numpy.unique(labels, return_inverse=True)
    return centroids[used].astype(numpy.float32), codes.astype(numpy.uint8)


def check_bits(net, bits):
    """``bits`` resolved to ``{"fc1.W": b, ...}`` (one-line errors): a number (every layer), a dict like
    pruning amounts (``{"fc1": 4, "default": 5}``; a layer neither named nor covered by a default stays
    unshared), or ``"auto"``: Deep Compression's 8 bits for conv and 5 for FC layers."""
    if bits == "auto":
        bits = {l.name: 8 if l.kind == "conv2d" else 5 for l in net.layers if "W" in l.params}
    for where, b in (bits.items() if isinstance(bits, dict) else [("every layer", bits)]):
        _check_bits(b, where)
    return {name: int(b) for name, b in layer_amounts(net, bits).items()}


def share_weights(net, bits):
    """Share the values of ``net``'s prunable weights (W; biases stay float) by k-means over their
    survivors, ``bits`` per layer (:func:`check_bits`). Returns ``{"fc1.W": K, ...}``, the codebook sizes."""
    bits = check_bits(net, bits)
    params, xp = net.params(), net.xp
    books = {name: kmeans_codebook(params[name].data[params[name].mask == 1], int(b))  # all, then install
             for name, b in bits.items()}
    for name, (codebook, codes) in books.items():
        p = params[name]
        full, kept = xp.zeros(p.data.shape, dtype=numpy.uint8), p.mask == 1
        full[kept] = xp.asarray(codes)
        p.share(xp.asarray(codebook), full)
    return {name: int(codebook.size) for name, (codebook, _) in books.items()}
