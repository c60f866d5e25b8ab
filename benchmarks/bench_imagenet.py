"""One training iteration (forward, backward, SGD update) of AlexNet or VGG-16: time and peak memory.

    python benchmarks/bench_imagenet.py --model vgg-16 --batch 32             # CPU: seconds, peak RSS
    python benchmarks/bench_imagenet.py --model alexnet --batch 128 --device gpu --torch

Prints one JSON object per model. ``peak_rss_gb`` is the process's peak resident memory (the
whole process: Python, the network's weights, masks, momentum, activations, workspaces).
With ``--torch`` the same shapes run in PyTorch (if installed; eager mode, cuDNN on the GPU),
side by side in this process, and the ratio sparsenet / PyTorch is reported.
"""
import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sparsenet.backend import array_module, set_threads  # noqa: E402
from sparsenet.engine import reuse_heap_memory  # noqa: E402
from sparsenet.model import build_model  # noqa: E402
from sparsenet.optim import SGD  # noqa: E402


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def sync(xp):
    if xp is not numpy:
        xp.cuda.Device().synchronize()


def time_steps(step, sync_fn, repeat):
    step()  # warm-up (allocations, kernels compiled)
    sync_fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        sync_fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def sparsenet_step(model, batch, xp):
    net = build_model(model, seed=0, xp=xp)
    opt = SGD(net.params(), lr=0.001, momentum=0.9, weight_decay=5e-4, lr_policy="fixed")
    rng = numpy.random.default_rng(0)
    x = xp.asarray(rng.standard_normal((batch, *net.input_shape), dtype=numpy.float32))
    t = xp.asarray(rng.integers(0, 1000, batch))

    def step():
        net.loss_and_backward(x, t)
        opt.step()
    return step


def torch_step(model, batch, device):
    import torch
    from torch import nn

    def convs(plan):
        layers, c = [], 3
        for spec in plan:
            if spec == "M":
                layers.append(nn.MaxPool2d(2, 2))
            elif spec == "M3":
                layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
            elif spec == "N":
                layers.append(nn.LocalResponseNorm(5, 1e-4, 0.75, 1.0))
            else:
                out, k, s, p, g = spec
                layers += [nn.Conv2d(c, out, k, s, p, groups=g), nn.ReLU(inplace=True)]
                c = out
        return layers

    if model == "alexnet":
        feats, n_in, size = convs([(96, 11, 4, 0, 1), "N", "M3", (256, 5, 1, 2, 2), "N", "M3", (384, 3, 1, 1, 1),
                                   (384, 3, 1, 1, 2), (256, 3, 1, 1, 2), "M3"]), 9216, 227
    else:
        plan = []
        for width, n in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
            plan += [(width, 3, 1, 1, 1)] * n + ["M"]
        feats, n_in, size = convs(plan), 25088, 224
    net = nn.Sequential(*feats, nn.Flatten(), nn.Linear(n_in, 4096), nn.ReLU(True), nn.Dropout(0.5),
                        nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(4096, 1000)).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), t).backward()
        opt.step()
    sync_fn = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return step, sync_fn


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", choices=("alexnet", "vgg-16"))
    ap.add_argument("--batch", type=int, action="append", help="batch size per model (default alexnet 128, vgg 32)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--torch", action="store_true", help="also time PyTorch on the same shapes")
    a = ap.parse_args()
    models = a.model or ["alexnet", "vgg-16"]
    batches = a.batch or [{"alexnet": 128, "vgg-16": 32}[m] for m in models]
    threads = set_threads(a.threads)
    reuse_heap_memory()
    xp = array_module(a.device)
    for model, batch in zip(models, batches):
        r = {"model": model, "batch": batch, "device": a.device, "threads": threads}
        step = sparsenet_step(model, batch, xp)
        r["sparsenet_s"] = round(time_steps(step, lambda: sync(xp), a.repeat), 4)
        del step
        r["peak_rss_gb"] = round(peak_rss_gb(), 2)
        if xp is not numpy:
            r["gpu_pool_gb"] = round(xp.get_default_memory_pool().total_bytes() / 2**30, 2)
            xp.get_default_memory_pool().free_all_blocks()
        if a.torch:
            try:
                import torch
                torch.set_num_threads(threads)
                step, sync_fn = torch_step(model, batch, "cuda" if a.device == "gpu" else "cpu")
                r["torch_s"] = round(time_steps(step, sync_fn, a.repeat), 4)
                r["ratio"] = round(r["sparsenet_s"] / r["torch_s"], 2)
                del step
                if a.device == "gpu":
                    torch.cuda.empty_cache()
            except ImportError:
                r["torch_s"] = None
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
