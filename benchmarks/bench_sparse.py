"""Dense vs sparse inference: latency and throughput, measured side by side in one run.

Cases (random masks at the paper's densities unless ``--checkpoint`` gives a real net):

* LeNet-300-100, fc1 8%, fc2 9%, fc3 26% (Table 2, ``sparsenet.paper``): each fc layer and the whole net,
* LeNet-5, conv1 66%, conv2 12%, fc1 8%, fc2 19% (Table 3): each layer and the whole net,
* one 4096×9216 layer (AlexNet fc6) at 9% and 4% density (AlexNet's and VGG-16's first FC layer),

each at batch 1 and 64. "dense" is ``X W₂ᵀ`` (BLAS), "sparse" the CSR product of
:func:`sparsenet.inference.sparse_matmul_t` (on the GPU the warp-per-row kernel
of :class:`sparsenet.cuda.CSRMatrix`), "auto" the per-layer choice of
:class:`~sparsenet.inference.SparseNetwork` (on the GPU: timed once per layer and rows). Dense and sparse calls alternate, so both see
the same machine state; latency is the median of the repeats, throughput = batch /
latency, ratio = dense latency / sparse latency.

``--sweep`` prints instead the dense/sparse time ratio over densities, layer sizes and
operand rows: the measurements behind :func:`sparsenet.inference.prefer_sparse` (CPU).

Usage::

    python benchmarks/bench_sparse.py [--device cpu|gpu] [--checkpoint CK.h5 ...] [--seconds S] [--json OUT]
    python benchmarks/bench_sparse.py --sweep
"""
import argparse
import json
import os
import platform
import sys
import time
from functools import partial

import numpy

from sparsenet.backend import array_module
from sparsenet.model import build_model, build_network
from sparsenet.inference import SparseNetwork, csr_matrix, layer_operand, sparse_matmul_t
from sparsenet.modelfile import load_model
from sparsenet.paper import weights_left
from sparsenet.pruning import prune_at_random

PAPER = {name: weights_left(name) for name in ("lenet-300-100", "lenet-5")}
FC6 = (weights_left("alexnet")["fc6"], weights_left("vgg-16")["fc6"])  # Tables 4 and 5


def _sync(xp):
    if xp is not numpy:
        xp.cuda.Device().synchronize()


def race(fns, xp, seconds):
    """Median seconds per call of each function in ``fns``, calls interleaved round-robin."""
    for f in fns:
        f()
    _sync(xp)
    times = [[] for _ in fns]
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times[0]) < 5:
        for f, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            f()
            _sync(xp)
            ts.append(time.perf_counter() - t0)
    return [float(numpy.median(ts)) for ts in times]


def row(case, batch, t_dense, t_sparse, t_auto=None, plan=None):
    r = {"case": case, "batch": batch, "dense_ms": 1e3 * t_dense, "sparse_ms": 1e3 * t_sparse,
         "dense_per_s": batch / t_dense, "sparse_per_s": batch / t_sparse, "ratio": t_dense / t_sparse}
    if t_auto is not None:
        r.update(auto_ms=1e3 * t_auto, auto_ratio=t_dense / t_auto, plan=plan)
    return r


def bench_network(tag, net, xp, seconds, batches=(1, 64)):
    """Rows for each Linear/Conv2d product (the layer's GEMM alone) and for the whole net."""
    rows = []
    dense, sparse, auto = SparseNetwork(net, "dense"), SparseNetwork(net, "sparse"), SparseNetwork(net)
    rng = numpy.random.default_rng(0)
    for n in batches:
        x = xp.asarray(rng.random((n, *net.input_shape), dtype=numpy.float32))
        # the operand each layer multiplies: run the net once, keeping each layer's input
        h = x
        for l in net.layers:
            if l.name in sparse.mats and len(sparse.mats) > 1:  # a one-layer net is its own row
                X = layer_operand(l, h)[0]
                W2, csr, density, _ = sparse.mats[l.name]
                td, ts = race([partial(xp.matmul, X, W2.T), partial(sparse_matmul_t, csr, X)], xp, seconds)
                rows.append(row(f"{tag} {l.name} {W2.shape[0]}x{W2.shape[1]} @{100 * density:.0f}% "
                                f"(rows {X.shape[0]})", n, td, ts))
            h = l.forward(h)
            l.cache = None
        td, ts, ta = race([partial(dense.forward, x), partial(sparse.forward, x), partial(auto.forward, x)], xp, seconds)
        plan = ",".join(k for k, v in auto.plan(n).items() if v == "sparse") or "-"
        rows.append(row(f"{tag} whole net" if len(sparse.mats) > 1 else tag, n, td, ts, ta, plan))
    return rows


def fc6(density, xp, seed=0):
    """A 9216 → 4096 Linear (AlexNet fc6) pruned at random to ``density``."""
    spec = {"name": "fc6", "input_shape": [9216], "layers": [{"kind": "linear", "name": "fc6", "n_in": 9216,
                                                              "n_out": 4096}]}
    return prune_at_random(build_network(spec, seed, xp), {"fc6": density}, seed)


def sweep(xp, seconds):
    """Dense/sparse time ratio for layer sizes × operand rows × densities (basis of prefer_sparse)."""
    rng = numpy.random.default_rng(0)
    densities = (0.02, 0.05, 0.1, 0.2, 0.4)
    print("F x K, rows: dense/sparse time ratio at densities " + " ".join(f"{d:.0%}" for d in densities))
    for F, K in ((100, 300), (300, 784), (500, 800), (50, 500), (1024, 1024), (4096, 9216)):
        for M in (1, 8, 64, 512):
            if F * K * M > 4096 * 9216 * 64:
                continue
            ratios = []
            for d in densities:
                W = (rng.standard_normal((F, K)) * (rng.random((F, K)) < d)).astype(numpy.float32)
                csr = csr_matrix(W, xp)
                W2, X = xp.asarray(W), xp.asarray(rng.random((M, K), dtype=numpy.float32))
                td, ts = race([partial(xp.matmul, X, W2.T), partial(sparse_matmul_t, csr, X)], xp, seconds)
                ratios.append(td / ts)
            print(f"{F:>5} x {K:<5} rows {M:>4}: " + " ".join(f"{r:5.2f}" for r in ratios), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--checkpoint", nargs="*", default=[], help="real pruned checkpoints/model files to use instead")
    ap.add_argument("--seconds", type=float, default=1.0, help="time budget per comparison (default 1)")
    ap.add_argument("--sweep", action="store_true", help="print the crossover table behind prefer_sparse")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    a = ap.parse_args(argv)
    xp = array_module(a.device)
    threads = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default"
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, BLAS threads {threads}, "
          f"numpy {numpy.__version__}, device {a.device}, load average {os.getloadavg()[0]:.1f}", flush=True)
    if a.sweep:
        sweep(xp, a.seconds / 4)
        return 0
    nets = [(str(p), load_model(p, xp)) for p in a.checkpoint] or [
        (name, prune_at_random(build_model(name, xp=xp), d)) for name, d in PAPER.items()]
    rows = []
    for tag, net in nets + [(f"fc6 4096x9216 @{d:.0%} (+ bias)", fc6(d, xp)) for d in FC6]:
        for r in bench_network(tag, net, xp, a.seconds):
            rows.append(r)
            print(f"{r['case']:<52} batch {r['batch']:>3}: dense {r['dense_ms']:9.3f} ms  sparse {r['sparse_ms']:9.3f} ms"
                  f"  ratio {r['ratio']:5.2f}" + (f"  auto {r['auto_ratio']:5.2f} (sparse: {r['plan']})"
                                                  if "plan" in r else ""), flush=True)
    if a.json:
        from sparsenet.util import write_text_atomic

        write_text_atomic(a.json, json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
