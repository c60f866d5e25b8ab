"""Sparse inference: pruned layers run as sparse matrix products.

:class:`SparseNetwork` runs each Linear/Conv2d of a :class:`~sparsenet.model.Network` dense (``X W₂ᵀ``, BLAS)
or sparse (``(W_csr Xᵀ)ᵀ``; one SpMV ``W_csr x`` for a single row), chosen per layer and call: on the CPU by
the measured rule :func:`prefer_sparse`, on the GPU by timing both products once per layer and row count
(:meth:`SparseNetwork.plan`). ``W₂`` is the weight as its layer's matrix (:func:`sparsenet.codecs.as_matrix`);
its CSR copy holds the non-zero weights (a surviving 0.0 adds nothing): ``scipy.sparse`` on the CPU, on the
GPU :class:`sparsenet.cuda.CSRMatrix` (a warp per row of W₂; cuSPARSE's general kernels lost to the dense
GEMV at batch 1 on an H100).
"""
import math

import numpy

import scipy.sparse

from . import cuda, layers as L
from .backend import asnumpy
from .codecs import as_matrix, csr_from_dense
from .model import predict_batches
from .util import SparsenetError


def prefer_sparse(density, rows, n_weights, xp=numpy):
    """Whether a product ``X W₂ᵀ`` runs faster on the CPU with W₂ as CSR (measured rule, README).

    ``density``: W₂'s non-zero fraction; ``rows``: rows of X (the batch size for a Linear, N·Ho·Wo for a
    Conv2d); ``n_weights``: W₂'s size.

    Measured with ``benchmarks/bench_sparse.py --sweep`` (2-core EPYC, OpenBLAS with two threads, scipy on
    one): scipy's CSR kernels cost about 0.5–1 ns per stored weight and row of X plus a few µs per call; a
    dense GEMV about 0.05–0.1 ns per weight while W₂ stays in cache, more once it streams from memory; a
    dense GEMM (several rows) much less per weight and row. Hence: one row: sparse at density ≤ 10% for ≥ 4M
    weights (1.3× at 10%, 0.7× at 20%), ≤ 3% for ≥ 100K weights (a 1024×1024 layer gains 1.9× at 2% and
    loses at 5%), never for smaller layers (call overhead); 2–64 rows: ≤ 5% when rows × weights ≥ 1M
    (1.3–3.2× at 5%, about even at 10%); more rows (BLAS's GEMM at its best): ≤ 2% when rows × weights ≥ 1M.

    The GPU has no such rule: :class:`SparseNetwork` times both products there (``xp`` other than NumPy is
    refused with that advice).
    """
    if xp is not numpy:
        raise SparsenetError("on the GPU sparse vs dense is measured, not ruled: SparseNetwork(net).plan(batch) "
                             "times both products")
    if rows == 1:
        return n_weights >= 100_000 and density <= (0.10 if n_weights >= 4_000_000 else 0.03)
    return density <= (0.05 if rows <= 64 else 0.02) and rows * n_weights >= 1_000_000


def layer_operand(layer, x):
    """The dense operand ``X`` (M, K) of a Linear/Conv2d's product ``X W₂ᵀ`` and the shape its (M, F)
    result takes: x for a Linear (shape None), the im2col rows (N·Ho·Wo, kh·kw·C) for a Conv2d (N, Ho, Wo, F)."""
    if isinstance(layer, L.Linear):
        return x, None
    F, kh, kw, _ = layer.params["W"].data.shape
    cols = L.im2col(x, kh, kw, layer.stride, layer.pad)
    N, Ho, Wo = cols.shape[:3]
    return cols.reshape(N * Ho * Wo, -1), (N, Ho, Wo, F)


def csr_matrix(W2, xp=numpy):
    """W₂ (F, K), a host array, as the CSR matrix the products below take on ``xp``'s device: ``scipy.sparse``
    on the CPU, :class:`sparsenet.cuda.CSRMatrix` on the GPU (its stored entries: W₂'s non-zeros)."""
    data, indices, indptr = csr_from_dense(W2)
    if xp is numpy:
        return scipy.sparse.csr_matrix((data, indices, indptr), shape=W2.shape)
    return cuda.CSRMatrix(data, indices, indptr, W2.shape)


def sparse_matmul_t(W_csr, X):
    """``Y = X Wᵀ`` for dense X (M, K), sparse W (F, K) → (M, F): one SpMV ``W x`` if M = 1, else ``(W Xᵀ)ᵀ``
    (scipy); :meth:`sparsenet.cuda.CSRMatrix.matmul_t` for a GPU matrix."""
    if hasattr(W_csr, "matmul_t"):
        return W_csr.matmul_t(X)
    return (W_csr @ X[0])[None, :] if X.shape[0] == 1 else (W_csr @ X.T).T


class SparseNetwork:
    """Inference with pruned layers as sparse matrix products.

    ``mode``: ``"auto"`` picks dense or sparse per layer and call by :func:`prefer_sparse`; ``"dense"`` /
    ``"sparse"`` force one for every Linear/Conv2d. Each such layer keeps its dense matrix ``W₂`` (F, K) and
    its CSR copy (a grouped conv: the block-diagonal CSR over all C input channels, and run dense, its own
    forward); other layers run their ordinary forward pass. Predictions equal the dense network's (the
    same products, summed in another order: logits agree to float32 rounding).
    """

    def __init__(self, net, mode="auto"):
        if mode not in ("auto", "dense", "sparse"):
            raise SparsenetError(f"unknown inference mode {mode!r}: use auto, dense or sparse")
        self.net, self.mode, self.xp = net, mode, net.xp
        self.measured = {}  # GPU: (layer, rows) -> sparse faster?
        self.mats = {}
        for l in net.layers:
            if isinstance(l, L.Linear | L.Conv2d):
                W = asnumpy(l.params["W"].data)
                if getattr(l, "groups", 1) > 1:  # block diagonal over the groups' channels (F, kh, kw, C)
                    G, (F, kh, kw, Cg) = l.groups, W.shape
                    full = numpy.zeros((F, kh, kw, Cg * G), numpy.float32)
                    for g in range(G):
                        full[g * F // G:(g + 1) * F // G, ..., g * Cg:(g + 1) * Cg] = W[g * F // G:(g + 1) * F // G]
                    W = full
                csr = csr_matrix(as_matrix(W), self.xp)
                W2 = as_matrix(l.params["W"].data) if getattr(l, "groups", 1) == 1 else None  # dense: the layer's own
                n = l.params["W"].size
                self.mats[l.name] = (W2, csr, csr.nnz / n if n else 1.0, n)

    def plan(self, batch_size):
        """``{layer: "sparse" | "dense"}`` for a batch of ``batch_size`` inputs."""
        out, shape = {}, self.net.input_shape
        for l in self.net.layers:
            if l.name in self.mats:
                rows = batch_size * (math.prod(l.output_shape(shape)[:2]) if l.kind == "conv2d" else 1)
                out[l.name] = "sparse" if self._sparse(l.name, rows) else "dense"
            shape = l.output_shape(shape)
        return out

    def _sparse(self, name, rows):
        if self.mode != "auto":
            return self.mode == "sparse"
        W2, csr, density, n_weights = self.mats[name]
        if self.xp is numpy:
            return prefer_sparse(density, rows, n_weights, numpy)
        if W2 is None:  # a grouped conv: its own forward is the dense baseline
            return False
        key = (name, rows)
        if key not in self.measured:  # on a random operand of the real shape: the times do not depend on values
            X = self.xp.asarray(numpy.random.default_rng(0).random((rows, W2.shape[1]), dtype=numpy.float32))
            self.measured[key] = cuda.time_ms(lambda: csr.matmul_t(X)) < cuda.time_ms(lambda: X @ W2.T)
        return self.measured[key]

    def forward(self, x):
        """Logits for a batch ``x`` (N, *input_shape); a grouped conv run dense is the layer's own forward."""
        for l in self.net.layers:
            W2, csr, *_ = self.mats.get(l.name, (None, None))
            rows = len(x) * (math.prod(l.output_shape(x.shape[1:])[:2]) if l.kind == "conv2d" else 1)
            if csr is not None and (self._sparse(l.name, rows) or W2 is not None):
                X, shape = layer_operand(l, x)
                y = (sparse_matmul_t(csr, X) if W2 is None or self._sparse(l.name, rows) else X @ W2.T)
                y += l.params["b"].data
                x = y if shape is None else y.reshape(shape)
            else:
                x = l.forward(x)
                l.cache = None
        return x

    def predict(self, x, batch_size=1000):
        """Predicted class of every row of ``x``, in batches of ``batch_size``."""
        return predict_batches(self.forward, x, batch_size)
