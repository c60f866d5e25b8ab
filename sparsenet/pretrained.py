"""Pretrained AlexNet / VGG-16 weights from ONNX or safetensors files, read as data only.

No code from the file runs: ONNX is parsed as protobuf (``onnx.load``; tensors by
``onnx.numpy_helper.to_array``) and its graph is *matched* against the network's layers,
never executed; safetensors is read with ``safe_open(framework="numpy")``. Supported:

* ONNX model zoo ``bvlcalexnet`` (Caffe → Caffe2 → ONNX) and ``vgg16`` (MXNet gluon), or any
  graph of the same chain: Conv, Relu, LRN, MaxPool, Flatten/Reshape, Gemm or MatMul+Add,
  Dropout/Identity (skipped), a trailing Softmax. A Gemm straight on the pooled map (the old
  Caffe2 exports) flattens it as Caffe2's FC does. The input size is the graph's (N, 3, H, W).
* safetensors VGG-16 from torchvision (``features.*``, ``classifier.{0,3,6}``) or timm
  (``features.*``, ``pre_logits.fc{1,2}``, ``head.fc``).

Layouts (the sources are NCHW, sparsenet is NHWC; ``W`` ours, ``S`` stored)::

    conv   S (F, C/g, kh, kw):  W[f, i, j, c] = S[f, c, i, j],   W = S.transpose(0, 2, 3, 1)
    fc6    after the flatten of a (H, W, C) map, NCHW order (c, h, w) → ours (h, w, c):
           W[o, (h·W + w)·C + c] = S[o, (c·H + h)·W + w],
           W = S.reshape(o, C, H, W).transpose(0, 2, 3, 1).reshape(o, H·W·C)
    Gemm   transB=1: S (out, in), W = S;   transB=0, and MatMul (+ Add): S (in, out), W = Sᵀ
    timm   pre_logits.fc1 (4096, C, 7, 7), a 7×7 conv over the 7×7 map: fc6 as above;
           pre_logits.fc2 (4096, 4096, 1, 1): W = S.reshape(4096, 4096);  head.fc (1000, 4096): W = S

A Caffe max-pool rounds its output size up (``ceil``); the Caffe2 export of AlexNet at 224
emulates it with end padding (pads [0, 0, 1, 1]): both give the same windows, which is checked.

Every error is one line naming the file and the node or tensor (:class:`SparsenetError`).
"""
import hashlib
import importlib
import math
from pathlib import Path

import numpy

from . import model as M
from .checkpoint import save_checkpoint
from .util import SparsenetError, checked_cast

PREPROCESS = {"alexnet": "caffe", "vgg-16": "torch"}  # Caffe: BGR minus mean; torch: RGB, mean/std
_TV_CONV = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # torchvision's VGG-16 conv indices
LAYOUTS = {"torchvision": [f"features.{i}" for i in _TV_CONV] + ["classifier.0", "classifier.3", "classifier.6"],
           "timm": [f"features.{i}" for i in _TV_CONV] + ["pre_logits.fc1", "pre_logits.fc2", "head.fc"]}
_OPS = {"conv2d": ("Conv",), "relu": ("Relu",), "lrn": ("LRN",), "maxpool2d": ("MaxPool",),
        "flatten": ("Flatten", "Reshape"), "linear": ("Gemm", "MatMul")}


def _need(module, path):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SparsenetError(f"{path}: reading this file needs the '{module}' package: pip install {module}") from None


def _line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _plan(model, size, path):
    """``model`` for a ``size``×``size``×3 input, nothing allocated yet: its spec, its layers but
    dropout as ``(spec, input shape, output shape)``, and its parameter shapes (``check_spec``)."""
    spec = {"name": model, "input_shape": [size, size, 3], "layers": M.MODELS[model]()[1]}
    try:
        params = M.check_spec(spec)
    except SparsenetError as e:
        raise SparsenetError(f"{path}: {model} cannot take a {size}x{size} input ({e})") from None
    rows, shape = [], (size, size, 3)
    for s in spec["layers"]:
        out = M.layer_from_spec(s, False).output_shape(shape)  # zero weights: pages never touched
        if s["kind"] != "dropout":
            rows.append((s, shape, out))
        shape = out
    return spec, rows, params


def _build(spec, weights):
    """The network of ``spec`` holding ``weights`` (``{"layer.param": array}``, our layouts)."""
    net = M.Network([M.layer_from_spec(s, False) for s in spec["layers"]], spec["input_shape"], spec["name"])
    for name, p in net.params().items():
        p.load(numpy.require(weights[name], numpy.float32, ["C", "W"]), p.mask)  # a file's read-only views copied
    return net


def _fc6(S, chw):
    """NCHW-flatten columns (c, h, w) → ours (h, w, c)."""
    return S.reshape(S.shape[0], *chw).transpose(0, 2, 3, 1).reshape(S.shape[0], -1)


def _array(a, path, what, shapes):
    """``a`` checked (floating point, one of ``shapes``, finite) as float32."""
    if a.dtype.kind != "f":
        raise SparsenetError(f"{path}: {what} has dtype {a.dtype}, expected floating point")
    if tuple(a.shape) not in shapes:
        raise SparsenetError(f"{path}: {what} has shape {tuple(a.shape)}, expected {shapes[0]}")
    return numpy.ascontiguousarray(checked_cast(a, numpy.float32, f"{path}: {what}"))


# ----------------------------------------------------------------------------- ONNX
_DEFAULTS = {  # ONNX's attribute defaults; "free" ones are checked by the caller, the rest must match
    "Conv": {"strides": [1, 1], "pads": [0] * 4, "group": 1, "dilations": [1, 1], "auto_pad": b"NOTSET"},
    "MaxPool": {"strides": [1, 1], "pads": [0] * 4, "ceil_mode": 0, "dilations": [1, 1], "storage_order": 0,
                "auto_pad": b"NOTSET"},
    "LRN": {"alpha": 1e-4, "beta": 0.75, "bias": 1.0}, "Flatten": {"axis": 1},
    "Reshape": {"allowzero": 0, "shape": None},  # "shape": an attribute before opset 5
    "Gemm": {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0, "broadcast": 0}, "Softmax": {"axis": 1}}


def _same(a, b):
    if isinstance(b, float):
        return isinstance(a, (int, float)) and math.isclose(a, b, rel_tol=1e-6)
    return (list(a) if isinstance(a, (list, tuple)) else a) == b


def _onnx(path, model, size):
    onnx = _need("onnx", path)
    from onnx import helper, numpy_helper
    try:
        g = onnx.load(str(path)).graph
    except Exception as e:  # protobuf DecodeError, OSError, a bad external-data reference
        raise SparsenetError(f"{path}: not a readable ONNX model ({_line(e)})") from None
    if not g.node:
        raise SparsenetError(f"{path}: not an ONNX model (no graph nodes)")
    consts = {t.name: t for t in g.initializer}
    consts.update({n.output[0]: n.attribute[0].t for n in g.node if n.op_type == "Constant" and n.attribute})
    inputs = [i for i in g.input if i.name not in consts]  # weights may also be listed as inputs
    if len(inputs) != 1:
        raise SparsenetError(f"{path}: expected one image input, the graph has {[i.name for i in inputs]}")
    dims = [d.dim_value or None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] != 3 or dims[2] != dims[3]:
        raise SparsenetError(f"{path}: input {inputs[0].name!r} has shape {dims}, expected (N, 3, H, H)")
    if size is not None and dims[2] not in (None, size):
        raise SparsenetError(f"{path}: the graph's input is {dims[2]}x{dims[3]}, not {size}x{size}")
    size = dims[2] or size or M.MODELS[model]()[0][0]
    spec, rows, _ = _plan(model, size, path)

    def fail(msg):
        return SparsenetError(f"{path}: node {where}: {msg}")

    def tensor(k, *shapes):
        name = n.input[k] if len(n.input) > k else ""
        if name not in consts:
            raise fail(f"initializer {name!r} is missing")
        try:
            a = numpy_helper.to_array(consts[name])
        except Exception as e:
            raise fail(f"tensor {name!r} is damaged ({_line(e)})") from None
        return _array(a, f"{path}: node {where}", f"tensor {name!r}", shapes) if shapes else a

    def attrs(want, free=()):
        got, base = {a.name: helper.get_attribute_value(a) for a in n.attribute}, _DEFAULTS.get(n.op_type, {})
        for k in sorted(got.keys() - base.keys() - want.keys() - {"consumed_inputs"}):  # (legacy, harmless)
            raise fail(f"unsupported attribute {k!r}")
        got = {**base, **got}
        for k, v in {**want, **{k: v for k, v in base.items() if k not in want}}.items():
            if k not in free and not _same(got.get(k, v), v):
                raise fail(f"{k} = {got[k]!r}, but {model} layer {name!r} has {v!r}")
        return got

    weights, cur, shape, chw, pending, ended, i = {}, inputs[0].name, (size, size, 3), None, None, False, 0
    for n in g.node:
        where = f"{n.name or n.output[0]!r} ({n.op_type})"
        if n.op_type == "Constant":
            continue
        if not n.input or n.input[0] != cur:
            raise fail(f"does not read the previous layer's output {cur!r} (only a chain of layers is imported)")
        cur = n.output[0]
        if n.op_type in ("Dropout", "Identity"):
            continue
        if ended:
            raise fail("follows the final Softmax")
        if n.op_type == "Softmax" and i == len(rows):
            if attrs({}, free=("axis",))["axis"] not in (1, -1):
                raise fail("softmax not over the classes")
            ended = True
            continue
        if n.op_type == "Add" and pending is not None:
            name, o = pending["name"], pending["n_out"]
            weights[f"{name}.b"], pending = tensor(1, (o,), (1, o)).reshape(-1), None
            continue
        pending, flat = None, len(shape) == 1
        if n.op_type in ("Flatten", "Reshape") and flat:  # a flatten of what is flat already (MXNet's)
            kind, name = "flatten", "(flat already)"
        elif i == len(rows):
            raise fail(f"an extra layer: {model} ends at {rows[-1][0]['name']!r}")
        else:
            if n.op_type in _OPS["linear"] and rows[i][0]["kind"] == "flatten":  # old zoo files: Caffe2's FC
                chw, i = (rows[i][1][2], *rows[i][1][:2]), i + 1                     # flattens (c, h, w) itself
            (s, before, shape), i = rows[i], i + 1
            kind, name = s["kind"], s["name"]
            if n.op_type not in _OPS[kind]:
                known = any(n.op_type in ops for ops in _OPS.values())
                raise fail(f"{'found' if known else 'unsupported operator'} where {model} has layer {name!r} ({kind})")
        if kind == "conv2d":
            k, F, g_ = s["k"], s["c_out"], s.get("groups", 1)
            attrs({"kernel_shape": [k, k], "strides": [s.get("stride", 1)] * 2, "pads": [s.get("pad", 0)] * 4,
                   "group": g_})
            weights[f"{name}.W"] = tensor(1, (F, s["c_in"] // g_, k, k)).transpose(0, 2, 3, 1)  # (F,C,k,k)→(F,k,k,C)
            weights[f"{name}.b"] = tensor(2, (F,)) if n.input[2:] and n.input[2] else numpy.zeros(F, numpy.float32)
        elif kind == "relu":
            attrs({})
        elif kind == "lrn":
            attrs({"size": s["size"], "alpha": s["alpha"], "beta": s["beta"], "bias": s["k"]})
        elif kind == "maxpool2d":  # pads only at the end, and ONNX's rounding: the same windows as ours
            k, stride = s["k"], s.get("stride") or s["k"]
            got = attrs({"kernel_shape": [k, k], "strides": [stride] * 2}, free=("pads", "ceil_mode"))
            pads, rnd = list(got["pads"]), math.ceil if got["ceil_mode"] else math.floor
            out = [rnd((d + e - k) / stride) + 1 for d, e in zip(before[:2], pads[2:])]
            if pads[:2] != [0, 0]:
                raise fail(f"pads {pads} pad the start; Caffe's pools pad (round up) only at the end")
            if out != list(shape[:2]):
                raise fail(f"pads {pads} and ceil_mode {got['ceil_mode']} give a {out[0]}x{out[1]} output, "
                           f"{model} layer {name!r} {shape[0]}x{shape[1]}")
        elif kind == "flatten":
            got, D = attrs({}, free=("shape",)), math.prod(shape)
            if n.op_type == "Reshape":
                t = list(got["shape"] if got["shape"] is not None else tensor(1).tolist())
                if not (len(t) == 2 and t[0] in (-1, 0, 1) and t[1] in (-1, D) and t != [-1, -1]):
                    raise fail(f"reshape to {t}, expected (N, {D})")
            if not flat:  # NCHW flatten: the next linear's columns are in (c, h, w) order
                chw = (before[2], *before[:2])
        elif kind == "linear":
            o, d = s["n_out"], s["n_in"]
            if n.op_type == "Gemm":
                got = attrs({}, free=("transB", "broadcast"))
                W = tensor(1, (o, d)) if got["transB"] else tensor(1, (d, o)).T
                b = tensor(2, (o,), (1, o)).reshape(-1) if n.input[2:] and n.input[2] else numpy.zeros(o, numpy.float32)
            else:
                attrs({})
                W, b, pending = tensor(1, (d, o)).T, numpy.zeros(o, numpy.float32), s
            weights[f"{name}.W"], weights[f"{name}.b"], chw = (_fc6(W, chw) if chw else W), b, None
    if i < len(rows):
        raise SparsenetError(f"{path}: the graph ends before {model} layer {rows[i][0]['name']!r} "
                             f"({len(rows) - i} layers missing)")
    if cur not in {o.name for o in g.output}:
        raise SparsenetError(f"{path}: the chain's last tensor {cur!r} is not a graph output")
    return _build(spec, weights), "onnx-zoo", size


# ----------------------------------------------------------------------------- safetensors
def _safetensors(path, model, size):
    if model != "vgg-16":
        raise SparsenetError(f"{path}: safetensors files are imported for vgg-16 only, not {model}")
    safe_open = _need("safetensors", path).safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = set(f.keys())
            tensors = {lay: [f"{m}.{p}" for m in mods for p in ("weight", "bias")] for lay, mods in LAYOUTS.items()}
            layout = max(LAYOUTS, key=lambda lay: len(keys & set(tensors[lay])))
            if not keys & {k for k in tensors[layout] if not k.startswith("features.")}:
                raise SparsenetError(f"{path}: unknown layout: tensors {sorted(keys)[:3]}... are neither "
                                     "torchvision's VGG-16 (features.*, classifier.*) nor timm's "
                                     "(features.*, pre_logits.*, head.fc.*)")
            for what, names in (("missing", [k for k in tensors[layout] if k not in keys]),
                                ("unexpected", sorted(keys - set(tensors[layout])))):
                if names:
                    raise SparsenetError(f"{path}: {layout} VGG-16 layout: tensor {names[0]!r} is {what}"
                                         + (f" (and {len(names) - 1} more)" if len(names) > 1 else ""))
            size = size or M.MODELS[model]()[0][0]
            spec, rows, params = _plan(model, size, path)
            h, w, c = next(before for s, before, _ in rows if s["kind"] == "flatten")  # the last pool's map
            plan = []  # (our name, stored name, stored shape, conversion)
            for s, m in zip([s for s, _, _ in rows if f"{s['name']}.W" in params], LAYOUTS[layout]):
                W = params[f"{s['name']}.W"]
                if s["kind"] == "conv2d":  # (F, C, k, k) → (F, k, k, C)
                    src, convert = (W[0], W[3], W[1], W[2]), lambda S: S.transpose(0, 2, 3, 1)
                elif m in ("classifier.0", "pre_logits.fc1"):  # columns (c, h, w) → (h, w, c)
                    src, convert = (W[0], c, h, w) if layout == "timm" else W, lambda S: _fc6(S, (c, h, w))
                else:
                    src, convert = (*W, 1, 1) if m == "pre_logits.fc2" else W, lambda S, W=W: S.reshape(W)
                plan += [(f"{s['name']}.W", f"{m}.weight", src, convert),
                         (f"{s['name']}.b", f"{m}.bias", (W[0],), None)]
            for _, key, shape, _ in plan:  # all shapes and dtypes before any data is read
                got, dtype = tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype()
                if got != shape:
                    raise SparsenetError(f"{path}: tensor {key!r} has shape {got}, expected {shape}")
                if dtype not in ("F16", "F32", "F64"):
                    raise SparsenetError(f"{path}: tensor {key!r} has dtype {dtype}, expected F16, F32 or F64" + (
                        " (NumPy has no bfloat16: save the file as float32)" if dtype == "BF16" else ""))
            weights = {name: (convert or (lambda S: S))(_array(f.get_tensor(key), path, f"tensor {key!r}", (shape,)))
                       for name, key, shape, convert in plan}
    except SparsenetError:
        raise
    except Exception as e:  # SafetensorError (bad header, truncated file), OSError
        raise SparsenetError(f"{path}: not a readable safetensors file ({_line(e)})") from None
    return _build(spec, weights), layout, size


# ----------------------------------------------------------------------------- API
def file_sha256(path):
    """SHA-256 of a file's bytes (hex); a one-line error when it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    except OSError as e:
        raise SparsenetError(f"{path}: cannot read the file ({e.strerror or e})") from None
    return h.hexdigest()


def import_weights(path, model, input_size=None):
    """Read pretrained ``model`` ("alexnet" or "vgg-16") weights from an ONNX or safetensors file
    (told apart by content: safetensors starts with an 8-byte header length and "{").

    ``input_size``: the side of the square input; an ONNX graph with a fixed input size fixes it.
    Returns ``(net, info)``; ``info`` (JSON-able) says format, layout, source, sha256, input_size
    and how to preprocess images for the network."""
    if model not in PREPROCESS:
        raise SparsenetError(f"cannot import weights for {model!r}: choose from {', '.join(PREPROCESS)}")
    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1):
        raise SparsenetError(f"input size must be a whole number >= 1, got {input_size!r}")
    path = Path(path)
    if not path.is_file():
        raise SparsenetError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(9)
    fmt = "safetensors" if head[8:9] == b"{" else "onnx"
    net, layout, size = (_safetensors if fmt == "safetensors" else _onnx)(path, model, input_size)
    info = {"format": fmt, "layout": layout, "source": str(path), "sha256": file_sha256(path), "input_size": size,
            "preprocess": {"mode": PREPROCESS[model], "size": size, "resize": 256}}
    return net, info


def import_checkpoint(path, model, out, input_size=None, force=False):
    """:func:`import_weights`, then the network saved as a checkpoint at ``out`` (written atomically;
    an existing ``out`` is replaced only with ``force``). Returns the import's ``info``."""
    if Path(out).exists() and not force:
        raise SparsenetError(f"{out} already exists: not overwritten (use --force to replace it)")
    net, info = import_weights(path, model, input_size)
    save_checkpoint(out, net, config={"model": model, "dataset": "imagenet", "preprocess": info["preprocess"],
                                      "imported": info})
    return info
