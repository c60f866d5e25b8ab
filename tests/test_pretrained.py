"""Pretrained-weight import (:mod:`sparsenet.pretrained`), proved against independent runtimes.

Files of the real layouts are built here with random (He-scaled) weights: the ONNX model zoo's
``bvlcalexnet`` (at 224, with the Caffe2 export's end padding, and at 227) and ``vgg16``, and
torchvision's and timm's VGG-16 as safetensors. onnxruntime (and torch, when installed) computes
the reference outputs from the same tensors in their own NCHW semantics; the imported NHWC
network must agree to float32 round-off. ``pytest -s`` prints each max |difference|.
"""
import copy
import json
import math
import os
import shutil
import struct

import numpy
import pytest

from sparsenet import pretrained as P
from sparsenet.checkpoint import load_checkpoint
from sparsenet.util import SparsenetError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
st = pytest.importorskip("safetensors.numpy")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

ALEX_CONV = [("conv1", 96, 3, 11, 4, 0, 1), ("conv2", 256, 96, 5, 1, 2, 2), ("conv3", 384, 256, 3, 1, 1, 1),
             ("conv4", 384, 384, 3, 1, 1, 2), ("conv5", 256, 384, 3, 1, 1, 2)]  # name, F, C, k, stride, pad, groups
FC = [("fc6", 4096), ("fc7", 4096), ("fc8", 1000)]
VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def he(rng, shape):
    """N(0, 2/fan_in) float32: activations stay O(1)·input through ReLU layers."""
    a = rng.standard_normal(shape, dtype=numpy.float32)
    a *= numpy.float32(math.sqrt(2.0 / math.prod(shape[1:])))
    return a


def bias(rng, n):
    return (0.1 * rng.standard_normal(n)).astype(numpy.float32)


def fc6_nhwc(S, c, h, w):
    """The expected fc6 conversion, written out here: columns (c, h, w) → (h, w, c)."""
    return S.reshape(len(S), c, h, w).transpose(0, 2, 3, 1).reshape(len(S), -1)


def compare(what, ours, ref):
    """Max |ours − ref|, printed and asserted within float32 round-off of ref's scale."""
    d, scale = float(numpy.abs(ours - ref).max()), float(numpy.abs(ref).max())
    print(f"\n{what}: max |diff| = {d:.3g} (max |ref| = {scale:.3g})")
    assert d <= 1e-4 * max(scale, 1e-3), f"{what}: max |diff| = {d:.3g}, max |ref| = {scale:.3g}"
    return d


def session(model_or_path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # no warning per initializer listed as a graph input
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def fails(path, match, model="alexnet", **kw):
    """import_weights raises a one-line SparsenetError naming the file and matching ``match``."""
    with pytest.raises(SparsenetError) as e:
        P.import_weights(path, model, **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and match in msg, msg
    assert e.value.__context__ is None or e.value.__suppress_context__, "a traceback from inside the reader"
    return msg


class Graph:
    """A chain of ONNX nodes, each reading the previous node's output (its name = the node's)."""

    def __init__(self, x, dims, weights_as_inputs=False):
        self.nodes, self.inits, self.feeds, self.cur, self.as_inputs = [], [], {}, x, weights_as_inputs
        self.inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, dims)]

    def add(self, op, name, *tensors, **attrs):
        for n, a in tensors:
            if self.as_inputs:  # fed at run time: no copy into a protobuf
                self.inputs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, a.shape))
                self.feeds[n] = a
            else:
                self.inits.append(numpy_helper.from_array(a, n))
        self.nodes.append(helper.make_node(op, [self.cur, *(n for n, _ in tensors)], [name], name=name, **attrs))
        self.cur = name
        return self

    def model(self, outputs, opset=9, list_inits=False):
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
        inputs = self.inputs + [helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                                for t in self.inits if list_inits]
        g = helper.make_graph(self.nodes, "g", inputs, outs, self.inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


# ----------------------------------------------------------------------------- AlexNet (ONNX zoo layout)
@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    """A folder for this module's files (~3 GB in all), removed afterwards: pytest keeps old ones."""
    path = tmp_path_factory.mktemp("pretrained")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def alex_w():
    """name -> (W, b) as stored: conv (F, C/g, k, k), fc (out, in) with NCHW-flatten columns."""
    rng, w = numpy.random.default_rng(1), {}
    for name, F, C, k, _, _, g in ALEX_CONV:
        w[name] = he(rng, (F, C // g, k, k)), bias(rng, F)
    for (name, n), d in zip(FC, (9216, 4096, 4096)):
        w[name] = he(rng, (n, d)), bias(rng, n)
    return w


def alexnet_graph(w, size, batch, reshape=(1, 9216), fc_ops=("Gemm",) * 3):
    """The bvlcalexnet chain: Conv (groups 2 in conv2/4/5), Relu, LRN, MaxPool 3/2 with the end
    padding that emulates Caffe's ceil rounding, Reshape, Gemm transB=1, Dropout, Softmax."""
    G, d = Graph("data_0", [batch, 3, size, size]), size
    for name, F, C, k, s, p, g in ALEX_CONV:
        G.add("Conv", name, (f"{name}_w", w[name][0]), (f"{name}_b", w[name][1]),
              kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, group=g)
        G.add("Relu", name.replace("conv", "relu"))
        d = (d + 2 * p - k) // s + 1
        if name in ("conv1", "conv2"):
            G.add("LRN", name.replace("conv", "norm"), size=5, alpha=1e-4, beta=0.75, bias=1.0)
        if name in ("conv1", "conv2", "conv5"):
            out = -(-(d - 3) // 2) + 1  # Caffe's ceil rounding ...
            end = (out - 1) * 2 + 3 - d  # ... as end padding (1 for pool1 at 224, else 0)
            G.add("MaxPool", name.replace("conv", "pool"), kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, end, end])
            d = out
    G.add("Reshape", "flatten", ("flatten_shape", numpy.array(reshape, numpy.int64)))
    for (name, _), op in zip(FC, fc_ops):
        W, b = w[name]
        if op == "Gemm":
            G.add("Gemm", name, (f"{name}_w", W), (f"{name}_b", b), transB=1)
        elif op == "GemmT":  # transB=0: stored (in, out)
            G.add("Gemm", name, (f"{name}_w", numpy.ascontiguousarray(W.T)), (f"{name}_b", b))
        else:  # MatMul (in, out) + Add
            G.add("MatMul", name + "_mm", (f"{name}_w", numpy.ascontiguousarray(W.T)))
            G.add("Add", name, (f"{name}_b", b))
        if name != "fc8":
            G.add("Relu", name.replace("fc", "relu")).add("Dropout", name.replace("fc", "drop"), ratio=0.5)
    return G.add("Softmax", "prob")


def our_logits(net, x_nchw):
    return net.forward(numpy.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1)))


def softmax(z):
    e = numpy.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def caffe_input(size, seed=2):  # BGR minus the mean: values in the hundreds, so the LRNs matter
    return numpy.random.default_rng(seed).uniform(-128, 128, (2, 3, size, size)).astype(numpy.float32)


@pytest.fixture(scope="module")
def alex224(tmp, alex_w):
    """The zoo file: batch 1, Reshape to [1, 9216], weights embedded."""
    path = tmp / "bvlcalexnet-224.onnx"
    onnx.save(alexnet_graph(alex_w, 224, 1).model(["prob", "fc8"]), path)
    return path


@pytest.fixture(scope="module")
def alex227(tmp, alex_w):
    """At 227 (no padding), any batch, Reshape to [-1, 9216], fc6 a Gemm with transB=0 (W stored
    (in, out)), fc8 MatMul + Add; the weights in an external data file and also listed as graph
    inputs (as older exports do). Returns (path, the small proto that tampering edits)."""
    m = alexnet_graph(alex_w, 227, "N", reshape=(-1, 9216), fc_ops=("GemmT", "Gemm", "MatMul")).model(
        ["prob", "fc8"], list_inits=True)
    path = tmp / "alexnet-227.onnx"
    onnx.save_model(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location="alexnet-227.bin")
    return path, m


def test_onnx_alexnet_224_matches_onnxruntime(alex224):
    net, info = P.import_weights(alex224, "alexnet")
    assert net.input_shape == (224, 224, 3) and net.count_params() == 60_965_224
    assert info["format"] == "onnx" and info["layout"] == "onnx-zoo" and info["input_size"] == 224
    assert info["preprocess"] == {"mode": "caffe", "size": 224, "resize": 256} and len(info["sha256"]) == 64
    json.dumps(info)
    x, sess = caffe_input(224), session(alex224)
    prob, logits = (numpy.concatenate(v) for v in zip(*(sess.run(["prob", "fc8"], {"data_0": x[i:i + 1]})
                                                         for i in range(len(x)))))
    z = our_logits(net, x)
    compare("onnx alexnet 224 logits", z, logits)
    compare("onnx alexnet 224 softmax", softmax(z), prob)


def test_onnx_alexnet_227_matches_onnxruntime(alex227):
    path, _ = alex227
    net, info = P.import_weights(path, "alexnet", input_size=227)
    assert net.input_shape == (227, 227, 3) and info["preprocess"]["size"] == 227
    x = caffe_input(227)
    prob, logits = session(path).run(["prob", "fc8"], {"data_0": x})
    z = our_logits(net, x)
    compare("onnx alexnet 227 logits", z, logits)
    compare("onnx alexnet 227 softmax", softmax(z), prob)


# ----------------------------------------------------------------------------- VGG-16
@pytest.fixture(scope="module")
def vgg_w():
    """torchvision's VGG-16 state dict, random: features.i (out, in, 3, 3), classifier.j (out, in)."""
    rng, w, c, i = numpy.random.default_rng(4), {}, 3, 0
    for v in VGG_CFG:
        if v == "M":
            i += 1
            continue
        w[f"features.{i}.weight"], w[f"features.{i}.bias"], c, i = he(rng, (v, c, 3, 3)), bias(rng, v), v, i + 2
    for j, (n, d) in zip((0, 3, 6), ((4096, 25088), (4096, 4096), (1000, 4096))):
        w[f"classifier.{j}.weight"], w[f"classifier.{j}.bias"] = he(rng, (n, d)), bias(rng, n)
    return w


@pytest.fixture(scope="module")
def vgg_x():
    return numpy.random.default_rng(5).standard_normal((2, 3, 224, 224), dtype=numpy.float32)


def vgg_features(G, w):
    i = 0
    for v in VGG_CFG:
        if v == "M":
            G.add("MaxPool", f"pool{i}", kernel_shape=[2, 2], strides=[2, 2], pads=[0] * 4)
            i += 1
        else:
            G.add("Conv", f"conv{i}", (f"features.{i}.weight", w[f"features.{i}.weight"]),
                  (f"features.{i}.bias", w[f"features.{i}.bias"]), kernel_shape=[3, 3], strides=[1, 1], pads=[1] * 4)
            G.add("Relu", f"relu{i}")
            i += 2
    return G


@pytest.fixture(scope="module")
def vgg_onnx(tmp, vgg_w):
    """The zoo's vgg16 (MXNet gluon export): Conv pads 1, Relu, MaxPool 2/2, then a Flatten before
    every Gemm (transB=1), Dropout. It is also torchvision's semantics on torchvision's tensors."""
    G = vgg_features(Graph("data", ["N", 3, 224, 224]), vgg_w)
    for j in (0, 3, 6):
        G.add("Flatten", f"flatten{j}", axis=1)
        G.add("Gemm", f"dense{j}", (f"classifier.{j}.weight", vgg_w[f"classifier.{j}.weight"]),
              (f"classifier.{j}.bias", vgg_w[f"classifier.{j}.bias"]), alpha=1.0, beta=1.0, transA=0, transB=1)
        if j < 6:
            G.add("Relu", f"relu_fc{j}").add("Dropout", f"drop{j}")
    path = tmp / "vgg16.onnx"
    onnx.save(G.model([G.cur], opset=8), path)
    return path


@pytest.fixture(scope="module")
def vgg_ref(vgg_onnx, vgg_x):
    """onnxruntime's logits on vgg_x: the oracle for the ONNX file and for torchvision's tensors."""
    return session(vgg_onnx).run(None, {"data": vgg_x})[0]


@pytest.fixture(scope="module")
def tv_file(tmp, vgg_w):
    path = tmp / "vgg16-torchvision.safetensors"
    st.save_file(vgg_w, path)
    return path


def timm_tensors(w):
    """timm's vgg16 keys and shapes for the same weights (timm's own torchvision conversion)."""
    t = {k: v for k, v in w.items() if k.startswith("features.")}
    for src, dst, shape in (("classifier.0", "pre_logits.fc1", (4096, 512, 7, 7)),
                            ("classifier.3", "pre_logits.fc2", (4096, 4096, 1, 1)), ("classifier.6", "head.fc", None)):
        t[f"{dst}.weight"] = w[f"{src}.weight"].reshape(shape or w[f"{src}.weight"].shape)
        t[f"{dst}.bias"] = w[f"{src}.bias"]
    return t


@pytest.fixture(scope="module")
def tv_logits(tv_file, vgg_x):
    net, info = P.import_weights(tv_file, "vgg-16")
    assert info["format"] == "safetensors" and info["layout"] == "torchvision"
    assert info["preprocess"] == {"mode": "torch", "size": 224, "resize": 256}
    assert net.count_params() == 138_357_544
    return our_logits(net, vgg_x)


def test_onnx_vgg16_matches_onnxruntime(vgg_onnx, vgg_x, vgg_ref):
    net, info = P.import_weights(vgg_onnx, "vgg-16")
    assert info["layout"] == "onnx-zoo" and info["preprocess"]["mode"] == "torch" and net.input_shape == (224, 224, 3)
    compare("onnx vgg16 logits", our_logits(net, vgg_x), vgg_ref)


def test_safetensors_torchvision_matches_onnxruntime(tv_logits, vgg_ref):
    compare("safetensors torchvision vgg16 logits", tv_logits, vgg_ref)


def test_safetensors_timm_float16_matches_onnxruntime(tmp, vgg_w, vgg_x):
    """A timm file in float16. Oracle: timm's semantics run by onnxruntime on the same values:
    pre_logits.fc1 a 7×7 Conv, fc2 a 1×1 Conv (each with ReLU), global average pool, flatten,
    head.fc a Gemm transB=1."""
    path = tmp / "vgg16-timm.safetensors"
    st.save_file({k: v.astype(numpy.float16) for k, v in timm_tensors(vgg_w).items()}, path)
    t = {k: v.astype(numpy.float32) for k, v in st.load_file(path).items()}
    net, info = P.import_weights(path, "vgg-16")
    assert info["layout"] == "timm"
    G = vgg_features(Graph("x", [2, 3, 224, 224], weights_as_inputs=True), t)
    for fc in ("fc1", "fc2"):
        G.add("Conv", fc, (f"{fc}.w", t[f"pre_logits.{fc}.weight"]), (f"{fc}.b", t[f"pre_logits.{fc}.bias"]))
        G.add("Relu", f"act_{fc}")
    G.add("GlobalAveragePool", "pool").add("Flatten", "flat")
    G.add("Gemm", "head", ("head.w", t["head.fc.weight"]), ("head.b", t["head.fc.bias"]), transB=1)
    ref = session(G.model(["head"], opset=13)).run(None, {"x": vgg_x, **G.feeds})[0]
    compare("safetensors timm (float16) vgg16 logits", our_logits(net, vgg_x), ref)


def test_safetensors_torchvision_matches_torch(tv_file, vgg_x, tv_logits):
    """Oracle: torch, with torchvision's module indices by hand, load_state_dict from the file."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file
    nn, layers, c = torch.nn, [], 3
    torch.set_num_threads(1)
    with torch.device("meta"):
        for v in VGG_CFG:
            layers += [nn.MaxPool2d(2, 2)] if v == "M" else [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
            c = c if v == "M" else v
        vgg = nn.Module()
        vgg.features, vgg.avgpool = nn.Sequential(*layers), nn.AdaptiveAvgPool2d((7, 7))
        vgg.classifier = nn.Sequential(nn.Linear(25088, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 4096),
                                       nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 1000))
    vgg.load_state_dict(load_file(tv_file), strict=True, assign=True)
    vgg.eval()
    with torch.no_grad():
        ref = vgg.classifier(torch.flatten(vgg.avgpool(vgg.features(torch.from_numpy(vgg_x))), 1)).numpy()
    compare("safetensors torchvision vgg16 vs torch", tv_logits, ref)


# ----------------------------------------------------------------------------- damaged and wrong files
def node(m, name):
    return next(n for n in m.graph.node if n.name == name)


def set_attr(name, **attrs):
    def edit(m):
        n = node(m, name)
        for k, v in attrs.items():
            keep = [a for a in n.attribute if a.name != k]
            del n.attribute[:]
            n.attribute.extend(keep + [helper.make_attribute(k, v)])
    return edit


def set_tensor(name, a):
    def edit(m):
        i = next(i for i, t in enumerate(m.graph.initializer) if t.name == name)
        m.graph.initializer[i].CopyFrom(numpy_helper.from_array(a, name))
    return edit


def drop_tensor(name):
    def edit(m):
        for seq in (m.graph.initializer, m.graph.input):
            i = next(i for i, t in enumerate(seq) if t.name == name)
            del seq[i]
    return edit


def replace_op(name, op):
    def edit(m):
        node(m, name).op_type = op
    return edit


def insert_relu_after(name):
    def edit(m):
        nodes = list(m.graph.node)
        i = next(i for i, n in enumerate(nodes) if n.name == name)
        nodes[i + 1].input[0] = "extra"
        nodes.insert(i + 1, helper.make_node("Relu", [name], ["extra"], name="extra"))
        del m.graph.node[:]
        m.graph.node.extend(nodes)
    return edit


def end_after(name):
    def edit(m):
        nodes = list(m.graph.node)
        keep = nodes[:next(i for i, n in enumerate(nodes) if n.name == name) + 1]
        del m.graph.node[:], m.graph.output[:]
        m.graph.node.extend(keep)
        m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return edit


NAN_CONV3 = numpy.where(numpy.arange(384 * 256 * 9) == 7, numpy.nan, 0.01).astype(numpy.float32).reshape(384, 256, 3, 3)

ONNX_CASES = {  # edit of the 227 file -> what the one-line error must say
    "conv stride": (set_attr("conv1", strides=[2, 2]), "strides = [2, 2], but alexnet layer 'conv1' has [4, 4]"),
    "conv group": (set_attr("conv4", group=1), "group = 1, but alexnet layer 'conv4' has 2"),
    "conv dilation": (set_attr("conv3", dilations=[2, 2]), "dilations = [2, 2]"),
    "lrn size": (set_attr("norm1", size=3), "size = 3, but alexnet layer 'norm1' has 5"),
    "lrn beta": (set_attr("norm2", beta=0.5), "beta = 0.5"),
    "pool begin pad": (set_attr("pool5", pads=[1, 1, 0, 0]), "pads [1, 1, 0, 0] pad the start"),
    "pool rounding": (set_attr("pool1", ceil_mode=1, pads=[0, 0, 2, 2]),
                      "give a 28x28 output, alexnet layer 'pool1' 27x27"),
    "pool kernel": (set_attr("pool2", kernel_shape=[2, 2]), "kernel_shape = [2, 2]"),
    "gemm alpha": (set_attr("fc7", alpha=2.0), "alpha = 2.0"),
    "gemm transA": (set_attr("fc6", transA=1), "transA = 1"),
    "unsupported op": (replace_op("relu3", "Sigmoid"), "unsupported operator where alexnet has layer 'relu3'"),
    "wrong shape": (set_tensor("conv2_w", numpy.zeros((256, 96, 5, 5), numpy.float32)),
                    "tensor 'conv2_w' has shape (256, 96, 5, 5), expected (256, 48, 5, 5)"),
    "missing tensor": (drop_tensor("fc7_b"), "initializer 'fc7_b' is missing"),
    "nan": (set_tensor("conv3_w", NAN_CONV3), "'conv3_w' holds NaN or infinite values"),
    "integer weights": (set_tensor("fc8_b", numpy.zeros(1000, numpy.int32)), "dtype int32"),
    "extra layer": (insert_relu_after("fc8"), "an extra layer"),
    "missing layer": (end_after("drop7"), "the graph ends before alexnet layer 'fc8'"),
    "bad reshape": (set_tensor("flatten_shape", numpy.array([9216, -1], numpy.int64)), "reshape to [9216, -1]"),
}


def tampered(tmp, alex227, case):
    """The 227 file edited (a small proto: the weights stay in the external data file)."""
    m = copy.deepcopy(alex227[1])
    ONNX_CASES[case][0](m)
    path = tmp / f"tampered-{case.replace(' ', '-')}.onnx"
    onnx.save(m, path)
    return path


@pytest.mark.parametrize("case", ONNX_CASES)
def test_onnx_tampered(case, tmp, alex227):
    fails(tampered(tmp, alex227, case), ONNX_CASES[case][1])


def test_onnx_wrong_network_and_size(alex227, alex224):
    fails(alex227[0], "kernel_shape = [11, 11], but vgg-16 layer 'conv1_1' has [3, 3]", model="vgg-16")
    fails(alex224, "the graph's input is 224x224, not 227x227", input_size=227)


def test_unreadable_files(tmp, alex224):
    trunc = tmp / "truncated.onnx"
    with open(alex224, "rb") as f:
        trunc.write_bytes(f.read(os.path.getsize(alex224) // 2))
    fails(trunc, "not a readable ONNX model")
    text = tmp / "notes.onnx"
    text.write_text("these are not the weights you are looking for\n" * 20)
    fails(text, "not a readable ONNX model")
    fails(tmp / "absent.onnx", "no such file")
    small = tmp / "small.safetensors"
    st.save_file({"features.0.weight": numpy.zeros((64, 3, 3, 3), numpy.float32)}, small)
    cut = tmp / "cut.safetensors"
    cut.write_bytes(small.read_bytes()[:-10])
    fails(cut, "not a readable safetensors file", model="vgg-16")
    bad = tmp / "bad-header.safetensors"
    bad.write_bytes(struct.pack("<Q", 12) + b"{not json!!}")
    fails(bad, "not a readable safetensors file", model="vgg-16")


def raw_safetensors(path, tensors):
    """A safetensors file written by hand: {name: (dtype tag, shape, bytes)} (e.g. BF16)."""
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def tiny(w, **replace):
    """Every key of ``w`` with a 1-element tensor (for errors found before any shape is read)."""
    return {**{k: numpy.zeros(1, numpy.float32) for k in w}, **replace}


SAFETENSORS_CASES = {
    "unknown layout": (lambda w: {"fc.weight": numpy.zeros(2, numpy.float32)}, "unknown layout"),
    "missing": (lambda w: {k: v for k, v in tiny(w).items() if k != "classifier.6.bias"},
                "torchvision VGG-16 layout: tensor 'classifier.6.bias' is missing"),
    "extra": (lambda w: tiny(w, **{"classifier.7.weight": numpy.zeros(1, numpy.float32)}),
              "tensor 'classifier.7.weight' is unexpected"),
    "timm missing": (lambda w: {k: v for k, v in tiny(timm_tensors(w)).items() if k != "head.fc.weight"},
                     "timm VGG-16 layout: tensor 'head.fc.weight' is missing"),
    "integer dtype": (lambda w: tiny(w, **{"features.0.weight": numpy.zeros((64, 3, 3, 3), numpy.int32)}),
                      "'features.0.weight' has dtype I32"),
    "conv stored NHWC": (lambda w: tiny(w, **{**{k: v for k, v in w.items() if k.startswith("features.")},
                                            "features.28.weight": w["features.28.weight"].transpose(0, 2, 3, 1)}),
                         "'features.28.weight' has shape (512, 3, 3, 512), expected (512, 512, 3, 3)"),
    "inf (float16)": (lambda w: {**{k: v.astype(numpy.float16) for k, v in w.items()},
                                 "classifier.6.weight": numpy.where(numpy.arange(4096) == 5, numpy.inf,
                                                                    w["classifier.6.weight"]).astype(numpy.float16)},
                      "'classifier.6.weight' holds NaN or infinite values"),
}


@pytest.mark.parametrize("case", SAFETENSORS_CASES)
def test_safetensors_tampered(case, tmp, vgg_w):
    make, match = SAFETENSORS_CASES[case]
    path = tmp / f"tampered-{case.replace(' ', '-')}.safetensors"
    st.save_file({k: numpy.ascontiguousarray(v) for k, v in make(vgg_w).items()}, path)
    fails(path, match, model="vgg-16")


def test_safetensors_bfloat16_is_refused_plainly(tmp, vgg_w):
    path = tmp / "bf16.safetensors"
    raw_safetensors(path, {k: ("BF16", (64, 3, 3, 3), bytes(2 * 1728)) if k == "features.0.weight" else
                           ("F32", (1,), bytes(4)) for k in vgg_w})
    fails(path, "has dtype BF16, expected F16, F32 or F64 (NumPy has no bfloat16", model="vgg-16")


def test_bad_requests(tmp, tv_file, alex224):
    fails(tv_file, "safetensors files are imported for vgg-16 only, not alexnet")
    fails(tv_file, "vgg-16 cannot take a 100x100 input", model="vgg-16", input_size=100)
    for model, size in (("lenet-5", None), ("alexnet", 0), ("alexnet", True)):
        with pytest.raises(SparsenetError, match="lenet-5|input size"):
            P.import_weights(alex224, model, input_size=size)


def test_missing_package_is_one_line(monkeypatch, alex224):
    real = P.importlib.import_module

    def import_module(name):
        if name == "onnx":
            raise ImportError("No module named 'onnx'")
        return real(name)

    monkeypatch.setattr(P.importlib, "import_module", import_module)
    fails(alex224, "reading this file needs the 'onnx' package: pip install onnx")


def assert_alexnet_weights(net, w):
    """The conversions, as equations: conv (F, C, k, k) → (F, k, k, C); fc6 columns (c, h, w) →
    (h, w, c); fc (out, in) as stored (transB=1) or transposed back (transB=0, MatMul)."""
    p = net.params()
    for name, *_ in ALEX_CONV:
        assert numpy.array_equal(p[f"{name}.W"].data, w[name][0].transpose(0, 2, 3, 1))
    assert numpy.array_equal(p["fc6.W"].data, fc6_nhwc(w["fc6"][0], 256, 6, 6))
    for name in ("fc7", "fc8"):
        assert numpy.array_equal(p[f"{name}.W"].data, w[name][0])
    assert all(numpy.array_equal(p[f"{name}.b"].data, w[name][1]) for name in w)
    assert all(bool(q.mask.all()) for q in p.values())


def test_onnx_gemm_on_the_pooled_map(tmp, alex_w, alex227):
    """Old Caffe2 exports feed pool5's (N, 256, 6, 6) straight to Gemm (Caffe2's FC flattens it;
    onnxruntime refuses such a graph, so the weights are checked against the equations)."""
    m = copy.deepcopy(alex227[1])
    nodes = [n for n in m.graph.node if n.name != "flatten"]
    node(m, "fc6").input[0] = "pool5"
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    path = tmp / "alexnet-no-reshape.onnx"
    onnx.save(m, path)
    assert_alexnet_weights(P.import_weights(path, "alexnet")[0], alex_w)


# ----------------------------------------------------------------------------- checkpoints
def test_import_checkpoint(tmp, alex_w, alex227):
    src, out = alex227[0], tmp / "ck" / "alexnet.h5"
    info = P.import_checkpoint(src, "alexnet", out)
    ck = load_checkpoint(out)
    assert ck.config == {"model": "alexnet", "dataset": "imagenet", "preprocess": info["preprocess"],
                         "imported": info} and info["source"] == str(src)
    assert_alexnet_weights(ck.net, alex_w)
    before = out.read_bytes()
    with pytest.raises(SparsenetError, match="already exists"):
        P.import_checkpoint(src, "alexnet", out)
    bad = tampered(tmp, alex227, "nan")
    with pytest.raises(SparsenetError, match="NaN"):
        P.import_checkpoint(bad, "alexnet", out, force=True)
    with pytest.raises(SparsenetError, match="NaN"):
        P.import_checkpoint(bad, "alexnet", tmp / "ck" / "new.h5")
    assert out.read_bytes() == before and sorted(f.name for f in out.parent.iterdir()) == ["alexnet.h5"]
