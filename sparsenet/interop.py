"""The way back out: a network as ONNX or as PyTorch tensors (safetensors), and the tensors back in.

Any :class:`~sparsenet.model.Network` the package builds (linear, conv2d with stride, pad and
groups, max-pool with Caffe's rounding, ReLU, dropout, LRN, flatten), pruned or not. Pruned weights
are exact zeros in every file; the masks travel only where the format has a place for them (the
torch layout's ``weight_mask``, ONNX's sparse initializers). Files are written atomically; reading
validates every tensor before anything is built or written. docs/interop.md has the commands and a
torch module that loads the tensors.

ONNX (:func:`export_onnx`, opset 13): input ``"input"`` (N, \\*input_shape) float32, as
:meth:`Network.forward` takes it (images NHWC); output ``"logits"`` (N, classes). Inside, a
``Transpose`` to NCHW before the first conv/pool/LRN and one back to NHWC before each ``Flatten``, so
the FC weights are sparsenet's own (``Gemm``, ``transB=1``, W (out, in) unpermuted). Conv weights
are stored (F, C/g, k, k); a Caffe (ceil) pool is a floor ``MaxPool`` with end padding, the same
windows whatever a runtime's ceil rounding; dropout is an ``Identity``. Initializers are named
``<layer>.weight`` / ``<layer>.bias``. ``metadata_props``: ``sparsenet.network`` (the description,
JSON), ``sparsenet.input_layout`` ("NHWC"). With sparse initializers, each weight is a
``SparseTensorProto`` holding exactly its connections (mask ones, a survivor of value 0.0 included),
linear int64 indices into the (F, C/g, k, k) or (out, in) tensor.

Torch (:func:`export_torch`, :func:`import_torch`): a safetensors file in the state-dict layout of
an ``nn.Sequential`` whose modules are named like the layers, NCHW::

    layout "pruned" (torch.nn.utils.prune, after prune.identity(module, "weight")):
        <layer>.weight_orig, <layer>.weight_mask (float32 0/1), <layer>.bias
    layout "dense":  <layer>.weight, <layer>.bias
    conv    torch (F, C/g, kh, kw) = ours (F, kh, kw, C/g).transpose(0, 3, 1, 2)
    linear  (out, in) as ours, except the first linear after the flatten of an (H, W, C) map, whose
            columns go from ours (h, w, c) to torch's (c, h, w):
            T = W.reshape(out, H, W, C).transpose(0, 3, 1, 2).reshape(out, H·W·C)

``__metadata__``: format "sparsenet-torch", layout, network (the description, JSON), input_layout
"NCHW". Reading takes either layout, per layer (a layer may be pruned or plain), and refuses a mask
0 over a non-zero ``weight_orig`` unless ``apply_masks`` zeroes it (torch's prune keeps the original
values there).
"""
import importlib
import json
from pathlib import Path

import numpy

from . import model as M
from .backend import asnumpy
from .checkpoint import save_checkpoint
from .layers import conv_output_size
from .pretrained import PREPROCESS, file_sha256, import_checkpoint as import_pretrained
from .util import SparsenetError, atomic_path, checked_cast

OPSET, IR_VERSION = 13, 7  # onnxruntime ≥ 1.6 runs it
TORCH_LAYOUTS = ("pruned", "dense")
_FLOATS, _MASKS = ("F16", "F32", "F64"), ("F16", "F32", "F64", "BOOL", "U8")


def _need(module, path, doing):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SparsenetError(f"{path}: {doing} needs the '{module.split('.')[0]}' package: "
                             f"pip install {module.split('.')[0]}") from None


def description(net):
    """``net``'s description as a description file holds it: {"name", "input_shape", "layers"}."""
    spec = net.spec()
    return {k: spec[k] for k in ("name", "input_shape", "layers")}


def _host(a):
    """``a`` as a float32 NumPy array (copied only from a GPU or another dtype)."""
    return numpy.asarray(asnumpy(a), dtype=numpy.float32)


def _weighted(spec):
    """``[(layer name, W shape, b shape, chw)]`` for each layer of the description ``spec`` with a weight,
    in order, from the description alone (nothing allocated). ``chw`` is the (H, W, C) map that a
    flatten turned into this linear layer's input (columns in (h, w, c) order), else None."""
    params, out, shape, chw = M.check_spec(spec), [], tuple(spec["input_shape"]), None
    for s in spec["layers"]:
        name, kind = s["name"], s["kind"]
        if kind == "flatten" and len(shape) == 3:
            chw = shape
        if kind in ("linear", "conv2d"):
            out.append((name, params[f"{name}.W"], params[f"{name}.b"], chw if kind == "linear" else None))
        if kind == "linear":
            chw, shape = None, (s["n_out"],)
        elif kind == "conv2d":
            shape = (*(conv_output_size(n, s["k"], s.get("stride") or 1, s.get("pad", 0)) for n in shape[:2]),
                     s["c_out"])
        else:
            shape = M.layer_from_spec(s).output_shape(shape)
    return out


def _to_torch(a, chw):
    """A weight or mask from ours to torch's layout (module docstring)."""
    if a.ndim == 4:
        return numpy.ascontiguousarray(a.transpose(0, 3, 1, 2))
    if chw:
        return numpy.ascontiguousarray(a.reshape(len(a), *chw).transpose(0, 3, 1, 2).reshape(a.shape))
    return numpy.ascontiguousarray(a)


def _from_torch(a, chw):
    """Inverse of :func:`_to_torch`."""
    if a.ndim == 4:
        return numpy.ascontiguousarray(a.transpose(0, 2, 3, 1))
    if chw:
        H, W, C = chw
        return numpy.ascontiguousarray(a.reshape(len(a), C, H, W).transpose(0, 2, 3, 1).reshape(a.shape))
    return a


def _torch_shape(shape):
    return (shape[0], shape[3], shape[1], shape[2]) if len(shape) == 4 else tuple(shape)


# ----------------------------------------------------------------------------- ONNX
def export_onnx(net, path, sparse_initializers=False):
    """Write ``net`` as an ONNX model at ``path`` (atomically): input "input" (N, \\*input_shape)
    float32 NHWC, output "logits" (N, classes); layouts in the module docstring. With
    ``sparse_initializers`` every weight is a sparse initializer holding its connections.
    Returns ``{"format", "path", "bytes", "sparse_initializers"}``."""
    if 4 * net.count_params() > 2**31 - 2**24:  # protobuf's limit; ONNX's external data is not written
        raise SparsenetError(f"{path}: {net.count_params():,} parameters do not fit in one ONNX file (2 GB)")
    onnx = _need("onnx", path, "writing ONNX")
    from onnx import TensorProto, helper, numpy_helper

    from . import __version__

    nodes, dense, sparse, shape, nchw = [], [], [], net.input_shape, False
    cur = "input"

    def node(op, name, *inputs, **attrs):  # tensors between layers are named "<layer>:<step>"
        nonlocal cur
        nodes.append(helper.make_node(op, [cur, *inputs], [name], name=name, **attrs))
        cur = name

    def shape_const(name, values):  # an int64 initializer (Reshape's target shape)
        dense.append(numpy_helper.from_array(numpy.asarray(values, dtype=numpy.int64), name))
        return name

    for l in (net.layer(row[0]) for row in _weighted(description(net))):  # initializers, in network order
        W = _to_torch(_host(l.params["W"].data), None)  # conv → (F, C/g, k, k); linear as it is
        if sparse_initializers:
            idx = numpy.flatnonzero(_to_torch(_host(l.params["W"].mask), None)).astype(numpy.int64)
            sparse.append(helper.make_sparse_tensor(numpy_helper.from_array(W.ravel()[idx], f"{l.name}.weight"),
                                                    numpy_helper.from_array(idx, f"{l.name}.weight.indices"), W.shape))
        else:
            dense.append(numpy_helper.from_array(W, f"{l.name}.weight"))
        dense.append(numpy_helper.from_array(_host(l.params["b"].data), f"{l.name}.bias"))
    for l in net.layers:
        if l.kind in ("conv2d", "maxpool2d") or l.kind == "lrn" and len(shape) == 3:
            if not nchw:
                node("Transpose", f"{l.name}:to_nchw", perm=[0, 3, 1, 2])
                nchw = True
        elif l.kind == "flatten" and nchw:
            node("Transpose", f"{l.name}:to_nhwc", perm=[0, 2, 3, 1])
            nchw = False
        weights, out = (f"{l.name}.weight", f"{l.name}.bias"), f"{l.name}:out"
        lrn = dict(size=l.size, alpha=l.alpha, beta=l.beta, bias=l.k) if l.kind == "lrn" else {}
        if l.kind == "conv2d":
            k = l.params["W"].data.shape[1]
            node("Conv", out, *weights, kernel_shape=[k, k], strides=[l.stride] * 2, pads=[l.pad] * 4,
                 group=l.groups)
        elif l.kind == "maxpool2d":  # ceil: pad the end so that floor rounding gives Caffe's windows
            (H, W), o = shape[:2], l.output_shape(shape)[:2]
            ends = [max(0, (a - 1) * l.stride + l.k - n) for a, n in zip(o, (H, W))]
            node("MaxPool", out, kernel_shape=[l.k, l.k], strides=[l.stride] * 2, pads=[0, 0, *ends])
        elif l.kind == "lrn" and len(shape) == 3:
            node("LRN", out, **lrn)
        elif l.kind == "lrn":  # across the last axis of a vector (N, C) or a map (N, H, W): as (N, C, ·, 1)
            if len(shape) == 2:
                node("Transpose", f"{l.name}:last_first", perm=[0, 2, 1])
            node("Reshape", f"{l.name}:to_4d", shape_const(f"{l.name}:4d", [0, 0, -1, 1]))
            node("LRN", f"{l.name}:lrn", **lrn)
            node("Reshape", f"{l.name}:from_4d", shape_const(f"{l.name}:{len(shape) + 1}d", [0, 0, -1][:len(shape) + 1]))
            if len(shape) == 2:
                node("Transpose", out, perm=[0, 2, 1])
        elif l.kind == "linear":
            node("Gemm", out, *weights, transB=1)
        else:
            node({"relu": "Relu", "dropout": "Identity", "flatten": "Flatten"}[l.kind], out)
        shape = l.output_shape(shape)
    nodes[-1].output[0] = "logits"
    names = ["input", *(t.name for t in dense), *(t.values.name for t in sparse), *(o for n in nodes for o in n.output)]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash is not None:  # only layer names with '.' or ':' can make two tensors share a name
        raise SparsenetError(f"{path}: two ONNX tensors would be named {clash!r}; rename the layer whose name "
                             "contains it")
    graph = helper.make_graph(
        nodes, net.name or "sparsenet", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                       ["N", *net.input_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", net.n_classes])], dense,
        sparse_initializer=sparse)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="sparsenet", producer_version=__version__,
                              doc_string="sparsenet network; input NHWC (N, *input_shape) float32, output logits")
    helper.set_model_props(model, {"sparsenet.network": json.dumps(description(net)),
                                   "sparsenet.input_layout": "NHWC"})
    data = model.SerializeToString()  # once: checked, then written
    try:
        onnx.checker.check_model(data)
    except onnx.checker.ValidationError as e:
        raise SparsenetError(f"{path}: the ONNX checker refuses the model ({str(e).strip().splitlines()[0]})") \
            from None
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return {"format": "onnx", "path": str(path), "bytes": Path(path).stat().st_size,
            "sparse_initializers": bool(sparse_initializers)}


# ----------------------------------------------------------------------------- torch (safetensors)
def export_torch(net, path, layout="pruned"):
    """Write ``net``'s tensors at ``path`` (safetensors, atomically) in torch's NCHW state-dict layout:
    ``layout`` "pruned" (``weight_orig``, ``weight_mask``, ``bias``) or "dense" (``weight``, ``bias``);
    module docstring. Returns ``{"format", "path", "bytes", "layout", "tensors"}``."""
    if layout not in TORCH_LAYOUTS:
        raise SparsenetError(f"unknown torch layout {layout!r}: choose from {', '.join(TORCH_LAYOUTS)}")
    dotted = [l.name for l in net.layers if "." in l.name]
    if dotted:
        raise SparsenetError(f"layer name {dotted[0]!r} has a '.', which a torch module name cannot have")
    save_file = _need("safetensors.numpy", path, "writing safetensors").save_file
    tensors = {}
    for name, _, _, chw in _weighted(description(net)):
        l = net.layer(name)
        W, mask = (_to_torch(_host(a), chw) for a in (l.params["W"].data, l.params["W"].mask))
        tensors.update({f"{l.name}.weight_orig": W, f"{l.name}.weight_mask": mask} if layout == "pruned" else
                       {f"{l.name}.weight": W})
        tensors[f"{l.name}.bias"] = numpy.ascontiguousarray(_host(l.params["b"].data))
    metadata = {"format": "sparsenet-torch", "layout": layout, "network": json.dumps(description(net)),
                "input_layout": "NCHW"}
    with atomic_path(path) as tmp:
        mode = tmp.stat().st_mode  # save_file makes a new, private file: give it atomic_path's mode
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.chmod(mode)
    return {"format": "torch", "path": str(path), "bytes": Path(path).stat().st_size, "layout": layout,
            "tensors": len(tensors)}


def _check(f, path, key, shape, dtypes):
    """Raise unless tensor ``key`` of the open file ``f`` has ``shape`` and one of ``dtypes`` (nothing read)."""
    got, dtype = tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype()
    if got != tuple(shape):
        raise SparsenetError(f"{path}: tensor {key!r} has shape {got}, expected {tuple(shape)}")
    if dtype not in dtypes:
        raise SparsenetError(f"{path}: tensor {key!r} has dtype {dtype}, expected {', '.join(dtypes)}" + (
            " (NumPy has no bfloat16: save the file as float32)" if dtype == "BF16" else ""))


def import_torch(path, model, apply_masks=False):
    """Read a safetensors file in torch's layout (either, per layer: module docstring) into the network
    of ``model`` (a name in :data:`sparsenet.model.MODELS`, a description file, or a description dict).

    Every tensor is checked first: present (and nothing unknown), shape, dtype, finite as float32,
    masks 0/1 and 0 only over zeros (``apply_masks`` zeroes what they prune instead). Returns
    ``(net, info)``; ``info`` (JSON-able) says format, layout, source and sha256."""
    spec = model if isinstance(model, dict) else M.model_spec(model)
    M.check_spec(spec)  # (a dict's; model_spec checks a file's or a name's)
    path = Path(path)
    if not path.is_file():
        raise SparsenetError(f"{path}: no such file")
    if not _is_safetensors(path):
        raise SparsenetError(f"{path}: not a safetensors file (ONNX and other files are imported for "
                             f"{' and '.join(PREPROCESS)} only)")
    safe_open = _need("safetensors", path, "reading safetensors").safe_open
    try:
        with safe_open(str(path), framework="numpy") as f:
            keys, plan = set(f.keys()), []  # (name, W shape, b shape, chw, weight key, mask key or None, bias key)
            for name, *shapes in _weighted(spec):
                pruned = f"{name}.weight_orig" in keys
                plan.append((name, *shapes, f"{name}.weight" + ("_orig" if pruned else ""),
                             f"{name}.weight_mask" if pruned else None, f"{name}.bias"))
            wanted = [k for row in plan for k in row[4:] if k]
            for what, names in (("missing", [k for k in wanted if k not in keys]),
                                ("not part of the network", sorted(keys - set(wanted)))):
                if names:
                    raise SparsenetError(f"{path}: tensor {names[0]!r} is {what}"
                                         + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")
                                         + f" for {spec.get('name') or 'the network'} in torch's layout "
                                           "(<layer>.weight or <layer>.weight_orig and <layer>.weight_mask, "
                                           "<layer>.bias)")
            for _, wshape, bshape, _, wkey, mkey, bkey in plan:  # all shapes and dtypes before any data is read
                _check(f, path, wkey, _torch_shape(wshape), _FLOATS)
                _check(f, path, bkey, bshape, _FLOATS)
                if mkey:
                    _check(f, path, mkey, _torch_shape(wshape), _MASKS)
            arrays = {}
            for name, _, _, chw, wkey, mkey, bkey in plan:
                W = checked_cast(f.get_tensor(wkey), numpy.float32, f"{path}: tensor {wkey!r}")
                mask = numpy.ones_like(W)
                if mkey:
                    mask = checked_cast(f.get_tensor(mkey), numpy.float32, f"{path}: tensor {mkey!r}", exact=True)
                    if not numpy.all((mask == 0) | (mask == 1)):
                        raise SparsenetError(f"{path}: tensor {mkey!r} holds values other than 0 and 1")
                    hidden = int(numpy.count_nonzero((mask == 0) & (W != 0)))
                    if hidden and not apply_masks:
                        raise SparsenetError(
                            f"{path}: tensor {wkey!r} is non-zero at {hidden:,} entr{'y' if hidden == 1 else 'ies'} "
                            f"that {mkey!r} prunes (torch's prune keeps the original values there): --apply-masks "
                            "zeroes them")
                    W[mask == 0] = 0.0
                b = checked_cast(f.get_tensor(bkey), numpy.float32, f"{path}: tensor {bkey!r}")
                arrays[name] = _from_torch(W, chw), _from_torch(mask, chw), b
            layout = "pruned" if any(row[5] for row in plan) else "dense"
    except SparsenetError:
        raise
    except Exception as e:  # SafetensorError (not a safetensors file, bad header, truncated), OSError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SparsenetError(f"{path}: not a readable safetensors file ({first})") from None
    layers = [M.layer_from_spec(s, False) for s in spec["layers"]]  # zero weights, loaded next
    net = M.Network(layers, spec["input_shape"], spec.get("name", ""))
    for name, (W, mask, b) in arrays.items():
        net.layer(name).params["W"].load(W, mask)
        net.layer(name).params["b"].load(b, numpy.ones_like(b))
    return net, {"format": "safetensors", "layout": f"torch-{layout}", "source": str(path),
                 "sha256": file_sha256(path)}


def _is_safetensors(path):
    """Whether the file starts as safetensors does: an 8-byte header length, then the JSON header's "{"."""
    with open(path, "rb") as f:
        return f.read(9)[8:9] == b"{"


def _is_torch_layout(path, layer_names):
    """Whether ``path`` is a safetensors file of ours or of torch's layout for these layers (not a
    torchvision/timm VGG-16, whose tensors are named features.*, classifier.*)."""
    if not _is_safetensors(path):
        return False
    safe_open = _need("safetensors", path, "reading safetensors").safe_open
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
    except Exception:
        return False  # the pretrained reader says what is wrong with it
    return meta.get("format") == "sparsenet-torch" or any(k.rsplit(".", 1)[0] in layer_names for k in keys)


def import_file(path, model, out, force=False, apply_masks=False):
    """``sparsenet import``: the weights in ``path`` saved as a checkpoint at ``out`` (atomically; an
    existing ``out`` only replaced with ``force``, checked before anything is read). A safetensors file
    in torch's layout (:func:`import_torch`) for any network; for "alexnet" and "vgg-16" also the ONNX
    model zoo's and torchvision/timm files (:func:`sparsenet.pretrained.import_checkpoint`), told
    apart by the file's content. Returns the import's ``info``."""
    if Path(out).exists() and not force:
        raise SparsenetError(f"{out} already exists: not overwritten (use --force to replace it)")
    spec = M.model_spec(model)
    if not Path(path).is_file():
        raise SparsenetError(f"{path}: no such file")
    if model in PREPROCESS and not _is_torch_layout(path, {s["name"] for s in spec["layers"]}):
        if apply_masks:
            raise SparsenetError(f"{path}: --apply-masks is for torch's pruned layout (weight_orig, weight_mask); "
                                 "this file has no masks")
        return import_pretrained(path, model, out, force=force)
    net, info = import_torch(path, spec, apply_masks)
    save_checkpoint(out, net, config={"model": spec["name"], "imported": info})
    return info
