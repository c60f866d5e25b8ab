"""Networks: an ordered stack of layers, and the paper's LeNet architectures.

A network is described by its JSON-able ``spec`` (layers and input shape), which
checkpoints store, so a network shrunk by dead-neuron removal rebuilds from its own file.
"""
import math

import numpy

from . import layers as L
from .backend import get_array_module
from .util import SparsenetError, whole

LAYER_KINDS = {cls.kind: cls for cls in (L.Linear, L.Conv2d, L.MaxPool2d, L.ReLU, L.Dropout, L.Flatten)}
_SETTINGS = {"linear": ("n_in", "n_out"), "conv2d": ("c_in", "c_out", "k", "stride", "pad"),
             "maxpool2d": ("k", "stride"), "relu": (), "dropout": ("rate", "base_rate"), "flatten": ()}
MAX_PARAMS = 2**31  # entries in one network (8 GiB of float32): larger descriptions are refused


def _whole(spec, key, low=1):
    return whole(spec.get(key), f"layer {spec.get('name')!r}: {key}", low)


def check_spec(spec):
    """Validate a network description before anything is allocated: every layer's kind,
    unique name and settings, and the shapes from the input to the class scores (a
    vector). Returns ``{"layer.param": shape}`` in order; raises :class:`SparsenetError`."""
    if not isinstance(spec, dict):
        raise SparsenetError("malformed network description: not an object")
    layers, shape = spec.get("layers"), spec.get("input_shape")
    if not isinstance(layers, list) or not layers:
        raise SparsenetError("malformed network description: no layers")
    if (not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
        raise SparsenetError(f"malformed network description: bad input shape {shape!r}")
    shape, params, names = tuple(shape), {}, set()
    for s in layers:
        if not isinstance(s, dict) or s.get("kind") not in LAYER_KINDS:
            kind = s.get("kind") if isinstance(s, dict) else s
            raise SparsenetError(f"unknown layer kind {kind!r} in network description")
        name, kind = s.get("name"), s["kind"]
        if not isinstance(name, str) or not name or name in names:
            raise SparsenetError(f"malformed network description: layer name {name!r} missing or repeated")
        names.add(name)
        unknown = set(s) - {"kind", "name"} - set(_SETTINGS[kind])
        if unknown:
            raise SparsenetError(f"layer {name!r}: unknown settings {', '.join(sorted(unknown))}")
        where = f"layer {name!r} ({kind}) gets input of shape {shape}"
        if kind == "linear":
            n_in, n_out = _whole(s, "n_in"), _whole(s, "n_out")
            if shape != (n_in,):
                raise SparsenetError(f"{where}, expected ({n_in},)")
            params.update({f"{name}.W": (n_out, n_in), f"{name}.b": (n_out,)})
            shape = (n_out,)
        elif kind in ("conv2d", "maxpool2d"):
            k = _whole(s, "k")
            stride = _whole(s, "stride") if s.get("stride") is not None else (1 if kind == "conv2d" else k)
            pad = _whole(s, "pad", 0) if kind == "conv2d" and "pad" in s else 0
            if len(shape) != 3:
                raise SparsenetError(f"{where}, expected an (H, W, C) image")
            H, W, C = shape
            if kind == "conv2d":
                c_in, c_out = _whole(s, "c_in"), _whole(s, "c_out")
                if C != c_in:
                    raise SparsenetError(f"{where}, expected {c_in} channels")
                params.update({f"{name}.W": (c_out, k, k, c_in), f"{name}.b": (c_out,)})
                C = c_out
            if min(H, W) + 2 * pad < k:
                raise SparsenetError(f"{where}: the {k}x{k} window does not fit")
            shape = ((H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1, C)
        elif kind == "flatten":
            shape = (math.prod(shape),)
        elif kind == "dropout":
            for key in ("rate", "base_rate"):
                v = s.get(key, 0.5)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1):
                    raise SparsenetError(f"layer {name!r}: dropout {key} must be in [0, 1), got {v!r}")
        if sum(math.prod(v) for v in params.values()) > MAX_PARAMS:
            raise SparsenetError(f"network description declares more than {MAX_PARAMS:,} parameters")
    if len(shape) != 1:
        raise SparsenetError(f"the last layer outputs shape {shape}; "
                             "class scores must be a vector (add flatten/linear)")
    return params


def layer_from_spec(spec, rng=None, xp=numpy):
    """Build one layer from a dict produced by ``Layer.spec()`` (checked by :func:`check_spec`)."""
    spec = dict(spec)
    cls = LAYER_KINDS[spec.pop("kind")]
    return cls(**spec, rng=rng, xp=xp) if cls in (L.Linear, L.Conv2d) else cls(**spec)


def predict_batches(forward, x, batch_size):
    """Predicted class of every row of ``x``, with ``forward`` (logits) run ``batch_size`` rows at a time."""
    xp = get_array_module(x)
    out = [forward(x[i:i + batch_size]).argmax(axis=1) for i in range(0, len(x), batch_size)]
    return xp.concatenate(out) if out else xp.zeros(0, dtype=numpy.int64)


class Network:
    """A sequential network with a softmax cross-entropy head: ``forward`` returns logits,
    ``loss_and_backward`` also fills every ``Param.grad``."""

    def __init__(self, layers, input_shape, name="", seed=0, origin=None):
        self.layers, self.input_shape, self.name = list(layers), tuple(input_shape), name
        self.freeze(())
        # Per-layer size of the dense network this one was pruned from: reports' "% left"
        # is against it, also after dead-neuron removal has shrunk the layers.
        self.origin = origin or {r["name"]: {k: r[k] for k in ("weights", "params", "macs")}
                                 for r in self.summary() if r["weight_shape"] is not None}
        self.dropout_rng = self.xp.random.default_rng(seed)  # NumPy or CuPy, as the params
        for layer in self.layers:
            if isinstance(layer, L.Dropout):
                layer.rng = self.dropout_rng

    @property
    def xp(self):
        for p in self.params().values():
            return get_array_module(p.data)
        return numpy

    @property
    def n_classes(self):
        """Number of outputs (class scores)."""
        shape = self.input_shape
        for l in self.layers:
            shape = l.output_shape(shape)
        return shape[0]

    def spec(self):
        return {"name": self.name, "input_shape": list(self.input_shape),
                "layers": [l.spec() for l in self.layers], "origin": self.origin}

    def params(self):
        """Ordered dict ``"layer.param" -> Param`` (e.g. ``"fc1.W"``)."""
        return {f"{l.name}.{k}": p for l in self.layers for k, p in l.params.items()}

    def layer(self, name):
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(name)

    def count_params(self):
        return sum(p.size for p in self.params().values())

    def count_nonzero(self):
        return sum(p.nonzero() for p in self.params().values())

    def summary(self):
        """One row per layer: name, kind, input/output shapes, params, survivors, MACs/sample."""
        rows, shape = [], self.input_shape
        for l in self.layers:
            out = l.output_shape(shape)
            W = l.params.get("W")
            rows.append({
                "name": l.name, "kind": l.kind, "input_shape": list(shape), "output_shape": list(out),
                "weight_shape": list(W.data.shape) if W is not None else None,
                "weights": W.size if W is not None else 0,
                "params": sum(p.size for p in l.params.values()),
                "nonzero_params": sum(p.nonzero() for p in l.params.values()),
                "macs": l.macs(shape) if hasattr(l, "macs") else 0,
            })
            shape = out
        return rows

    def freeze(self, names):
        """Freeze exactly the layers named in ``names`` (no parameter updates; §3.3); the
        backward pass then stops at the first layer that still trains."""
        names = set(names)
        unknown = names - {l.name for l in self.layers if l.params}
        if unknown:
            raise SparsenetError(f"cannot freeze {', '.join(sorted(unknown))}: no layer with parameters of that name")
        for l in self.layers:
            l.frozen, l.need_gx = l.name in names, True
        self._stop = len(self.layers)  # backward runs over layers[_stop:]
        for i, l in enumerate(self.layers):
            if l.params and not l.frozen:
                l.need_gx = False
                self._stop = i
                break

    def forward(self, x, train=False):
        for l in self.layers:
            x = l.forward(x, train)
        return x

    def backward(self, gy):
        """Back-propagate ``gy`` = dL/d(logits), filling every trainable ``Param.grad``."""
        for l in reversed(self.layers[self._stop:]):
            gy = l.backward(gy)
        for l in self.layers[:self._stop]:
            l.cache = None
            for p in l.params.values():
                p.grad = None
        return gy

    def loss_and_backward(self, x, t):
        """Training step without the update: returns ``(loss, logits)``."""
        z = self.forward(x, train=True)
        loss, cache = L.softmax_cross_entropy_forward(z, t)
        self.backward(L.softmax_cross_entropy_backward(1.0, cache))
        return loss, z

    def predict(self, x, batch_size=1000):
        """Predicted class of every row of ``x`` (inference mode, batched)."""
        y = predict_batches(self.forward, x, batch_size)
        for l in self.layers:
            l.cache = None
        return y

    def error(self, x, t, batch_size=1000):
        """Top-1 error (fraction) on ``(x, t)``."""
        if len(x) == 0:
            raise SparsenetError("cannot evaluate on an empty data set")
        return float((self.predict(x, batch_size) != t).mean())


def lenet_300_100():
    """LeNet-300-100: 784 → 300 → 100 → 10 with ReLU (266,610 parameters)."""
    return (784,), [
        {"kind": "linear", "name": "fc1", "n_in": 784, "n_out": 300},
        {"kind": "relu", "name": "relu1"},
        {"kind": "linear", "name": "fc2", "n_in": 300, "n_out": 100},
        {"kind": "relu", "name": "relu2"},
        {"kind": "linear", "name": "fc3", "n_in": 100, "n_out": 10},
    ]


def lenet_5():
    """Caffe's LeNet-5 (431,080 parameters), input NHWC (28, 28, 1): conv 20@5×5 →
    maxpool 2/2 → conv 50@5×5 → maxpool 2/2 → fc 800→500 → ReLU → fc 500→10."""
    return (28, 28, 1), [
        {"kind": "conv2d", "name": "conv1", "c_in": 1, "c_out": 20, "k": 5},
        {"kind": "maxpool2d", "name": "pool1", "k": 2, "stride": 2},
        {"kind": "conv2d", "name": "conv2", "c_in": 20, "c_out": 50, "k": 5},
        {"kind": "maxpool2d", "name": "pool2", "k": 2, "stride": 2},
        {"kind": "flatten", "name": "flatten"},
        {"kind": "linear", "name": "fc1", "n_in": 800, "n_out": 500},
        {"kind": "relu", "name": "relu1"},
        {"kind": "linear", "name": "fc2", "n_in": 500, "n_out": 10},
    ]


MODELS = {"lenet-300-100": lenet_300_100, "lenet-5": lenet_5}


def build_network(spec, seed=0, xp=numpy):
    """Build a network from a spec dict (``Network.spec()``, checked whole by
    :func:`check_spec` first), initialised from ``seed``."""
    check_spec(spec)
    origin = spec.get("origin")
    if origin is not None and not (isinstance(origin, dict) and all(
            isinstance(v, dict) and all(isinstance(v.get(k), int) and v[k] >= 0 for k in ("weights", "params", "macs"))
            for v in origin.values())):
        raise SparsenetError("malformed network description: bad 'origin' entry")
    rng = numpy.random.default_rng(seed)
    layers = [layer_from_spec(s, rng, xp) for s in spec["layers"]]
    return Network(layers, tuple(spec["input_shape"]), spec.get("name", ""), seed=seed + 1, origin=origin)


def build_model(name, seed=0, xp=numpy):
    """One of :data:`MODELS` by name, freshly initialised (Caffe's xavier filler, zero biases)."""
    if name not in MODELS:
        raise SparsenetError(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
    input_shape, layers = MODELS[name]()
    return build_network({"name": name, "input_shape": list(input_shape), "layers": layers}, seed, xp)
