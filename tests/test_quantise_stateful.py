"""Any sequence of share / train / prune / neuron-removal / save-load / cast steps keeps both
rules of sparsenet.param.Param (hypothesis.stateful):

* pruned entries of every value and momentum are exactly 0, and masks only lose ones
  (positions tracked by identity through neuron removal);
* a shared weight is ``codebook[codes] ⊙ M`` exactly, with at most 2^bits distinct non-zero
  values, and a training step moves its codebook as trained quantisation says;
* a loaded network equals the saved one bit for bit: values, masks, codebooks, codes, momenta.
"""

import numpy
from hypothesis import settings, strategies as st
from hypothesis.stateful import invariant, rule

from sparsenet import pruning as P
from sparsenet.checkpoint import load_checkpoint, save_checkpoint
from sparsenet.optim import SGD
from sparsenet.quantise import share_weights

from test_pruning import conv_spec
from test_pruning_stateful import NetMachine


def _bits(a, like):
    """``a`` in ``like``'s dtype, as raw bytes (bit-for-bit comparisons; -0.0 ≠ 0.0)."""
    return numpy.asarray(a).astype(like.dtype).tobytes()


class QuantiseMachine(NetMachine):
    def __init__(self):
        super().__init__()
        self.bits = {}

    # -- operations ---------------------------------------------------------------------
    @rule(data=st.data())
    def share(self, data):
        layers = P.prunable_layers(self.net)
        bits = data.draw(st.one_of(st.integers(1, 8), st.dictionaries(
            st.sampled_from(layers + ["default"]), st.integers(1, 8), min_size=1)))
        before = {n: (p.data.copy(), p.mask.copy()) for n, p in self.net.params().items()}
        sizes = share_weights(self.net, bits)
        for name, K in sizes.items():
            b = bits if isinstance(bits, int) else bits.get(name[:-2], bits.get("default"))
            assert K <= 2 ** b
            self.bits[name] = b
        for n, p in self.net.params().items():
            assert numpy.array_equal(p.mask, before[n][1])
            if n not in sizes:
                assert numpy.array_equal(p.data, before[n][0])

    @rule(lr=st.floats(1e-3, 0.3), momentum=st.floats(0.0, 0.95), wd=st.sampled_from([0.0, 1e-4, 1e-2]),
          l1=st.sampled_from([0.0, 1e-4, 1e-2]), steps=st.integers(1, 3))
    def train(self, lr, momentum, wd, l1, steps):
        opt = SGD(self.net.params(), lr=lr, momentum=momentum, weight_decay=wd, l1=l1, lr_policy="fixed")
        for _ in range(steps):
            params = self.net.params()
            before = {n: (p.data.astype(numpy.float64),  # copies: SGD updates momenta in place
                          p.state.get("momentum", numpy.zeros_like(p.data)).astype(numpy.float64), p.codebook,
                          numpy.array(p.codebook_state.get("momentum", 0.0), dtype=numpy.float64))
                      for n, p in params.items()}
            self.net.loss_and_backward(self.x, self.t)
            G = {n: p.grad.astype(numpy.float64) for n, p in params.items()}
            opt.step()
            for n, p in params.items():
                W0, V0, c0, Vc0 = before[n]
                keep = p.mask == 1
                g = G[n] + p.decay_mult * (wd * W0 + l1 * numpy.sign(W0))
                if c0 is None:
                    v = momentum * V0 + lr * p.lr_mult * g
                    numpy.testing.assert_allclose(p.data[keep], (W0 - v)[keep], rtol=1e-4, atol=1e-6)
                    numpy.testing.assert_allclose(p.state["momentum"][keep], v[keep], rtol=1e-4, atol=1e-6)
                    continue
                gc = numpy.array([g[keep & (p.codes == k)].sum() for k in range(c0.size)])  # ∂L/∂c_k
                v = momentum * Vc0 + lr * p.lr_mult * gc
                numpy.testing.assert_allclose(p.codebook, c0 - v, rtol=1e-4, atol=1e-5)
                numpy.testing.assert_allclose(p.codebook_state["momentum"], v, rtol=1e-4, atol=1e-5)
                if "momentum" in p.state:  # the per-weight momentum is not used while shared
                    assert numpy.array_equal(p.state["momentum"], V0)

    @rule(amount=st.one_of(st.floats(0.0, 0.99), st.fixed_dictionaries({"default": st.floats(0.0, 0.9)})))
    def prune(self, amount):
        self.prune_or_refuse("percentile", amount)

    @rule()
    def remove_dead_neurons(self):
        y0 = self.net.forward(self.x)
        P.remove_dead_neurons(self.net)
        numpy.testing.assert_allclose(self.net.forward(self.x), y0, rtol=1e-4, atol=1e-5)

    @rule(dtype=st.sampled_from([numpy.float32, numpy.float64]))
    def cast(self, dtype):
        for p in self.net.params().values():
            p.cast(dtype)

    @rule()
    def save_and_load(self):
        path = self.dir / "ck.h5"
        save_checkpoint(path, self.net, SGD(self.net.params()), numpy.random.default_rng(0), 1, {"dataset": "mnist"})
        net = load_checkpoint(path).net
        for n, p in self.net.params().items():
            q = net.params()[n]
            assert q.data.dtype == numpy.float32  # files hold float32; a float64 network comes back float32
            pairs = [(p.data, q.data), (p.mask, q.mask), (p.state.get("momentum", numpy.zeros_like(p.data)),
                                                          q.state["momentum"])]
            if p.codebook is None:
                assert q.codebook is None and q.codes is None and q.codebook_state == {}, n
            else:
                Vc = p.codebook_state.get("momentum", numpy.zeros_like(p.codebook))
                pairs += [(p.codebook, q.codebook), (p.codes, q.codes), (Vc, q.codebook_state["momentum"])]
            for a, b in pairs:
                assert _bits(a, b) == b.tobytes(), n
            q.state["ids"] = p.state["ids"].astype(numpy.float32)
        self.net = net

    # -- invariants ---------------------------------------------------------------------
    @invariant()
    def both_rules_hold(self):
        P.check_masks(self.net)  # Param.check: the pruning rule and the sharing rule
        for n, p in self.net.params().items():
            pruned = p.mask == 0
            assert not p.data[pruned].any() and not p.state.get("momentum", 0 * p.data)[pruned].any()
            if p.codebook is None:
                assert n not in self.bits, f"{n} lost its codebook"
                continue
            assert p.codes.dtype == numpy.uint8 and numpy.all(p.codes < p.codebook.size)
            assert numpy.array_equal(p.data, numpy.where(pruned, 0, p.codebook[p.codes])), n
            assert p.codebook.size <= 2 ** self.bits[n]
            assert numpy.unique(p.data[p.data != 0]).size <= 2 ** self.bits[n], n


TestQuantiseMLP = QuantiseMachine.TestCase
TestQuantiseCNN = type("ConvQuantiseMachine", (QuantiseMachine,), {"spec": conv_spec(pad2=1)}).TestCase
for case, examples, steps in ((TestQuantiseMLP, 40, 20), (TestQuantiseCNN, 20, 15)):
    case.settings = settings(max_examples=examples, stateful_step_count=steps, deadline=None)
