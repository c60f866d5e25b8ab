"""Small shared helpers: the package's error type, atomic file writes, environment flags, progress."""
import contextlib
import importlib.util
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
    """Yield a temporary path beside ``path`` (same folder, so the final rename is atomic); on success
    rename it onto ``path``, on any exception remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.umask(umask := os.umask(0))
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
    """A tqdm bar on stderr, or None: disabled, tqdm missing, or stderr not a terminal (logs get lines)."""
    if not enabled or not sys.stderr.isatty() or importlib.util.find_spec("tqdm") is None:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, **kw)


def eta(s):
    """A time still to wait, in seconds, as a person says it: "~40 s", "~3 min", "~1.5 h"."""
    return f"~{max(s, 1):.0f} s" if s < 90 else f"~{s / 60:.0f} min" if s < 5400 else f"~{s / 3600:.1f} h"
