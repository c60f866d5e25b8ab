"""Training throughput: one epoch of LeNet-300-100 and LeNet-5, measured side by side.

Reports, all from this one run on this machine:

* the float32 GEMM peak of the array library (best of square matmuls),
* per net: seconds per epoch, achieved GFLOP/s (the FLOPs the hand-written backprop
  really performs: forward 2·MACs, weight gradient 2·MACs, input gradient 2·MACs except
  for the first layer), and that as a fraction of the GEMM peak,
* when PyTorch is importable (never a dependency): the same nets, batch size, optimiser
  (SGD, momentum 0.9, weight decay 5e-4) and data in PyTorch, and the time ratio.

Usage::

    python benchmarks/bench_train.py [--device cpu|gpu] [--epochs-of N] [--json OUT.json]
    python benchmarks/bench_train.py --breakdown    # where a step's time goes

``--breakdown`` times training steps with and without the optimiser update (blocks of
each alternating, medians): the second is the share of peak that the forward and
backward passes reach by themselves, an upper bound for any faster update.

``--epochs-of N`` times N training images per "epoch" (default: all 60,000). MNIST is
read from ``$SPARSENET_DATA`` when present; otherwise random images of the same shape
are used (the timing does not depend on pixel values).
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy

from sparsenet import cuda, data as D
from sparsenet.backend import array_module, to_device
from sparsenet.model import build_model
import dataclasses

from sparsenet.data import ArraySplit
from sparsenet.engine import TrainConfig, reuse_heap_memory, train_epoch
from sparsenet.optim import SGD


def gemm_peak(xp, sizes=(1024, 2048), repeat=5):
    """float32 GFLOP/s of n×n×n matrix products over ``sizes``: (best, median) of all runs.

    The best single product is the peak the targets are stated against; the median shows
    how far a sustained run falls below it on this machine (clock boost, shared cores).
    """
    rates = []
    for n in sizes:
        a = xp.asarray(numpy.random.default_rng(0).random((n, n), dtype=numpy.float32))
        b = a.copy()
        a @ b
        _sync(xp)
        for _ in range(repeat):
            t0 = time.perf_counter()
            a @ b
            _sync(xp)
            rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return max(rates), float(numpy.median(rates))


def _sync(xp):
    if xp is not numpy:
        xp.cuda.Device().synchronize()


def train_flops(net, n):
    """FLOPs of one epoch over n images with the backward pass as implemented."""
    total, first = 0, True
    for r in net.summary():
        if r["macs"]:
            total += (4 if first else 6) * r["macs"]
            first = False
    return total * n


def load_images(n):
    try:
        ds = D.load_dataset("mnist", download=False)
        x, t = D.to_float(ds.x_train[:n]), ds.y_train[:n]
        src = "MNIST"
    except Exception:
        # MNIST-like statistics (~20% of pixels lit): uniform noise on every pixel drives
        # LeNet-5 at the default learning rate to overflow, and NaN steps time differently
        rng = numpy.random.default_rng(0)
        x = rng.random((n, 28, 28), dtype=numpy.float32) * (rng.random((n, 28, 28)) < 0.2)  # stays float32
        t = rng.integers(0, 10, n)
        src = "random"
    return x, t.astype(numpy.int64), src


def bench_sparsenet(name, x, t, xp, graphs=True):
    """Seconds for one epoch (after a warm-up); on the GPU with the step replayed from CUDA graphs, or
    with ``graphs`` False every step launched eagerly."""
    os.environ[cuda.GRAPHS_ENV] = "1" if graphs else "0"
    cfg = TrainConfig(model=name)
    net = build_model(name, 0, xp)
    opt = SGD.from_settings(net.params(), dataclasses.asdict(cfg))
    xs = to_device(x.reshape((-1,) + net.input_shape), xp)
    ts = to_device(t, xp)
    rng = numpy.random.default_rng(0)
    train_epoch(net, opt, ArraySplit(xs[:640], ts[:640]), cfg.batch_size, rng)  # warm-up
    _sync(xp)
    t0 = time.perf_counter()
    train_epoch(net, opt, ArraySplit(xs, ts), cfg.batch_size, rng)
    _sync(xp)
    return time.perf_counter() - t0, train_flops(net, len(x))


def breakdown(name, x, t, xp, blocks=8, steps=60):
    """Median milliseconds per training step of ``name``: the whole step, and the forward
    and backward passes alone (update skipped); blocks of the two alternate."""
    cfg = TrainConfig(model=name)
    net = build_model(name, 0, xp)
    opt = SGD.from_settings(net.params(), dataclasses.asdict(cfg), batches_per_epoch=-(-len(x) // cfg.batch_size))
    xs = to_device(x.reshape((-1,) + net.input_shape), xp)
    ts = to_device(t, xp)
    per = {"step": [], "forward+backward": []}
    batch = 0
    for block in range(2 * blocks + 2):  # the first two blocks warm up
        kind = ("step", "forward+backward")[block % 2]
        t0 = time.perf_counter()
        for _ in range(steps):
            s = (batch * cfg.batch_size) % (len(xs) - cfg.batch_size)
            batch += 1
            net.loss_and_backward(xs[s:s + cfg.batch_size], ts[s:s + cfg.batch_size])
            if kind == "step":
                opt.step()
            else:
                for p in opt.params.values():
                    p.grad = None
        _sync(xp)
        if block >= 2:
            per[kind].append((time.perf_counter() - t0) / steps * 1e3)
    return {k: float(numpy.median(v)) for k, v in per.items()}


def bench_torch(name, x, t, device):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "lenet-300-100":
        net = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
        xt = torch.from_numpy(x.reshape(-1, 784))
    else:
        net = nn.Sequential(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2, 2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2, 2),
                        nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))
        xt = torch.from_numpy(x.reshape(-1, 1, 28, 28))
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    net = net.to(dev)
    xt, tt = xt.to(dev), torch.from_numpy(t).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()

    def epoch(n):
        perm = torch.randperm(n, device=dev)
        for s in range(0, n, 64):
            idx = perm[s:s + 64]
            opt.zero_grad(set_to_none=True)
            loss_fn(net(xt[idx]), tt[idx]).backward()
            opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    epoch(640)
    t0 = time.perf_counter()
    epoch(len(xt))
    return time.perf_counter() - t0, torch.__version__, torch.get_num_threads()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--epochs-of", type=int, default=60000, help="training images per timed epoch")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--breakdown", action="store_true",
                help="instead: ms per step, whole and without the optimiser update, and %% of peak")
    a = ap.parse_args(argv)
    if a.epochs_of <= 64:
        ap.error("--epochs-of must be more than one batch (64 images)")
    xp = array_module(a.device)
    reuse_heap_memory()
    x, t, src = load_images(a.epochs_of)
    peak, sustained = gemm_peak(xp)
    try:
        import torch  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
    out = {"machine": platform.processor() or platform.machine(), "device": a.device, "images": len(x),
           "data": src, "gemm_peak_gflops": round(peak, 1), "gemm_median_gflops": round(sustained, 1), "nets": {}}
    print(f"float32 GEMM ({xp.__name__}): peak {peak:.1f} GFLOP/s, median {sustained:.1f}; "
          f"epoch = {len(x)} {src} images, batch 64")
    if a.breakdown:
        for name in ("lenet-300-100", "lenet-5"):
            ms = breakdown(name, x, t, xp)
            flops = train_flops(build_model(name, 0, xp), 64)
            pct = {k: 100 * flops / (v / 1e3) / 1e9 / peak for k, v in ms.items()}
            out["nets"][name] = {"ms_per_step": ms, "percent_of_peak": pct}
            parts = "; ".join(f"{k} {v:.3f} ms = {pct[k]:.1f}% of peak" for k, v in ms.items())
            print(f"{name:14s} per step: {parts}; update {ms['step'] - ms['forward+backward']:.3f} ms", flush=True)
    else:
        for name in ("lenet-300-100", "lenet-5"):
            sec, flops = bench_sparsenet(name, x, t, xp)
            rate = flops / sec / 1e9
            row = {"seconds": round(sec, 3), "gflops": round(rate, 2), "fraction_of_peak": round(rate / peak, 3),
                   "fraction_of_median_gemm": round(rate / sustained, 3)}
            line = (f"{name:14s} sparsenet {sec:7.2f} s/epoch  {rate:6.1f} GFLOP/s = {100 * rate / peak:5.1f}% of peak"
                    f" ({100 * rate / sustained:5.1f}% of median)")
            if a.device == "gpu":  # the same epoch with every step launched eagerly
                esec, _ = bench_sparsenet(name, x, t, xp, graphs=False)
                row.update(eager_seconds=round(esec, 3), graph_speedup=round(esec / sec, 3))
                line += f"   eager {esec:7.2f} s"
            if have_torch:
                tsec, tver, nthreads = bench_torch(name, x, t, a.device)
                row.update(torch_seconds=round(tsec, 3), torch_version=tver, torch_threads=nthreads,
                           time_ratio_sparsenet_over_torch=round(sec / tsec, 3))
                line += f"   torch {tsec:7.2f} s/epoch   ratio sparsenet/torch {sec / tsec:.2f}"
            out["nets"][name] = row
            print(line, flush=True)
    if a.json:
        from sparsenet.util import write_text_atomic

        write_text_atomic(a.json, json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
