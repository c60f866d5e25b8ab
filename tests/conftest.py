"""Shared pytest configuration: the ``xp`` array-module fixture and hypothesis profiles."""
import os

import numpy
import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=25, deadline=None)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs only with CuPy and a CUDA device")
    config.addinivalue_line("markers", "mnist: needs the MNIST files (SPARSENET_DATA); skipped without "
                            "them, an error under CI")
    # Tests never download: the loader then reads only file:// URLs (the loader tests'
    # local mirrors), here and in the `sparsenet` commands the tests start.
    os.environ["SPARSENET_OFFLINE"] = "1"


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: only the tests that will run count
def pytest_collection_modifyitems(config, items):
    from sparsenet.data import DATASETS, _find, resolve_data_dir
    from sparsenet.util import env_flag

    need = [item for item in items if item.get_closest_marker("mnist")]
    where = resolve_data_dir() / "mnist"
    if not need or all(_find(name, [where]) for name in DATASETS["mnist"].files):
        return
    if env_flag("CI"):
        raise pytest.UsageError(f"CI: MNIST not found at {where.absolute()} (SPARSENET_DATA); "
                                f"{len(need)} tests would be skipped")
    skip = pytest.mark.skip(reason=f"MNIST not found at {where} (set SPARSENET_DATA)")
    for item in need:
        item.add_marker(skip)
    config.mnist_skipped = (len(need), where)


def pytest_terminal_summary(terminalreporter, config):
    """Say plainly how many skips are the MNIST tests (the others are the CuPy cases)."""
    if getattr(config, "mnist_skipped", None):
        n, where = config.mnist_skipped
        terminalreporter.write_line(f"note: {n} tests that need MNIST were skipped: no MNIST at {where.absolute()}; "
                                    "run `sparsenet reproduce lenet-300-100` once, or set SPARSENET_DATA")


def _cupy_or_skip():
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA install raising on import
        pytest.skip(f"CuPy not importable ({type(e).__name__}: {e})")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        pytest.skip(f"CuPy sees no usable CUDA device ({e})")
    if n < 1:
        pytest.skip("CuPy sees no CUDA device")
    return cupy


# Session scope: hypothesis' @given refuses function-scoped fixtures (they would not be
# reset between examples); a module object is stateless, so sharing it is harmless.
@pytest.fixture(scope="session", params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array module under test: ``numpy``, or ``cupy`` (skipped without a GPU)."""
    if request.param == "numpy":
        return numpy
    return _cupy_or_skip()


class Killed(Exception):
    """Raised by :func:`kill_training` in place of a training epoch: a run killed mid-way."""


@pytest.fixture
def kill_training(monkeypatch):
    """``kill_training(n)``: the n-th call of ``engine.train_epoch`` from now raises :class:`Killed`;
    ``kill_training(None)``: the real one again."""
    from sparsenet import engine

    real = engine.train_epoch

    def arm(n):
        calls = []

        def dying(*a, **k):
            calls.append(1)
            if len(calls) == n:
                raise Killed
            return real(*a, **k)
        monkeypatch.setattr(engine, "train_epoch", real if n is None else dying)
    return arm


@pytest.fixture
def external_scheduler(tmp_path):
    """A ``dask scheduler`` and one ``dask worker --nthreads 1`` on 127.0.0.1, started as subprocesses (each in
    its own process group) and always torn down; yields the scheduler's address."""
    import contextlib
    import json
    import signal
    import subprocess
    import sys
    import time

    from distributed import Client

    file, procs = tmp_path / "scheduler.json", []
    common = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=tmp_path)
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0",
                                       "--no-dashboard", "--scheduler-file", str(file)], **common))
        deadline, address = time.monotonic() + 90, None
        while address is None and time.monotonic() < deadline:  # the scheduler writes the file in pieces
            with contextlib.suppress(OSError, ValueError, KeyError):
                address = json.loads(file.read_text())["address"]
            time.sleep(0.1)
        assert address, "dask scheduler did not start within 90 s"
        procs.append(subprocess.Popen([sys.executable, "-m", "dask", "worker", address, "--nthreads", "1",
                                       "--nworkers", "1", "--no-dashboard"], **common))
        with Client(address, timeout=90, set_as_default=False) as c:  # slow starts on a loaded machine
            c.wait_for_workers(1, timeout=120)
        yield address
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
