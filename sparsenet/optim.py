"""SGD with momentum, L2 weight decay and an L1 term (§3.1); Caffe's learning-rate policies.

The update (Caffe's convention), for every parameter W with mask M::

    g  = gW ⊙ M + λ₂·W + λ₁·sign(W)            (gW already masked by the layer)
    V ← μ·V + η_t·lr_mult·g
    W ← W − V,  then W and V set to 0 where M = 0

W, gW and V are 0 at pruned positions, so every term is 0 there (L1/L2 act on survivors
only); the select (:meth:`sparsenet.param.Param.zero_pruned`) re-asserts it even after NaN.
V lives with its parameter (``Param.state["momentum"]``).

Trained quantisation (Han, Mao & Dally 2016, Deep Compression §3): a shared parameter (:meth:`Param.share
<sparsenet.param.Param.share>`) has kept weights ``W_i = c_{I_i}`` (codebook c, codes I), so
``∂W_i/∂c_k = [I_i = k]`` and, by the chain rule over every kept weight,

    ∂L/∂c_k = Σ_i g_i · ∂W_i/∂c_k = Σ_{i: M_i = 1, I_i = k} g_i

with g the per-weight gradient above (regularisation included: λ₂W and λ₁sign(W) are the
gradients of λ₂/2·ΣW² and λ₁·Σ|W| over the kept weights). The codebook then takes the same
step, ``V_c ← μ·V_c + η_t·lr_mult·∂L/∂c``, ``c ← c − V_c`` (V_c:
``Param.codebook_state["momentum"]``), and W is re-derived as ``c[I] ⊙ M``. Pruned weights are left out of the sum (a
select, so even a NaN there adds nothing); the per-weight V is left as it was.

Learning-rate policies, with t the iteration count (starting at 0):

* ``fixed``: η_t = base_lr
* ``step``:  η_t = base_lr · γ^⌊t / step_size⌋       (γ defaults to 0.1)
* ``inv``:   η_t = base_lr · (1 + γ·t)^(−power)      (γ defaults to 1e-4; Caffe's MNIST solver)

The step policy's length is ``step_epochs`` (epochs; :func:`sparsenet.engine.train_epoch` tells the
optimiser how many batches an epoch of its data has, so ``step_size = round(step_epochs · batches per
epoch)`` follows ``batch_size`` and ``train_subset``) or ``step_size`` (iterations, as Caffe's solver
sets it): one of the two, the other None. The defaults are in epochs (7 for dense training, 2 for
retraining: 6,566 and 1,876 iterations on MNIST's 60,000 images at batch 64, 938 batches an epoch).

:data:`SETTINGS` is the one vocabulary of optimiser settings: the training config, the
pruning schedules, the command-line flags and :class:`SGD` all use these names.
"""
import math

import numpy

from . import cuda
from .backend import get_array_module
from .util import SparsenetError, whole

POLICIES = ("fixed", "step", "inv")
DEFAULT_GAMMA = {"step": 0.1, "inv": 1e-4, "fixed": 0.0}
SETTINGS = ("lr", "lr_policy", "gamma", "power", "step_size", "step_epochs", "momentum", "weight_decay", "l1")


def learning_rate(policy, base_lr, t, gamma=None, power=0.75, step_size=1):
    """η_t for one of :data:`POLICIES` (see the module docstring)."""
    if policy not in POLICIES:
        raise SparsenetError(f"unknown learning-rate policy {policy!r}: choose from {', '.join(POLICIES)}")
    gamma = DEFAULT_GAMMA[policy] if gamma is None else gamma
    if policy == "step":
        return base_lr * gamma ** (t // step_size)
    if policy == "inv":
        return base_lr * (1.0 + gamma * t) ** (-power)
    return base_lr


def check_settings(s, where=""):
    """Validate a dict holding :data:`SETTINGS`; returns it. Raises one line naming ``where``."""
    where = f"{where}: " if where else ""
    for key in ("lr", "momentum", "weight_decay", "l1", "power"):
        v = s[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise SparsenetError(f"{where}{key} must be a finite number >= 0, got {v!r}")
    if s["momentum"] >= 1:
        raise SparsenetError(f"{where}momentum must be < 1, got {s['momentum']}")
    if s["lr_policy"] not in POLICIES:
        raise SparsenetError(f"{where}unknown lr_policy {s['lr_policy']!r} (choose from {', '.join(POLICIES)})")
    g = s["gamma"]
    if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0):
        raise SparsenetError(f"{where}gamma must be a finite number >= 0 (or null for the policy's default), got {g!r}")
    size, epochs = s.get("step_size"), s.get("step_epochs")
    if size is not None:
        whole(size, f"{where}step_size", 1)
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, float))
                               or not math.isfinite(epochs) or epochs <= 0):
        raise SparsenetError(f"{where}step_epochs must be a number > 0 (or null), got {epochs!r}")
    if size is not None and epochs is not None:
        raise SparsenetError(f"{where}the step policy's length is step_epochs ({epochs}) or step_size ({size} "
                             "iterations), not both: set the other to null")
    if s["lr_policy"] == "step" and size is None and epochs is None:
        raise SparsenetError(f"{where}the step policy needs step_epochs or step_size")
    return s


def layered(*dicts):
    """Settings dicts merged left to right, where a dict that gives the step policy's length one way
    (``step_size`` or ``step_epochs``) and not the other replaces the other's value from the dicts before it:
    a round's ``step_size`` overrides the default ``step_epochs``."""
    out = {}
    for d in dicts:
        out.update(d)
        for key, other in (("step_size", "step_epochs"), ("step_epochs", "step_size")):
            if d.get(key) is not None and other not in d:
                out[other] = None
    return out


class SGD:
    """Momentum SGD over a dict of :class:`sparsenet.param.Param`; its own state is the
    iteration count t (:meth:`state_dict` / :meth:`load_state_dict`).

    ``batches_per_epoch``: the epoch's length in iterations, which turns ``step_epochs`` into iterations;
    :func:`sparsenet.engine.train_epoch` sets it from its data, so it is needed only by loops of their own."""

    def __init__(self, params, lr=0.01, momentum=0.9, weight_decay=5e-4, l1=0.0, lr_policy="inv",
                 gamma=None, power=0.75, step_size=None, step_epochs=None, batches_per_epoch=None):
        self.settings = check_settings({"lr": lr, "lr_policy": lr_policy, "gamma": gamma, "power": power,
                                        "step_size": step_size, "step_epochs": step_epochs, "momentum": momentum,
                                        "weight_decay": weight_decay, "l1": l1})
        self.params, self.iteration, self.batches_per_epoch = params, 0, batches_per_epoch
        self._lr, self._fused, self._scales = None, None, None

    @classmethod
    def from_settings(cls, params, settings, batches_per_epoch=None):
        """An optimiser from any dict holding the :data:`SETTINGS` keys (others ignored; a missing
        ``step_epochs``, as in configs written before it existed, is None)."""
        return cls(params, **{k: settings.get(k) if k == "step_epochs" else settings[k] for k in SETTINGS},
                   batches_per_epoch=batches_per_epoch)

    def step_size(self):
        """Iterations per step of the step policy: ``step_size``, or ``step_epochs`` epochs of
        ``batches_per_epoch`` batches."""
        s = self.settings
        if s["step_size"] is not None:
            return s["step_size"]
        if self.batches_per_epoch is None:
            raise SparsenetError("the step policy in epochs (step_epochs) needs the epoch's length: train with "
                                 "sparsenet.engine.train_epoch, or give SGD batches_per_epoch (or a step_size)")
        return max(1, round(s["step_epochs"] * self.batches_per_epoch))

    def current_lr(self):
        s = self.settings
        return learning_rate(s["lr_policy"], s["lr"], self.iteration, s["gamma"], s["power"],
                             self.step_size() if s["lr_policy"] == "step" else 1)

    def step(self):
        """Apply one update to every parameter that has a gradient; advance t."""
        self.stage()
        self.apply()
        self.advance()

    def stage(self):
        """Fix η_t for the next :meth:`apply`. On the GPU also copy each parameter's η_t·lr_mult into the
        device buffer that the fused update kernel reads (a recorded CUDA graph reads it there too)."""
        self._lr = lr = self.current_lr()
        params = list(self.params.values())
        on_gpu = bool(params) and get_array_module(params[0].data) is not numpy  # a network lives on one device
        self._fused = [cuda.fusable(p) for p in params] if on_gpu else None
        if on_gpu and any(self._fused):
            if self._scales is None:
                self._scales = cuda.Upload(len(self.params))
            self._scales.send([lr * p.lr_mult for p in self.params.values()])

    def advance(self):
        """t ← t + 1 (after the step's :meth:`apply`)."""
        self.iteration += 1

    def apply(self):
        """The update of the module docstring with the η_t of the last :meth:`stage`; clears the gradients.
        On the GPU a float32 parameter takes it in one kernel (:func:`sparsenet.cuda.sgd_update`, the same
        float32 arithmetic op for op); the lines below are the reference."""
        s, lr = self.settings, self._lr
        for slot, p in enumerate(self.params.values()):
            g = p.grad
            if g is None:
                continue
            if self._fused and self._fused[slot]:
                cuda.sgd_update(p, s, self._scales.device, slot)
                p.grad = None
                continue
            xp = get_array_module(p.data)
            if s["weight_decay"] and p.decay_mult:
                g += p.data * (s["weight_decay"] * p.decay_mult)
            if s["l1"] and p.decay_mult:
                g += xp.sign(p.data) * (s["l1"] * p.decay_mult)
            if p.codebook is not None:  # shared values: the step goes to the codebook (module docstring)
                vc = p.codebook_state.get("momentum")
                if vc is None:
                    vc = p.codebook_state["momentum"] = xp.zeros_like(p.codebook)
                vc *= s["momentum"]
                vc += p.codebook_grad(g) * (lr * p.lr_mult)
                p.move_codebook(vc)
                p.grad = None
                continue
            v = p.state.get("momentum")
            if v is None:
                v = p.state["momentum"] = xp.zeros_like(p.data)
            v *= s["momentum"]
            g *= lr * p.lr_mult
            v += g
            p.data -= v
            if p.prunable:
                p.zero_pruned()
            p.grad = None

    def state_dict(self):
        """Settings and t (JSON-able)."""
        return {**self.settings, "iteration": self.iteration}

    def load_state_dict(self, d):
        """Restore t from :meth:`state_dict`'s output (the settings stay this optimiser's)."""
        t = d.get("iteration") if isinstance(d, dict) else None
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise SparsenetError(f"optimiser state has no valid iteration count: {d!r}")
        self.iteration = t
