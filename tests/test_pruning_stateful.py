"""Any sequence of train / prune / save-load / dropout / freeze / neuron-removal steps keeps
the pruning invariants (hypothesis.stateful):

* every pruned weight is exactly 0, and so is the momentum at pruned positions;
* no mask ever regains an entry (positions are tracked by identity through removals);
* surviving weights are never forced to 0: a prune leaves survivors' values untouched,
  and a training step moves each survivor exactly as the unmasked SGD update says.
"""
import math
import shutil
import tempfile
from pathlib import Path

import numpy
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sparsenet import pruning as P
from sparsenet.checkpoint import load_checkpoint, save_checkpoint
from sparsenet.model import build_network
from sparsenet.optim import SGD
from sparsenet.util import SparsenetError

from test_pruning import MLP, conv_spec


def _amounts(criterion):
    if criterion == "quality":
        return st.one_of(st.floats(0.0, 2.0), st.fixed_dictionaries({"default": st.floats(0.0, 1.5)}))
    if criterion == "percentile":
        return st.one_of(st.floats(0.0, 0.99), st.fixed_dictionaries({"default": st.floats(0.0, 0.9)}))
    return st.floats(0.0, 0.99)


class NetMachine(RuleBasedStateMachine):
    """A network built from ``spec``, a small batch, each position's identity carried as a state array,
    and a scratch folder: the common ground of the pruning and quantisation state machines."""
    spec = MLP

    def __init__(self):
        super().__init__()
        self.net = build_network(self.spec, seed=0)
        rng = numpy.random.default_rng(0)
        self.x = rng.random((16, *self.net.input_shape), dtype=numpy.float32)
        self.t = rng.integers(0, 3, 16)
        # identity of every position, carried through neuron removal like the momentum: a
        # state array of the parameter (Param.take slices all of them together)
        for p in self.net.params().values():
            p.state["ids"] = numpy.arange(p.size, dtype=numpy.float32).reshape(p.data.shape)
        self.alive = self._alive()
        self.dir = Path(tempfile.mkdtemp(prefix="sparsenet-sm-"))

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def prune_or_refuse(self, criterion, amount):
        """Prune; survivors keep their values. An amount that would empty a layer is refused and changes nothing."""
        before = {n: (p.data.copy(), p.mask.copy()) for n, p in self.net.params().items()}
        try:
            P.prune(self.net, criterion, amount)
        except SparsenetError as e:
            assert "prunes every weight of" in str(e)
            assert all(numpy.array_equal(p.data, before[n][0]) and numpy.array_equal(p.mask, before[n][1])
                       for n, p in self.net.params().items())
            return
        for n, p in self.net.params().items():
            keep = p.mask == 1
            assert numpy.array_equal(p.data[keep], before[n][0][keep])

    def _alive(self):
        return {n: set(p.state["ids"][p.mask == 1].astype(numpy.int64).tolist()) for n, p in self.net.params().items()}

    @invariant()
    def masks_never_regain_entries(self):
        alive = self._alive()
        for n, ids in alive.items():
            assert ids <= self.alive[n], f"{n}: a pruned position came back"
        self.alive = alive


class PruningMachine(NetMachine):
    def _optimizer(self, **kw):
        return SGD(self.net.params(), lr_policy="fixed", **kw)

    def _momentum(self, p):
        return p.state.get("momentum", numpy.zeros_like(p.data))

    # -- operations ---------------------------------------------------------------------
    @rule(lr=st.floats(1e-3, 0.3), momentum=st.floats(0.0, 0.95),
          wd=st.sampled_from([0.0, 1e-4, 1e-2]), l1=st.sampled_from([0.0, 1e-4, 1e-2]), steps=st.integers(1, 3))
    def train(self, lr, momentum, wd, l1, steps):
        opt = self._optimizer(lr=lr, momentum=momentum, weight_decay=wd, l1=l1)
        for _ in range(steps):
            params = self.net.params()
            W0 = {n: p.data.astype(numpy.float64) for n, p in params.items()}
            V0 = {n: self._momentum(p).astype(numpy.float64) for n, p in params.items()}
            self.net.loss_and_backward(self.x, self.t)
            G = {n: None if p.grad is None else p.grad.astype(numpy.float64) for n, p in params.items()}
            opt.step()
            for n, p in params.items():
                keep = p.mask == 1
                if G[n] is None:  # frozen: untouched
                    assert numpy.array_equal(p.data, W0[n].astype(numpy.float32))
                    continue
                g = G[n] + p.decay_mult * (wd * W0[n] + l1 * numpy.sign(W0[n]))
                v = momentum * V0[n] + lr * p.lr_mult * g
                expect = W0[n] - v
                numpy.testing.assert_allclose(p.data[keep], expect[keep], rtol=1e-4, atol=1e-6)
                numpy.testing.assert_allclose(p.state["momentum"][keep], v[keep], rtol=1e-4, atol=1e-6)

    @rule(data=st.data(), criterion=st.sampled_from(P.CRITERIA))
    def prune(self, data, criterion):
        self.prune_or_refuse(criterion, data.draw(_amounts(criterion)))

    @rule()
    def save_and_load(self):
        path = self.dir / "ck.h5"
        opt = self._optimizer()
        save_checkpoint(path, self.net, opt, numpy.random.default_rng(0), 1, {"dataset": "mnist"})
        ck = load_checkpoint(path)
        for p, q in zip(self.net.params().values(), ck.net.params().values()):
            assert numpy.array_equal(p.data, q.data) and numpy.array_equal(p.mask, q.mask)
            assert numpy.array_equal(self._momentum(p), q.state["momentum"])
            q.state["ids"] = p.state["ids"]
        frozen = [l.name for l in self.net.layers if l.frozen]
        self.net = ck.net
        self.net.freeze(frozen)

    @precondition(lambda self: any(l.kind == "dropout" for l in self.net.layers))
    @rule(rate=st.floats(0.0, 0.9))
    def set_dropout(self, rate):
        drop = next(l for l in self.net.layers if l.kind == "dropout")
        drop.rate = rate

    @rule()
    def adjust_dropout(self):
        rates = P.adjust_dropout(self.net)
        for name, rate in rates.items():
            drop = self.net.layer(name)
            assert 0.0 <= rate <= drop.base_rate and rate == drop.rate

    @rule()
    def remove_dead_neurons(self):
        y0 = self.net.forward(self.x)
        P.remove_dead_neurons(self.net)
        numpy.testing.assert_allclose(self.net.forward(self.x), y0, rtol=1e-4, atol=1e-5)
        for p in self.net.params().values():
            assert all(a.shape == p.data.shape for a in (p.mask, *p.state.values()))

    @rule(data=st.data())
    def freeze(self, data):
        names = [l.name for l in self.net.layers if l.params]
        self.net.freeze(data.draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names) - 1)))

    @rule(data=st.data())
    def zero_a_survivor(self, data):
        """A survivor passing through exactly 0 stays a survivor (masks never come from W == 0)."""
        params = [p for p in self.net.params().values() if p.prunable and p.nonzero()]
        if not params:
            return
        p = data.draw(st.sampled_from(params))
        i = data.draw(st.integers(0, p.nonzero() - 1))
        pos = numpy.flatnonzero(p.mask)[i]
        p.data.flat[pos] = 0.0
        assert p.mask.flat[pos] == 1

    # -- invariants ---------------------------------------------------------------------
    @invariant()
    def pruned_weights_and_momentum_are_zero(self):
        P.check_masks(self.net)

    @invariant()
    def dropout_rate_is_valid(self):
        for l in self.net.layers:
            if l.kind == "dropout":
                assert 0.0 <= l.rate < 1.0 and not math.isnan(l.rate)


class ConvPruningMachine(PruningMachine):
    spec = conv_spec(pad2=1)


TestPruningMLP = PruningMachine.TestCase
TestPruningMLP.settings = settings(max_examples=40, stateful_step_count=20, deadline=None)
TestPruningCNN = ConvPruningMachine.TestCase
TestPruningCNN.settings = settings(max_examples=25, stateful_step_count=15, deadline=None)
