"""Networks: an ordered stack of layers, and the paper's LeNet architectures.

A network is described by its JSON-able ``spec`` (layers and input shape), which
checkpoints store, so a network shrunk by dead-neuron removal rebuilds from its own file.
"""
import json
import math
from pathlib import Path

import numpy

from . import fast_layers as fast, layers as L
from .backend import get_array_module
from .util import SparsenetError, whole

LAYER_KINDS = {cls.kind: cls for cls in (L.Linear, L.Conv2d, L.MaxPool2d, L.ReLU, L.Dropout, L.Flatten, L.LRN)}
_SETTINGS = {"linear": ("n_in", "n_out"), "conv2d": ("c_in", "c_out", "k", "stride", "pad", "groups"),
             "maxpool2d": ("k", "stride", "ceil"), "relu": (), "dropout": ("rate", "base_rate"), "flatten": (),
             "lrn": ("size", "alpha", "beta", "k")}
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
                c_in, c_out, g = _whole(s, "c_in"), _whole(s, "c_out"), _whole({"groups": 1, **s}, "groups")
                if C != c_in:
                    raise SparsenetError(f"{where}, expected {c_in} channels")
                if c_in % g or c_out % g:
                    raise SparsenetError(f"layer {name!r}: {g} groups do not divide {c_in} inputs and {c_out} outputs")
                params.update({f"{name}.W": (c_out, k, k, c_in // g), f"{name}.b": (c_out,)})
                C = c_out
            elif not isinstance(s.get("ceil", False), bool):
                raise SparsenetError(f"layer {name!r}: ceil must be true or false")
            if min(H, W) + 2 * pad < k:
                raise SparsenetError(f"{where}: the {k}x{k} window does not fit")
            shape = (*(L.pool_output_size(n, k, stride, s.get("ceil")) if kind == "maxpool2d" else
                       (n + 2 * pad - k) // stride + 1 for n in (H, W)), C)
        elif kind == "flatten":
            shape = (math.prod(shape),)
        elif kind == "lrn":
            if _whole({"size": 5, **s}, "size") % 2 == 0:
                raise SparsenetError(f"layer {name!r}: the LRN size must be odd")
            for key in ("alpha", "beta", "k"):
                v = s.get(key, 1.0)
                if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
                        or (key == "k" and v == 0)):
                    raise SparsenetError(f"layer {name!r}: LRN {key} must be a finite number "
                                         f"{'> 0' if key == 'k' else '>= 0'}, got {v!r}")
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


def inference_batch(input_shape):
    """Images per inference batch: 1000 for MNIST, fewer for ImageNet-sized inputs (~40 MB of input a batch)."""
    return max(1, min(1000, 10_000_000 // math.prod(input_shape)))


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
        """Logits of ``x``; at inference (``train`` False) no layer keeps its cache, so memory holds
        two activations at a time rather than all of them (VGG-16: ~64 MB an image)."""
        for l in self.layers:
            x = l.forward(x, train)
            if not train:
                l.cache = None
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
        loss, gz = fast.softmax_cross_entropy(z, t)
        self.backward(gz)
        return loss, z

    def predict(self, x, batch_size=None):
        """Predicted class of every row of ``x`` (inference mode, batched: :func:`inference_batch`)."""
        y = predict_batches(self.forward, x, batch_size or inference_batch(self.input_shape))
        for l in self.layers:
            l.cache = None
        return y

    def error(self, x, t, batch_size=None):
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


def _conv(name, c_in, c_out, k, **kw):
    return [{"kind": "conv2d", "name": f"conv{name}", "c_in": c_in, "c_out": c_out, "k": k, **kw},
            {"kind": "relu", "name": f"relu{name}"}]


def _classifier(n_in):
    """fc6 → ReLU → dropout 0.5 → fc7 → ReLU → dropout 0.5 → fc8 (4096, 4096, 1000 units)."""
    out = [{"kind": "flatten", "name": "flatten"}]
    for i, (a, b) in enumerate(((n_in, 4096), (4096, 4096)), 6):
        out += [{"kind": "linear", "name": f"fc{i}", "n_in": a, "n_out": b}, {"kind": "relu", "name": f"relu{i}"},
                {"kind": "dropout", "name": f"drop{i}", "rate": 0.5}]
    return out + [{"kind": "linear", "name": "fc8", "n_in": 4096, "n_out": 1000}]


def alexnet():
    """Caffe's bvlc_alexnet (60,965,224 parameters), input (227, 227, 3): conv 96@11×11/4 → LRN →
    max-pool 3/2 → conv 256@5×5 pad 2 in 2 groups → LRN → pool → conv 384@3×3 → conv 384@3×3 g2 →
    conv 256@3×3 g2 → pool → fc 9216→4096→4096→1000 with dropout 0.5. Pools round up as Caffe's do,
    so a 224 input (the ONNX model zoo's) also reaches 6×6×256 before fc6."""
    lrn = {"kind": "lrn", "size": 5, "alpha": 1e-4, "beta": 0.75, "k": 1.0}
    pool = {"kind": "maxpool2d", "k": 3, "stride": 2, "ceil": True}
    return (227, 227, 3), [
        *_conv(1, 3, 96, 11, stride=4), {**lrn, "name": "norm1"}, {**pool, "name": "pool1"},
        *_conv(2, 96, 256, 5, pad=2, groups=2), {**lrn, "name": "norm2"}, {**pool, "name": "pool2"},
        *_conv(3, 256, 384, 3, pad=1), *_conv(4, 384, 384, 3, pad=1, groups=2),
        *_conv(5, 384, 256, 3, pad=1, groups=2), {**pool, "name": "pool5"}, *_classifier(9216)]


def vgg_16():
    """VGG-16 (138,357,544 parameters), input (224, 224, 3): 13 conv 3×3 pad 1 with ReLU in five
    blocks of 64, 128, 256, 512, 512 channels, each block ending in a 2×2/2 max-pool, then fc
    25088→4096→4096→1000 with dropout 0.5."""
    layers, c_in = [], 3
    for block, (width, n) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)), 1):
        for i in range(1, n + 1):
            layers += _conv(f"{block}_{i}", c_in, width, 3, pad=1)
            c_in = width
        layers.append({"kind": "maxpool2d", "name": f"pool{block}", "k": 2, "stride": 2})
    return (224, 224, 3), layers + _classifier(25088)


MODELS = {"lenet-300-100": lenet_300_100, "lenet-5": lenet_5, "alexnet": alexnet, "vgg-16": vgg_16}


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


DESCRIPTION_SUFFIXES = (".json", ".toml")


def is_description(model):
    """Whether ``model`` names a network description file (``.json``/``.toml``) rather than one of :data:`MODELS`."""
    return isinstance(model, (str, Path)) and Path(model).suffix.lower() in DESCRIPTION_SUFFIXES


def load_description(path):
    """The network description in a ``.json`` or ``.toml`` file (schema: docs/networks.md; the same
    object as :meth:`Network.spec`), checked whole by :func:`check_spec` before anything is built.
    Without a ``name`` the file's stem names the network."""
    path = Path(path)
    if path.suffix.lower() not in DESCRIPTION_SUFFIXES:
        raise SparsenetError(f"{path}: a network description must be a .json or .toml file")
    if not path.is_file():
        raise SparsenetError(f"{path}: no such network description file")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".toml":
            import tomllib

            spec = tomllib.loads(text)
        else:
            spec = json.loads(text)
    except (OSError, ValueError, UnicodeDecodeError) as e:  # json's and tomllib's errors are ValueErrors
        raise SparsenetError(f"{path}: cannot read the network description ({e})") from None
    if not isinstance(spec, dict):
        raise SparsenetError(f"{path}: a network description must be an object with 'input_shape' and 'layers'")
    unknown = set(spec) - {"name", "input_shape", "layers"}
    if unknown:
        raise SparsenetError(f"{path}: unknown keys in the network description: {', '.join(sorted(unknown))}")
    spec = {"name": path.stem, **spec}
    if not isinstance(spec["name"], str) or not spec["name"]:
        raise SparsenetError(f"{path}: the network's name must be a non-empty string")
    try:
        check_spec(spec)
    except SparsenetError as e:
        raise SparsenetError(f"{path}: {e}") from None
    return spec


def model_spec(model):
    """The description of ``model``: a name in :data:`MODELS` or a description file (:func:`load_description`)."""
    if is_description(model):
        return load_description(model)
    if model not in MODELS:
        raise SparsenetError(f"unknown model {model!r}: choose from {', '.join(MODELS)}, or give a network "
                             "description file (.json/.toml)")
    input_shape, layers = MODELS[model]()
    return {"name": model, "input_shape": list(input_shape), "layers": layers}


def build_model(name, seed=0, xp=numpy):
    """One of :data:`MODELS` by name, or the network of a description file (``.json``/``.toml``),
    freshly initialised (Caffe's xavier filler, zero biases)."""
    return build_network(model_spec(name), seed, xp)
