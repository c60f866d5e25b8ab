"""NumPy/CuPy dispatch: with :mod:`sparsenet.cuda` (the GPU's own kernels) the only place that knows CuPy
exists, and it imports CuPy lazily.

Layer code calls :func:`get_array_module` on its arrays (as Chainer v1 does), so the same
lines run on NumPy (CPU) and CuPy (GPU). The device: ``--device``, else
``$SPARSENET_DEVICE``, else ``cpu``; BLAS threads: :func:`set_threads`.
"""
import importlib
import os

import numpy

from .util import SparsenetError

DEVICES = ("cpu", "gpu")


def get_array_module(*arrays):
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``."""
    for a in arrays:
        if type(a).__module__.split(".")[0] == "cupy":
            return importlib.import_module("cupy")
    return numpy


def resolve_device(device=None):
    """``device`` if given, else ``$SPARSENET_DEVICE``, else ``"cpu"``; validated."""
    device = (device or os.environ.get("SPARSENET_DEVICE") or "cpu").lower()
    if device not in DEVICES:
        raise SparsenetError(f"unknown device {device!r}: use one of {', '.join(DEVICES)}")
    return device


def array_module(device=None):
    """``numpy`` for cpu, ``cupy`` for gpu (a module passed in is returned as it is); a
    one-line error when CuPy is missing or sees no CUDA device."""
    if device is not None and not isinstance(device, str):
        return device
    if resolve_device(device) == "cpu":
        return numpy
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA install raising on import
        raise SparsenetError(
            f"--device gpu needs CuPy, which could not be imported ({type(e).__name__}: {e}); "
            "install the CuPy wheel for your CUDA version, e.g. pip install cupy-cuda12x "
            "(or pip install -e '.[gpu]' in a sparsenet checkout)") from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        raise SparsenetError(f"--device gpu: CuPy found no usable CUDA device ({e})") from None
    if n < 1:
        raise SparsenetError("--device gpu: CuPy found no CUDA device")
    return cupy


def device_name(xp):
    """``"cpu"`` for NumPy, ``"gpu"`` for CuPy."""
    return "cpu" if xp is numpy else "gpu"


def asnumpy(a):
    """Copy a CuPy array to the host; return NumPy arrays (and scalars) as NumPy arrays."""
    return a.get() if get_array_module(a) is not numpy else numpy.asarray(a)


def to_device(a, xp):
    """Move a host or device array onto the module ``xp`` (no copy if already there)."""
    return asnumpy(a) if xp is numpy else xp.asarray(a)


BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


def set_threads(n=None):
    """Limit BLAS to ``n`` threads for this process (through threadpoolctl); returns the count.

    ``n=None`` is the package's default: ``$SPARSENET_THREADS``, else BLAS's own setting when one of
    :data:`BLAS_ENV` (``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``, …) is set (left as it is), else 1.
    ``import sparsenet`` applies that default once (:func:`ensure_threads`), so runs started from Python, a
    hand-written loop included, compute like ``sparsenet`` commands; set one of those variables, call this
    function or threadpoolctl's ``threadpool_limits`` after the import to choose another count.

    One thread is the default because BLAS threads spin-wait: on a machine whose cores are
    busy with other jobs, two threads made a LeNet epoch up to 60× slower. Results depend
    on the thread count (sums in another order); :func:`blas_info` records it."""
    from threadpoolctl import threadpool_info, threadpool_limits

    global _threads
    if n is None and not os.environ.get("SPARSENET_THREADS") and any(os.environ.get(v) for v in BLAS_ENV):
        _threads = max((d["num_threads"] for d in threadpool_info() if d.get("user_api") == "blas"), default=1)
        return _threads
    n = n if n is not None else os.environ.get("SPARSENET_THREADS") or 1
    try:
        n = int(n)
    except ValueError:
        n = 0
    if n < 1:
        raise SparsenetError(f"threads must be a whole number >= 1, got {n!r} (--threads, $SPARSENET_THREADS)")
    threadpool_limits(n, user_api="blas")
    _threads = n
    return n


_threads = None


def ensure_threads(strict=True):
    """:func:`set_threads` with its default unless this process already chose a thread count: every run
    (command line or API) computes with the same number of BLAS threads, so the same config gives the
    same result whichever way it was started. Returns the count. ``import sparsenet`` calls it with
    ``strict=False``: a bad ``$SPARSENET_THREADS`` then waits for the first run (or command) to report it."""
    if _threads is not None:
        return _threads
    try:
        return set_threads()
    except SparsenetError:
        if strict:
            raise
        return None


def blas_info():
    """The BLAS library NumPy runs, its version, kernel family and thread count (results of
    a run depend on them), e.g. "openblas 0.3.31 (Haswell), 2 threads"; None if unknown."""
    from threadpoolctl import threadpool_info

    return "; ".join(f"{d.get('internal_api')} {d.get('version')} ({d.get('architecture')}), {d.get('num_threads')} "
                     "threads" for d in threadpool_info() if d.get("user_api") == "blas") or None


def cpu_model():
    """The processor's model name (Linux), else what :mod:`platform` says."""
    import platform

    try:
        lines = open("/proc/cpuinfo").read().splitlines()
        return next(l.split(":", 1)[1].strip() for l in lines if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
