import os

import numpy as np
import pytest

from sparsenet import backend
from sparsenet.util import SparsenetError


def test_default_device_is_cpu(monkeypatch):
    monkeypatch.delenv("SPARSENET_DEVICE", raising=False)
    assert backend.resolve_device() == "cpu"
    assert backend.array_module() is np


def test_env_and_argument_order(monkeypatch):
    monkeypatch.setenv("SPARSENET_DEVICE", "gpu")
    assert backend.resolve_device() == "gpu"
    assert backend.resolve_device("cpu") == "cpu"


def test_unknown_device(monkeypatch):
    with pytest.raises(SparsenetError, match="unknown device"):
        backend.resolve_device("tpu")


def test_gpu_without_cupy_is_one_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cupy(name, *a, **k):
        if name == "cupy" or name.startswith("cupy."):
            raise ImportError("No module named 'cupy'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    with pytest.raises(SparsenetError) as e:
        backend.array_module("gpu")
    assert "CuPy" in str(e.value) and "\n" not in str(e.value)


def test_get_array_module_and_transfers(xp):
    a = xp.arange(3.0)
    assert backend.get_array_module(a) is xp
    assert backend.get_array_module(np.zeros(1), a) is xp
    h = backend.asnumpy(a)
    assert isinstance(h, np.ndarray) and h.tolist() == [0.0, 1.0, 2.0]
    assert backend.get_array_module(backend.to_device(h, xp)) is xp


def test_runs_choose_blas_threads_like_the_command_line(monkeypatch):
    """A run started from Python computes with the thread count the CLI would use ($SPARSENET_THREADS, else 1),
    unless this process already chose one: the same config gives the same low bits either way."""
    from threadpoolctl import threadpool_info

    def blas_threads():
        return {d["num_threads"] for d in threadpool_info() if d.get("user_api") == "blas"}

    monkeypatch.setattr(backend, "_threads", None)
    monkeypatch.setenv("SPARSENET_THREADS", "2")
    assert backend.ensure_threads() == 2 and blas_threads() <= {2}
    monkeypatch.setenv("SPARSENET_THREADS", "1")
    assert backend.ensure_threads() == 2  # chosen once per process, as `--threads` does
    assert backend.set_threads(1) == 1 and backend.ensure_threads() == 1 and blas_threads() <= {1}
    monkeypatch.setattr(backend, "_threads", None)
    monkeypatch.delenv("SPARSENET_THREADS")
    assert backend.ensure_threads() == 1


def _blas_threads_after(code, **env):
    """BLAS thread counts threadpoolctl reports after ``code`` in a fresh interpreter with ``env`` (and none of the
    thread variables inherited from here)."""
    import json
    import subprocess
    import sys

    unset = ("SPARSENET_THREADS", "GOTO_NUM_THREADS", *backend.BLAS_ENV)
    clean = {k: v for k, v in os.environ.items() if k not in unset}
    report = "import json; from threadpoolctl import threadpool_info as i; " \
             "print(json.dumps([d['num_threads'] for d in i() if d['user_api'] == 'blas']))"
    out = subprocess.run([sys.executable, "-c", f"{code}\n{report}"], env={**clean, **env}, capture_output=True,
                         text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores to tell one BLAS thread from BLAS's default")
def test_import_sets_the_default_blas_threads():
    """`import sparsenet` alone gives a hand-written loop the command line's thread count; an explicit
    $SPARSENET_THREADS wins, and a BLAS variable set by the user is left to BLAS."""
    if _blas_threads_after("import numpy, scipy.linalg") != {2}:
        pytest.skip("BLAS does not start with two threads here: nothing to tell apart")
    assert _blas_threads_after("import sparsenet") == {1}
    assert _blas_threads_after("import sparsenet", SPARSENET_THREADS="2") == {2}
    assert _blas_threads_after("import sparsenet", OPENBLAS_NUM_THREADS="2") == {2}
    assert _blas_threads_after("import sparsenet", OPENBLAS_NUM_THREADS="2", SPARSENET_THREADS="1") == {1}
