"""Small shared helpers: the package's error type, the cast-and-check of values read from files,
atomic file writes, environment flags, progress."""
import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy


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


def checked_cast(a, dtype, what, exact=False):
    """``a`` (values read from a file or an import) converted to ``dtype`` and checked *after* the
    conversion, so nothing the run's dtype cannot hold gets through: every reader of stored values
    calls this one function.

    * float ``dtype``: the converted values are finite (1e300 read as float32 is inf: refused as out
      of range, NaN/inf as such); with ``exact`` they must also convert back to the stored values
      (masks: 1 + 1e-12 is not 1);
    * integer/bool ``dtype``: the stored values are whole numbers within the dtype's range (no
      wrap-around: 256 is not a uint8 0).

    Raises :class:`SparsenetError` ``"{what} …"`` on one line; NumPy's warnings are silenced."""
    a, dtype = numpy.asarray(a), numpy.dtype(dtype)
    if a.dtype.kind not in "biuf":
        raise SparsenetError(f"{what} has dtype {a.dtype}, expected numbers")
    with numpy.errstate(all="ignore"):
        if dtype.kind == "f":
            out = a.astype(dtype)
            bad = ~numpy.isfinite(out)
            if bad.any():
                v = a[bad].flat[0]
                raise SparsenetError(f"{what} holds NaN or infinite values" if not numpy.isfinite(v) else
                                     f"{what} holds {v:.4g}, outside the range of {dtype} (largest "
                                     f"{numpy.finfo(dtype).max:.4g})")
        else:
            if a.dtype.kind == "f" and not bool(numpy.all(numpy.isfinite(a) & (a == numpy.trunc(a)))):
                raise SparsenetError(f"{what} holds values that are not whole numbers (expected {dtype})")
            if a.size and dtype.kind != "b":
                lo, hi, info = a.min(), a.max(), numpy.iinfo(dtype)
                if lo < info.min or hi > info.max:
                    raise SparsenetError(f"{what} holds {lo if lo < info.min else hi}, outside the range of "
                                         f"{dtype} ({info.min}..{info.max})")
            out = a.astype(dtype)
        if (exact or dtype.kind == "b") and not numpy.array_equal(out.astype(a.dtype), a):
            raise SparsenetError(f"{what} holds values that {dtype} cannot hold exactly")
    return out


def _first_missing(folder):
    """The outermost of ``folder`` and its parents that does not exist yet (None if ``folder`` exists)."""
    folder, top = Path(folder).absolute(), None
    while not folder.exists():
        folder, top = folder.parent, folder
    return top


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path`` (same folder, so the final rename is atomic); on success
    rename it onto ``path``, on any exception remove it and the folders made for it."""
    path = Path(path)
    made = _first_missing(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as e:
        _remove(made)
        raise SparsenetError(f"{path}: cannot write there ({e.strerror or e})") from None
    os.close(fd)
    os.umask(umask := os.umask(0))
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private (0600); give it a normal file's mode
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except OSError as e:  # e.g. a folder of that name: one line, the temporary file removed below
            raise SparsenetError(f"{path}: cannot write there ({'a folder is in the way' if path.is_dir() else e.strerror or e})") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _remove(made)
        raise


def _remove(path):
    """Remove a file or a folder tree if it exists."""
    if path is None:
        return
    if Path(path).is_dir() and not Path(path).is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def new_output(folder, discard=lambda: True):
    """For a command that fills an output ``folder``: when the block raises :class:`SparsenetError` and
    ``discard()`` says the folder holds nothing worth keeping yet, remove everything the block created
    there (the folder too, and parents, if it made them); what was there before stays."""
    folder = Path(folder)
    made = _first_missing(folder)
    before = set(folder.iterdir()) if made is None and folder.is_dir() else set()
    try:
        yield
    except SparsenetError:
        if discard():
            if made is not None:
                _remove(made)
            elif folder.is_dir():
                for p in set(folder.iterdir()) - before:
                    _remove(p)
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
