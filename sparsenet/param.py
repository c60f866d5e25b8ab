"""A trainable array that owns its mask: the one place where the pruning rule lives.

The rule: where the 0/1 mask ``M`` is 0, the value *and every optimiser state array*
(``state["momentum"]``, …) are exactly 0, and a mask only loses ones. Only
:meth:`Param._assign` sets a mask; :meth:`~Param.prune` narrows it, :meth:`~Param.take`
keeps rows/columns of everything together (§3.5), :meth:`~Param.load` installs arrays read
from a file after checking the rule (never deriving a mask from the values: a survivor at
0.0 stays a connection). :meth:`~Param.zero_pruned` re-asserts the rule after an update
with a select, not a product (NaN·0 = NaN in a diverging run).

Weight sharing (Deep Compression's trained quantisation) is a second rule owned here: a
shared parameter holds a ``codebook`` c (K ≤ 256 finite values, the value's dtype), uint8
``codes`` I (the value's shape, 0 where pruned) and the codebook's optimiser state
``codebook_state`` ((K,) arrays); then ``W = c[I] ⊙ M`` exactly, so a layer has at most K
distinct non-zero values. :meth:`~Param.share` installs them, :meth:`~Param.move_codebook`
updates c and re-derives W; prune, take, cast and load keep the rule, and only
:meth:`Param._assign` sets a codebook or codes. Per-weight ``state`` is kept but unused
while shared (SGD moves the codebook).
"""
import numpy

from .backend import get_array_module
from .util import SparsenetError


class Param:
    """``data`` (the value W), ``grad`` (dL/dW ⊙ M of the last backward pass, or None),
    ``mask`` (read-only: 1 kept, 0 pruned; ``data``'s shape and dtype), ``state`` (the
    optimiser's arrays), ``prunable`` (weights yes, biases no), Caffe's ``lr_mult`` /
    ``decay_mult`` (multipliers of the learning rate and of the regularisation), and for a shared
    parameter ``codebook``, ``codes`` (read-only) and ``codebook_state`` (else None, None, {})."""

    __slots__ = ("data", "grad", "_mask", "_keep", "state", "prunable", "lr_mult", "decay_mult",
                 "_codebook", "_codes", "codebook_state")

    def __init__(self, data, prunable=True, lr_mult=1.0, decay_mult=1.0):
        self.prunable, self.lr_mult, self.decay_mult, self.grad = prunable, lr_mult, decay_mult, None
        self._assign(data, get_array_module(data).ones_like(data), {})

    def _assign(self, data, mask, state, codebook=None, codes=None, codebook_state=None, check=False):
        """Install value, mask, state and shared values together (the only code that sets a mask, a
        codebook or codes). With ``check`` the rules are verified first and a violation raises
        :class:`SparsenetError`, changing nothing."""
        if check:
            _check(data, mask, state, codebook, codes, codebook_state or {})
        same_mask = mask is getattr(self, "_mask", None)  # then _keep stands (a codebook step)
        self.data, self._mask, self.state = data, mask, dict(state)
        self._codebook, self._codes, self.codebook_state = codebook, codes, dict(codebook_state or {})
        if same_mask:
            return
        # the mask as bits (ones where kept) for zero_pruned's select; None when nothing is pruned
        xp, pruned = get_array_module(mask), mask == 0
        bits = numpy.dtype(f"u{data.dtype.itemsize}")
        self._keep = xp.where(pruned, 0, numpy.iinfo(bits).max).astype(bits) if bool(pruned.any()) else None

    @property
    def mask(self):
        """The 0/1 mask, read-only: a NumPy view that refuses writes, a copy on CuPy (which has no
        read-only arrays). Only this class's methods change a mask (module docstring)."""
        return _read_only(self._mask)

    @property
    def codebook(self):
        """The shared values (read-only, as :attr:`mask`), or None."""
        return _read_only(self._codebook)

    @property
    def codes(self):
        """Each weight's index into the codebook (read-only, as :attr:`mask`), or None."""
        return _read_only(self._codes)

    def share(self, codebook, codes):
        """Share values: install ``codebook`` (K ≤ 256 values) and ``codes`` (integers < K, this
        shape; set to 0 where pruned) and set ``W = codebook[codes] ⊙ M`` (a select: exactly 0
        where pruned). The codebook's optimiser state starts empty."""
        xp = get_array_module(self.data)
        codebook, codes = xp.asarray(codebook, dtype=self.data.dtype), xp.asarray(codes)
        if codebook.ndim != 1 or tuple(codes.shape) != tuple(self.data.shape) or codes.dtype.kind not in "ui":
            raise SparsenetError(f"share takes a 1-D codebook and integer codes of shape {tuple(self.data.shape)}")
        codes = xp.where(self._mask == 1, codes, 0)
        if bool(xp.any((codes < 0) | (codes >= codebook.size))):
            raise SparsenetError(f"a code is outside the codebook's {codebook.size} entries")
        codes = codes.astype(numpy.uint8)
        data = xp.where(self._mask == 1, codebook[codes], codebook.dtype.type(0))
        self._assign(data, self._mask, self.state, codebook, codes, {}, check=True)

    def codebook_grad(self, g):
        """dL/dc_k = Σ over kept weights i with code k of g_i (``g`` = dL/dW), as the codebook's dtype."""
        xp = get_array_module(self.data)
        w = xp.where(self._mask == 1, g, 0).ravel()  # a select: NaN at a pruned position adds nothing
        c = xp.bincount(self._codes.ravel(), weights=w, minlength=self._codebook.size)
        return c.astype(self._codebook.dtype)

    def move_codebook(self, step):
        """``c ← c − step``, then ``W ← c[I] ⊙ M`` in place (a select, NaN-proof)."""
        c = (self._codebook - step).astype(self._codebook.dtype, copy=False)
        self._assign(self.data, self._mask, self.state, c, self._codes, self.codebook_state)
        self.data[...] = self._codebook[self._codes]
        self.zero_pruned()

    def prune(self, keep):
        """Narrow the mask to ``M ⊙ keep`` (``keep``: 0/1 or bool, this shape); zero the
        value and every state array at the newly pruned positions. Returns the number of
        survivors before and after."""
        if not self.prunable:
            raise SparsenetError("this parameter is not prunable")
        xp = get_array_module(self.data)
        if tuple(keep.shape) != tuple(self.data.shape):
            raise SparsenetError(f"pruning mask of shape {tuple(keep.shape)} for a parameter of shape "
                                 f"{tuple(self.data.shape)}")
        before = self.nonzero()
        mask = self._mask * xp.asarray(keep, dtype=self._mask.dtype)
        codes = None if self._codes is None else self._codes * (mask != 0)  # code 0 where pruned
        self._assign(self.data, mask, self.state, self._codebook, codes, self.codebook_state)
        self.zero_pruned()
        return before, self.nonzero()

    def take(self, index, axis):
        """Keep entries ``index`` along ``axis`` of value, mask, state, codes and gradient (§3.5); row-major."""
        xp = get_array_module(self.data)

        def cut(a):
            return None if a is None else xp.ascontiguousarray(xp.take(a, index, axis=axis))

        self._assign(cut(self.data), cut(self._mask), {k: cut(v) for k, v in self.state.items()},
                     self._codebook, cut(self._codes), self.codebook_state)
        self.grad = cut(self.grad)

    def load(self, data, mask, state=None, codebook=None, codes=None, codebook_state=None):
        """Install arrays read from a file, after checking shapes and the rules (shared if ``codebook``)."""
        for what, a in (("value", data), ("mask", mask), *(((k, v) for k, v in (state or {}).items())),
                        *((("codes", codes),) if codes is not None else ())):
            if tuple(a.shape) != tuple(self.data.shape):
                raise SparsenetError(f"{what} has shape {tuple(a.shape)}, expected {tuple(self.data.shape)}")
        if not self.prunable and not bool(get_array_module(mask).all(mask == 1)):
            raise SparsenetError("a parameter that is not prunable has pruned entries")
        self._assign(data, mask, state or {}, codebook, codes, codebook_state, check=True)
        self.grad = None

    def cast(self, dtype):
        """Convert value, mask, state, codebook, its state and gradient to ``dtype`` (e.g. float64 for
        gradient checks); codes stay uint8."""
        def conv(a):
            return None if a is None else a.astype(dtype)

        self._assign(conv(self.data), conv(self._mask), {k: conv(v) for k, v in self.state.items()},
                     conv(self._codebook), self._codes, {k: conv(v) for k, v in self.codebook_state.items()})
        self.grad = conv(self.grad)

    def zero_pruned(self):
        """``W[M = 0] ← 0`` and likewise for every state array: a select, NaN-proof, done as one
        bitwise AND of the values' bits with the mask's bit pattern (as fast as ``W ⊙ M``)."""
        if self._keep is None:
            return
        xp = get_array_module(self.data)
        for a in (self.data, *self.state.values()):  # state arrays have the value's dtype
            xp.bitwise_and(a.view(self._keep.dtype), self._keep, out=a.view(self._keep.dtype))

    def check(self):
        """Raise :class:`SparsenetError` if a rule is broken (the mask is not 0/1, a value or state
        entry is non-zero where pruned, or the shared values do not match: module docstring)."""
        _check(self.data, self._mask, self.state, self._codebook, self._codes, self.codebook_state, self._keep)

    @property
    def size(self):
        return int(self.data.size)

    def nonzero(self):
        """Number of surviving entries (mask ones): connections, whatever their value."""
        return int(get_array_module(self._mask).count_nonzero(self._mask))


def _read_only(a):
    """A view of ``a`` that cannot be written (NumPy), or a copy (CuPy), or None."""
    if a is None or get_array_module(a) is not numpy:
        return None if a is None else a.copy()
    v = a.view()
    v.flags.writeable = False
    return v


def _check(data, mask, state, codebook=None, codes=None, codebook_state=None, keep=False):
    """The rules of the module docstring; ``keep`` (when not False) is the mask's bit pattern that
    :meth:`Param.zero_pruned` applies (None: nothing pruned), which must agree with ``mask``."""
    xp = get_array_module(data)
    if not bool(xp.all((mask == 0) | (mask == 1))):
        raise SparsenetError("mask holds values other than 0 and 1")
    if keep is not False and not bool(xp.all((mask != 0) == (True if keep is None else keep != 0))):
        raise SparsenetError("mask disagrees with the connections the parameter holds (was the mask written "
                             "to in place? masks change only through Param's methods)")
    pruned = mask == 0
    for what, a in (("value", data), *state.items()):
        if bool(xp.any(a[pruned] != 0)):
            raise SparsenetError(f"{what} is non-zero at a pruned position")
    if codebook is None and codes is None:
        if codebook_state:
            raise SparsenetError("codebook state without a codebook")
        return
    if codebook is None or codes is None:
        raise SparsenetError("codes without a codebook" if codebook is None else "a codebook without codes")
    if codebook.ndim != 1 or not 1 <= codebook.size <= 256 or codebook.dtype != data.dtype:
        raise SparsenetError(f"codebook of shape {tuple(codebook.shape)} and dtype {codebook.dtype}: expected 1 "
                             f"to 256 values of dtype {data.dtype}")
    if not bool(xp.all(xp.isfinite(codebook))):
        raise SparsenetError("codebook holds NaN or infinite values")
    if codes.dtype != numpy.uint8 or tuple(codes.shape) != tuple(data.shape):
        raise SparsenetError(f"codes of dtype {codes.dtype} and shape {tuple(codes.shape)}: expected uint8 of "
                             f"shape {tuple(data.shape)}")
    if bool(xp.any(codes >= codebook.size)):
        raise SparsenetError(f"a code is >= the codebook's size {codebook.size}")
    if bool(xp.any(codes[pruned] != 0)):
        raise SparsenetError("a code is non-zero at a pruned position")
    if bool(xp.any(data != xp.where(pruned, 0, codebook[codes]))):
        raise SparsenetError("value differs from codebook[code] at a kept position")
    for what, a in codebook_state.items():
        if tuple(a.shape) != tuple(codebook.shape):
            raise SparsenetError(f"codebook {what} has shape {tuple(a.shape)}, expected {tuple(codebook.shape)}")
