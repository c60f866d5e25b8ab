"""A trainable array that owns its mask: the one place where the pruning rule lives.

The rule: where the 0/1 mask ``M`` is 0, the value *and every optimiser state array*
(``state["momentum"]``, …) are exactly 0, and a mask only loses ones. Only
:meth:`Param._assign` sets a mask; :meth:`~Param.prune` narrows it, :meth:`~Param.take`
keeps rows/columns of everything together (§3.5), :meth:`~Param.load` installs arrays read
from a file after checking the rule (never deriving a mask from the values: a survivor at
0.0 stays a connection). :meth:`~Param.zero_pruned` re-asserts the rule after an update
with a select, not a product (NaN·0 = NaN in a diverging run).
"""
import numpy

from .backend import get_array_module
from .util import SparsenetError


class Param:
    """``data`` (the value W), ``grad`` (dL/dW ⊙ M of the last backward pass, or None),
    ``mask`` (read-only: 1 kept, 0 pruned; ``data``'s shape and dtype), ``state`` (the
    optimiser's arrays), ``prunable`` (weights yes, biases no), and Caffe's ``lr_mult`` /
    ``decay_mult`` (multipliers of the learning rate and of the regularisation)."""

    __slots__ = ("data", "grad", "_mask", "_keep", "state", "prunable", "lr_mult", "decay_mult")

    def __init__(self, data, prunable=True, lr_mult=1.0, decay_mult=1.0):
        self.prunable, self.lr_mult, self.decay_mult, self.grad = prunable, lr_mult, decay_mult, None
        self._assign(data, get_array_module(data).ones_like(data), {})

    def _assign(self, data, mask, state, check=False):
        """Install value, mask and state together (the only code that sets a mask). With ``check``
        the rule is verified first and a violation raises :class:`SparsenetError`, changing nothing."""
        if check:
            _check(data, mask, state)
        self.data, self._mask, self.state = data, mask, dict(state)
        # the mask as bits (ones where kept) for zero_pruned's select; None when nothing is pruned
        xp, pruned = get_array_module(mask), mask == 0
        bits = numpy.dtype(f"u{data.dtype.itemsize}")
        self._keep = xp.where(pruned, 0, numpy.iinfo(bits).max).astype(bits) if bool(pruned.any()) else None

    @property
    def mask(self):
        return self._mask

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
        self._assign(self.data, mask, self.state)
        self.zero_pruned()
        return before, self.nonzero()

    def take(self, index, axis):
        """Keep entries ``index`` along ``axis`` of value, mask, state and gradient (§3.5); row-major."""
        xp = get_array_module(self.data)

        def cut(a):
            return None if a is None else xp.ascontiguousarray(xp.take(a, index, axis=axis))

        self._assign(cut(self.data), cut(self._mask), {k: cut(v) for k, v in self.state.items()})
        self.grad = cut(self.grad)

    def load(self, data, mask, state=None):
        """Install arrays read from a file, after checking shapes and the rule."""
        for what, a in (("value", data), ("mask", mask), *(((k, v) for k, v in (state or {}).items()))):
            if tuple(a.shape) != tuple(self.data.shape):
                raise SparsenetError(f"{what} has shape {tuple(a.shape)}, expected {tuple(self.data.shape)}")
        if not self.prunable and not bool(get_array_module(mask).all(mask == 1)):
            raise SparsenetError("a parameter that is not prunable has pruned entries")
        self._assign(data, mask, state or {}, check=True)
        self.grad = None

    def cast(self, dtype):
        """Convert value, mask, state and gradient to ``dtype`` (e.g. float64 for gradient checks)."""
        def conv(a):
            return None if a is None else a.astype(dtype)

        self._assign(conv(self.data), conv(self._mask), {k: conv(v) for k, v in self.state.items()})
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
        """Raise :class:`SparsenetError` if the rule is broken (the mask is not 0/1, or a
        value or state entry is non-zero where pruned)."""
        _check(self.data, self._mask, self.state)

    @property
    def size(self):
        return int(self.data.size)

    def nonzero(self):
        """Number of surviving entries (mask ones): connections, whatever their value."""
        return int(get_array_module(self._mask).count_nonzero(self._mask))


def _check(data, mask, state):
    xp = get_array_module(data)
    if not bool(xp.all((mask == 0) | (mask == 1))):
        raise SparsenetError("mask holds values other than 0 and 1")
    pruned = mask == 0
    for what, a in (("value", data), *state.items()):
        if bool(xp.any(a[pruned] != 0)):
            raise SparsenetError(f"{what} is non-zero at a pruned position")
