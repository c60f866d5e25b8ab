"""HDF5 checkpoints: weights, masks, momentum, RNG states, the run's state and its log.

Layout (readable with h5py alone; the container is :mod:`sparsenet.h5io`)::

    /                       attrs (text as fixed-length ASCII bytes):
                                   format="sparsenet-checkpoint", version=1,
                                   network (JSON: Network.spec()), config (JSON),
                                   epoch (int), optimizer (JSON: SGD.state_dict(), or null),
                                   rng (JSON: the data-order generator's state, or null),
                                   dropout_rng (JSON, optional: the dropout generator's state)
    /params/<layer.param>   float32 values, pruned entries exactly 0
    /masks/<layer.param>    uint8, 1 = connection kept, 0 = pruned
    /velocity/<layer.param> float32 momentum (absent for a bare model)
    /codebooks/<layer.param>          float32 (K,), K ≤ 256: the shared values of a shared parameter
    /codes/<layer.param>              uint8, the value's shape: each weight's index into its codebook
                                      (0 where pruned); value = codebook[codes] ⊙ mask exactly
    /codebook_velocity/<layer.param>  float32 (K,): the codebook's momentum (with an optimiser)
    /log                    optional, uint8: the run's log as JSON lines (UTF-8)

The three shared-value groups (weight sharing, :mod:`sparsenet.quantise`) are optional and
hold only shared parameters, so the version stays 1: files without them load as before, and
a reader that predates them loads a shared network's values as plain (unshared) weights.

The run engine keeps its state in ``config`` and its log in ``/log``: one rename commits
both. Loading checks the description (:func:`sparsenet.model.check_spec`) and each stored
shape against it before building anything, then finite values, the pruning rule and the
sharing rule (:mod:`sparsenet.param`; a file breaking one is rejected, never repaired);
errors are one line naming the file.
"""
import json
from pathlib import Path

import numpy

from . import h5io
from .backend import asnumpy, to_device
from .model import build_network, check_spec
from .util import SparsenetError

FORMAT, VERSION = "sparsenet-checkpoint", 1


def save_checkpoint(path, net, optimizer=None, rng=None, epoch=0, config=None, log=None):
    """Write ``net`` (and optionally optimiser/RNG state and a run log) to ``path`` atomically; with
    ``optimizer`` the parameters' momentum is saved (zeros where none exists yet). A network that
    breaks the pruning rule (:func:`sparsenet.pruning.check_masks`) is refused, nothing written."""
    from .pruning import check_masks

    check_masks(net)
    with h5io.create(path) as f:
        for key, value in (("format", FORMAT), ("network", json.dumps(net.spec())),
                           ("config", json.dumps(config or {})),
                           ("optimizer", json.dumps(optimizer.state_dict() if optimizer else None)),
                           ("rng", json.dumps(rng.bit_generator.state if rng is not None else None))):
            h5io.set_text(f, key, value)
        f.attrs["version"], f.attrs["epoch"] = VERSION, int(epoch)
        if isinstance(net.dropout_rng, numpy.random.Generator):
            h5io.set_text(f, "dropout_rng", json.dumps(net.dropout_rng.bit_generator.state))
        for name, p in net.params().items():
            h5io.write_dataset(f, f"params/{name}", asnumpy(p.data))
            h5io.write_dataset(f, f"masks/{name}", asnumpy(p.mask).astype(numpy.uint8))
            if optimizer is not None:
                v = p.state.get("momentum")
                h5io.write_dataset(f, f"velocity/{name}",
                                   asnumpy(v) if v is not None else numpy.zeros_like(asnumpy(p.data)))
            if p.codebook is not None:
                c = asnumpy(p.codebook)
                h5io.write_dataset(f, f"codebooks/{name}", c)
                h5io.write_dataset(f, f"codes/{name}", asnumpy(p.codes))
                if optimizer is not None:
                    v = p.codebook_state.get("momentum")
                    h5io.write_dataset(f, f"codebook_velocity/{name}",
                                       asnumpy(v) if v is not None else numpy.zeros_like(c))
        if log is not None:
            text = "".join(json.dumps(r) + "\n" for r in log).encode()
            h5io.write_dataset(f, "log", numpy.frombuffer(text, dtype=numpy.uint8), compress=True)


class Checkpoint:
    """What :func:`load_checkpoint` returns: ``net`` (momentum in its parameters' state)
    plus the saved run state; :meth:`rng` is the data-order generator as saved (or None)."""

    def __init__(self, net, config, epoch, optimizer_state, rng_state, log, path):
        self.net, self.config, self.epoch = net, config, epoch
        self.optimizer_state, self.rng_state, self.log = optimizer_state, rng_state, log
        self._rng = _generator(numpy.random.default_rng(), rng_state, path)

    def rng(self):
        return self._rng


def _generator(gen, state, path):
    """``gen`` set to a generator state read from a file (None when there is none)."""
    if state is None:
        return None
    try:
        gen.bit_generator.state = state
    except (TypeError, ValueError, KeyError) as e:
        raise SparsenetError(f"{path}: bad generator state ({e})") from None
    return gen


def load_checkpoint(path, xp=numpy):
    """Read a checkpoint written by :func:`save_checkpoint` onto the array module ``xp`` (checks: module doc)."""
    path = Path(path)
    with h5io.open_file(path, "checkpoint") as f:
        if h5io.text_attr(f, "format") != FORMAT:
            raise SparsenetError(f"{path}: not a sparsenet checkpoint (format tag missing)")
        if f.attrs.get("version") != VERSION:
            raise SparsenetError(f"{path}: checkpoint version {f.attrs.get('version')} is not supported "
                                 f"(expected {VERSION})")
        spec, config, opt_state, rng_state = (h5io.json_attr(f, k, path, "checkpoint")
                                              for k in ("network", "config", "optimizer", "rng"))
        if not isinstance(config, dict):
            raise SparsenetError(f"{path}: attribute 'config' is not a JSON object")
        try:
            shapes = check_spec(spec)
        except SparsenetError as e:
            raise SparsenetError(f"{path}: bad network description: {e}") from None
        for name, shape in shapes.items():  # what the description declares is what is stored
            got = getattr(f.get(f"params/{name}"), "shape", None)
            if got != shape:
                raise SparsenetError(f"{path}: dataset 'params/{name}' " + (
                    "is missing" if got is None else f"has shape {got}, the network description declares {shape}"))
        net = build_network(spec, xp=xp)
        for name, p in net.params().items():
            W = h5io.read_array(f, f"params/{name}", path, p.data.shape, kinds="f", dtype=numpy.float32)
            M = h5io.read_array(f, f"masks/{name}", path, p.data.shape, kinds="uifb", dtype=numpy.float32, exact=True)
            state = {}
            if opt_state is not None:
                state["momentum"] = to_device(
                    h5io.read_array(f, f"velocity/{name}", path, p.data.shape, kinds="f", dtype=numpy.float32), xp)
            shared = {}
            if f"codebooks/{name}" in f or f"codes/{name}" in f:
                c = h5io.read_array(f, f"codebooks/{name}", path, kinds="f", dtype=numpy.float32)
                shared = {"codebook": to_device(c, xp), "codes": to_device(
                    h5io.read_array(f, f"codes/{name}", path, p.data.shape, kinds="u"), xp)}
                if opt_state is not None:
                    shared["codebook_state"] = {"momentum": to_device(h5io.read_array(
                        f, f"codebook_velocity/{name}", path, kinds="f", dtype=numpy.float32), xp)}
            try:
                p.load(to_device(W, xp), to_device(M, xp), state, **shared)
            except SparsenetError as e:
                raise SparsenetError(f"{path}: {name}: {e}") from None
        if "dropout_rng" in f.attrs and isinstance(net.dropout_rng, numpy.random.Generator):
            _generator(net.dropout_rng, h5io.json_attr(f, "dropout_rng", path), path)
        log = None
        if "log" in f:
            try:
                log = [json.loads(line)
                       for line in bytes(h5io.read_array(f, "log", path, kinds="u")).decode().splitlines()]
            except ValueError as e:
                raise SparsenetError(f"{path}: the stored run log is not JSON lines ({e})") from None
        epoch = f.attrs.get("epoch", 0)
        if isinstance(epoch, numpy.ndarray) and epoch.shape == (1,):
            epoch = epoch[0]
        if not isinstance(epoch, int | numpy.integer) or epoch < 0:
            raise SparsenetError(f"{path}: attribute 'epoch' is {epoch!r}, expected a whole number >= 0")
    return Checkpoint(net, config, int(epoch), opt_state, rng_state, log, path)
