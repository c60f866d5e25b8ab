"""SGD with momentum, L2 weight decay and an L1 term; Caffe's learning-rate policies.

The update (Caffe's convention), for every parameter W with mask M::

    g  = gW ⊙ M + λ₂·W + λ₁·sign(W)            (gW already masked by the layer)
    V ← μ·V + η_t·lr_mult·g
    W ← (W − V) ⊙ M

Because W, gW and V are all 0 at pruned positions (V is zeroed there when a weight is
pruned), every term of the update is 0 there; the final ``⊙ M`` re-asserts the invariant.
The L1/L2 terms therefore act on surviving weights only.

Learning-rate policies, with t the iteration count (starting at 0):

* ``fixed``: η_t = base_lr
* ``step``:  η_t = base_lr · γ^⌊t / step_size⌋
* ``inv``:   η_t = base_lr · (1 + γ·t)^(−power)      (Caffe's MNIST solver: γ=1e-4, power=0.75)
"""
import math

from .backend import get_array_module
from .util import SparsenetError

POLICIES = ("fixed", "step", "inv")


def learning_rate(policy, base_lr, t, gamma=1e-4, power=0.75, step_size=1):
    """η_t for one of :data:`POLICIES` (see the module docstring)."""
    if policy == "fixed":
        return base_lr
    if policy == "step":
        return base_lr * gamma ** (t // step_size)
    if policy == "inv":
        return base_lr * (1.0 + gamma * t) ** (-power)
    raise SparsenetError(f"unknown learning-rate policy {policy!r}: choose from {', '.join(POLICIES)}")


class SGD:
    """Momentum SGD over a dict of :class:`sparsenet.layers.Param`.

    State: ``velocity`` (one array per parameter) and ``iteration`` (t above).
    """

    def __init__(self, params, lr=0.01, momentum=0.9, weight_decay=5e-4, l1=0.0,
                 policy="inv", gamma=1e-4, power=0.75, step_size=1):
        for label, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("l1", l1)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise SparsenetError(f"{label} must be a finite number >= 0, got {v!r}")
        if momentum >= 1:
            raise SparsenetError(f"momentum must be < 1, got {momentum}")
        if policy == "step" and step_size < 1:
            raise SparsenetError(f"step_size must be >= 1, got {step_size}")
        learning_rate(policy, lr, 0, gamma, power, step_size)  # validates the policy name
        self.params = params
        self.lr, self.momentum, self.weight_decay, self.l1 = lr, momentum, weight_decay, l1
        self.policy, self.gamma, self.power, self.step_size = policy, gamma, power, step_size
        self.iteration = 0
        self.velocity = {k: get_array_module(p.data).zeros_like(p.data) for k, p in params.items()}
        self._scratch = {k: get_array_module(p.data).empty_like(p.data) for k, p in params.items()}

    def current_lr(self):
        return learning_rate(self.policy, self.lr, self.iteration, self.gamma, self.power, self.step_size)

    def step(self):
        """Apply one update to every parameter that has a gradient; advance t."""
        lr = self.current_lr()
        for k, p in self.params.items():
            g = p.grad
            if g is None:
                continue
            xp = get_array_module(p.data)
            tmp = self._scratch[k]
            if self.weight_decay and p.decay_mult:
                xp.multiply(p.data, self.weight_decay * p.decay_mult, out=tmp)
                g += tmp
            if self.l1 and p.decay_mult:
                xp.sign(p.data, out=tmp)
                tmp *= self.l1 * p.decay_mult
                g += tmp
            v = self.velocity[k]
            v *= self.momentum
            g *= lr * p.lr_mult
            v += g
            p.data -= v
            p.data *= p.mask
            p.grad = None
        self.iteration += 1

    def state_dict(self):
        """Hyper-parameters and t (JSON-able) — the velocity arrays are saved separately."""
        return {"lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
                "l1": self.l1, "policy": self.policy, "gamma": self.gamma, "power": self.power,
                "step_size": self.step_size, "iteration": self.iteration}
