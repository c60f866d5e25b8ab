"""Small shared helpers: the package's error type, atomic file writes, environment flags."""
import contextlib
import os
import sys
import tempfile
from pathlib import Path


def env_flag(name):
    """Whether environment variable ``name`` is set to anything but "", "0" or "false"."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false")


class SparsenetError(Exception):
    """An error a user can act on. The CLI prints its message on one line, no traceback."""


def whole(v, what, low=0):
    """``v`` if it is an int (not a bool) >= ``low``, else a one-line error about ``what``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise SparsenetError(f"{what} must be a whole number >= {low}, got {v!r}")
    return v


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The temporary file lives in the same directory, so the final ``os.replace`` is an
    atomic rename: a reader (or a crash) sees either the old file or the new one, never
    a half-written one. On any exception the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private (0600); give it a normal file's mode
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path, text):
    """Write ``text`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def progress_bar(total, desc, unit="batch", enabled=True, **kw):
    """A tqdm progress bar on stderr, or None (disabled, or tqdm missing)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, **kw)
