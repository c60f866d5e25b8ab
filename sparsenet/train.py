"""Dense training and evaluation: the loop behind ``sparsenet train`` and ``sparsenet eval``.

A run directory holds::

    config.json       the training configuration (TrainConfig)
    checkpoint.h5     the latest state, rewritten atomically after every epoch
    log.jsonl         one JSON object per finished epoch (rewritten atomically)

``resume`` reloads checkpoint.h5 — weights, masks, momentum, iteration count and the
NumPy RNG state — so on the CPU a resumed run continues bit-identically.
"""
import ctypes
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy

from . import data as D
from .backend import array_module, resolve_device, to_device
from .checkpoint import load_checkpoint, save_checkpoint
from .model import MODELS, build_model
from .optim import POLICIES, SGD
from .util import SparsenetError, write_text_atomic


@dataclasses.dataclass
class TrainConfig:
    """Training settings.

    Momentum, weight decay, batch size, initialisation and the ``inv`` policy follow
    Caffe's MNIST solver (PAPER.md). The default schedule differs (README, "Training
    defaults"): base lr 0.05, ×0.1 every 6,566 iterations (7 epochs at batch 64), 20
    epochs — on full MNIST it ends ~0.2–0.3 points below Caffe's 10,000-iteration ``inv``
    schedule for both LeNets. ``gamma=None`` means the policy's own default (step 0.1,
    inv 1e-4, as in Caffe's solvers).
    """

    model: str = "lenet-300-100"
    dataset: str = "mnist"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    l1: float = 0.0
    lr_policy: str = "step"
    gamma: float | None = None
    power: float = 0.75
    step_size: int = 6566
    seed: int = 0
    train_subset: int = 0  # use only the first N training images (0 = all); for tests/CI

    def validate(self):
        if self.model not in MODELS:
            raise SparsenetError(f"unknown model {self.model!r}: choose from {', '.join(MODELS)}")
        if self.dataset not in D.DATASETS:
            raise SparsenetError(f"unknown dataset {self.dataset!r}: choose from {', '.join(D.DATASETS)}")
        if self.lr_policy not in POLICIES:
            raise SparsenetError(f"unknown learning-rate policy {self.lr_policy!r}: choose from {', '.join(POLICIES)}")
        for key in ("epochs", "batch_size"):
            if int(getattr(self, key)) < 1:
                raise SparsenetError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.train_subset < 0:
            raise SparsenetError(f"train_subset must be >= 0, got {self.train_subset}")
        return self

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SparsenetError(f"unknown training settings: {', '.join(sorted(unknown))}")
        return cls(**d).validate()


DEFAULT_GAMMA = {"step": 0.1, "inv": 1e-4, "fixed": 0.0}


def make_optimizer(net, cfg):
    gamma = DEFAULT_GAMMA[cfg.lr_policy] if cfg.gamma is None else cfg.gamma
    return SGD(net.params(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
               l1=cfg.l1, policy=cfg.lr_policy, gamma=gamma, power=cfg.power, step_size=cfg.step_size)


def load_split(dataset, input_shape, xp, data_dir=None, train_subset=0, split="both"):
    """Images as float32 in [0, 1] shaped ``(N, *input_shape)`` and int64 labels, on ``xp``."""
    ds = D.load_dataset(dataset, data_dir)
    out = {}
    if split in ("both", "train"):
        x, y = ds.x_train, ds.y_train
        if train_subset:
            x, y = x[:train_subset], y[:train_subset]
        out["train"] = (to_device(D.to_float(x).reshape((-1,) + input_shape), xp), to_device(y, xp))
    if split in ("both", "test"):
        out["test"] = (to_device(D.to_float(ds.x_test).reshape((-1,) + input_shape), xp), to_device(ds.y_test, xp))
    return out


def reuse_heap_memory():
    """Keep freed large blocks in the heap (glibc only).

    Every step allocates activation-sized temporaries (MBs each). glibc returns such
    blocks to the kernel on free, so each step pays page faults to get them back; raising
    the mmap/trim thresholds keeps them in the process (LeNet-5 steps ~20% faster here).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
        libc.mallopt(M_TOP_PAD, 64 << 20)
    except (OSError, AttributeError):
        pass


def train_epoch(net, opt, x, t, batch_size, rng, progress=None):
    """One pass over ``(x, t)`` in a random order drawn from ``rng``.

    Returns ``(mean loss, training error)`` measured on the fly (the error of each batch's
    forward pass, before its update).
    """
    xp = net.xp
    n = len(x)
    perm = to_device(rng.permutation(n), xp)
    loss_sum = xp.zeros((), dtype=numpy.float64)
    wrong = xp.zeros((), dtype=numpy.int64)
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        xb, tb = x[idx], t[idx]
        loss, z = net.loss_and_backward(xb, tb)
        opt.step()
        loss_sum += loss * len(idx)
        wrong += (z.argmax(axis=1) != tb).sum()
        if progress is not None:
            progress.update(1)
    return float(loss_sum) / n, int(wrong) / n


def _progress_bar(total, desc, enabled):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="batch", leave=False, file=sys.stderr)


def train(run_dir, config=None, resume=False, data_dir=None, device=None, progress=True, epochs=None):
    """Train (or resume training) into ``run_dir``; returns the list of epoch log records.

    ``config`` is a :class:`TrainConfig` for a new run. With ``resume`` the configuration
    comes from the run's checkpoint, and ``epochs`` may raise the number of epochs.
    """
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.h5"
    xp = array_module(device)
    reuse_heap_memory()
    if resume:
        ck = load_checkpoint(ckpt_path, xp)
        cfg = TrainConfig.from_dict(ck.config)
        if epochs is not None:
            cfg.epochs = int(epochs)
            cfg.validate()
        net, start = ck.net, ck.epoch
        opt = make_optimizer(net, cfg)
        opt.iteration = int(ck.optimizer_state["iteration"])
        opt.velocity = ck.velocity
        rng = numpy.random.default_rng()
        rng.bit_generator.state = ck.rng_state
        log = _read_log(run_dir / "log.jsonl")[:start]
    else:
        if ckpt_path.exists():
            raise SparsenetError(f"{run_dir} already holds a run; continue it with --resume or choose another --out")
        cfg = (config or TrainConfig()).validate()
        net = build_model(cfg.model, cfg.seed, xp)
        opt = make_optimizer(net, cfg)
        rng = numpy.random.default_rng(cfg.seed)
        start, log = 0, []
    splits = load_split(cfg.dataset, net.input_shape, xp, data_dir, cfg.train_subset)
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    if xp is not numpy:  # dropout on the GPU draws from a CuPy generator (not checkpointed)
        net.dropout_rng = xp.random.default_rng(int(rng.integers(2**63)))
    (x, t), (xt, tt) = splits["train"], splits["test"]
    n_batches = -(-len(x) // cfg.batch_size)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        bar = _progress_bar(n_batches, f"{cfg.model} epoch {epoch + 1}/{cfg.epochs}", progress)
        try:
            loss, train_err = train_epoch(net, opt, x, t, cfg.batch_size, rng, bar)
        finally:
            if bar is not None:
                bar.close()
        if not numpy.isfinite(loss):
            raise SparsenetError(f"training diverged at epoch {epoch + 1} (loss {loss}); lower --lr")
        seconds = time.perf_counter() - t0
        test_err = net.error(xt, tt)
        rec = {"epoch": epoch + 1, "iteration": opt.iteration, "lr": opt.current_lr(), "loss": loss,
               "train_error": train_err, "test_error": test_err, "seconds": round(seconds, 3)}
        log.append(rec)
        save_checkpoint(ckpt_path, net, opt, rng, epoch + 1, dataclasses.asdict(cfg))
        write_text_atomic(run_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in log))
        if progress:
            print(f"epoch {epoch + 1}/{cfg.epochs}  loss {loss:.4f}  train err {100 * train_err:.2f}%  "
                  f"test err {100 * test_err:.2f}%  {seconds:.1f}s", file=sys.stderr)
    return log


def _read_log(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate(checkpoint, data_dir=None, device=None):
    """Test error and parameter counts of a checkpoint (the ``sparsenet eval`` record)."""
    xp = array_module(device)
    ck = load_checkpoint(checkpoint, xp)
    dataset = ck.config.get("dataset", "mnist")
    xt, tt = load_split(dataset, ck.net.input_shape, xp, data_dir, split="test")["test"]
    return {"checkpoint": str(checkpoint), "model": ck.net.name, "dataset": dataset, "epoch": ck.epoch,
            "device": resolve_device(device), "test_error": ck.net.error(xt, tt),
            "params": ck.net.count_params(), "nonzero_params": ck.net.count_nonzero()}
