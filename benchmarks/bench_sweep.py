"""sparsenet sweep on Dask: serial against a LocalCluster, side by side in one run.

Reports, all from this one run on this machine:

* the wall time of one study of 16 LeNet-300-100 tasks (4 seeds × dense, han, one-shot, global at one
  kept fraction; ``--train-subset`` images) run serially in this process and on a LocalCluster of
  ``--workers`` single-threaded worker processes, and their ratio, with and without the cluster's start;
* that both gave bit-identical task results (test errors, weights left);
* Dask's scheduling overhead per task: ``--empty`` tasks that do nothing, independent and in a chain
  (each waiting for the one before);
* per worker: how many times it read MNIST (``sparsenet.data`` keeps each data set once per process)
  and its peak resident memory (``ru_maxrss``).

Usage::

    SPARSENET_DATA=… python benchmarks/bench_sweep.py [--workers 2] [--train-subset 4000] [--epochs 2]
                                                      [--empty 200] [--json OUT.json]
"""
import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import sparsenet
from sparsenet import data

SWEEP = sys.modules["sparsenet.sweeps"]


def nothing(*_):
    """An empty task."""
    return None


def worker_stats():
    """(MNIST reads, peak RSS in MiB) of this process."""
    return data._float_images.cache_info().misses, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def overhead(client, n):
    """Seconds per task of ``n`` empty tasks: independent (submitted at once), and chained."""
    t0 = time.perf_counter()
    client.gather(client.map(nothing, range(n), pure=False))
    independent = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    f = client.submit(nothing, pure=False)
    for _ in range(n - 1):
        f = client.submit(nothing, f, pure=False)
    f.result()
    return independent, (time.perf_counter() - t0) / n


def main():
    import logging

    from distributed import Client, LocalCluster

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--train-subset", type=int, default=4000)
    ap.add_argument("--epochs", type=int, default=2, help="dense epochs; the iterative methods: 2 rounds of 1")
    ap.add_argument("--empty", type=int, default=200, help="empty tasks for the overhead")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    spec = {"name": "bench", "train": {"epochs": a.epochs, "train_subset": a.train_subset, "lr_policy": "fixed"},
            "retrain": {"lr": 0.01, "lr_policy": "fixed"}, "rounds": 2, "epochs": 1, "seeds": 4,
            "methods": ["han", "one-shot", "global"], "densities": [0.1]}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        serial = sparsenet.sweep(spec, Path(tmp, "serial"), serial=True, progress=False)
        t_serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        with LocalCluster(n_workers=a.workers, threads_per_worker=1, dashboard_address=None,
                          silence_logs=logging.CRITICAL) as cluster, Client(cluster, set_as_default=False) as client:
            t_start = time.perf_counter() - t0
            t1 = time.perf_counter()
            par = sparsenet.sweep(spec, Path(tmp, "cluster"), scheduler=client, progress=False)
            t_cluster = time.perf_counter() - t1
            per_worker = client.run(worker_stats)
            independent, chained = overhead(client, a.empty)
    keys = ("test_error", "weights_left", "layers", "epochs")
    same = [{k: r[k] for k in keys} for r in serial["tasks"]] == [{k: r[k] for k in keys} for r in par["tasks"]]
    n = len(serial["tasks"])
    out = {"tasks": n, "workers": a.workers, "train_subset": a.train_subset, "serial_s": round(t_serial, 2),
           "cluster_s": round(t_cluster, 2), "cluster_start_s": round(t_start, 2),
           "ratio": round(t_cluster / t_serial, 3), "ratio_with_start": round((t_cluster + t_start) / t_serial, 3),
           "same_numbers": same, "overhead_per_task_s": {"independent": round(independent, 4),
                                                         "chained": round(chained, 4)},
           "workers_mnist_reads_peak_rss_mib": {w: [reads, round(rss)] for w, (reads, rss) in per_worker.items()},
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"}
    print(f"{n} LeNet-300-100 tasks ({a.train_subset} images): serial {t_serial:.1f} s, LocalCluster of {a.workers} "
          f"workers {t_cluster:.1f} s (+{t_start:.1f} s to start): {out['ratio']:.2f}x the serial time "
          f"({out['ratio_with_start']:.2f}x with the start); same numbers: {same}")
    print(f"scheduling overhead per empty task: {1000 * independent:.1f} ms independent, "
          f"{1000 * chained:.1f} ms chained")
    for w, (reads, rss) in per_worker.items():
        print(f"worker {w}: read MNIST {reads} time(s), peak RSS {rss:.0f} MiB")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
