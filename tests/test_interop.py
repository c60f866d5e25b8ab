"""ONNX and torch (safetensors) export, and torch's layout back in (:mod:`sparsenet.interop`).

The ONNX files run in onnxruntime, an independent runtime, and must give the logits of sparsenet's
own ``Network.forward``; the torch files load into the torch module of docs/interop.md (when torch
is installed) and must give them too. Networks are pruned, and one surviving weight is set to
exactly 0.0: it must stay a connection through every file that records connections.
"""
import json
import re
from pathlib import Path

import numpy
import pytest
from hypothesis import given, strategies as st

from sparsenet import interop
from sparsenet.checkpoint import load_checkpoint, save_checkpoint
from sparsenet.cli import main
from sparsenet.layers import pool_output_size
from sparsenet.model import build_model, build_network
from sparsenet.pruning import prune, prune_at_random
from sparsenet.util import SparsenetError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
stn = pytest.importorskip("safetensors.numpy")
from onnx import numpy_helper  # noqa: E402

# An AlexNet in miniature: strided conv, LRN, Caffe's ceil pools (10 → 5 and 5 → 3, floor: 4 and 2; the
# first on values of both signs, so that a window overhanging the input by a 0 instead of nothing shows),
# a grouped conv, dropout, flatten of a 3×3×12 map.
CNN = {"name": "small-cnn", "input_shape": [19, 19, 3], "layers": [
    {"kind": "conv2d", "name": "conv1", "c_in": 3, "c_out": 8, "k": 3, "stride": 2, "pad": 1},
    {"kind": "lrn", "name": "norm1", "size": 3, "alpha": 0.5, "beta": 0.75, "k": 2.0},
    {"kind": "maxpool2d", "name": "pool1", "k": 3, "stride": 2, "ceil": True},
    {"kind": "relu", "name": "relu1"},
    {"kind": "conv2d", "name": "conv2", "c_in": 8, "c_out": 12, "k": 3, "pad": 1, "groups": 2},
    {"kind": "relu", "name": "relu2"},
    {"kind": "maxpool2d", "name": "pool2", "k": 2, "stride": 2, "ceil": True},
    {"kind": "flatten", "name": "flatten"},
    {"kind": "dropout", "name": "drop1", "rate": 0.3},
    {"kind": "linear", "name": "fc1", "n_in": 108, "n_out": 20},
    {"kind": "relu", "name": "relu3"},
    {"kind": "linear", "name": "fc2", "n_in": 20, "n_out": 7}]}
DOCS = Path(__file__).resolve().parent.parent / "docs" / "interop.md"


@pytest.fixture
def cnn_file(tmp_path):
    path = tmp_path / "small-cnn.json"
    path.write_text(json.dumps(CNN))
    return str(path)


def model_arg(model, cnn_file):
    return cnn_file if model == "cnn" else model


def random_biases(net, seed):
    """Biases start at 0: give them values, so that a misplaced bias shows."""
    rng = numpy.random.default_rng(seed)
    for p in net.params().values():
        if not p.prunable:
            p.data[...] = 0.1 * rng.standard_normal(p.data.shape)
    return net


def pruned(model, seed=0):
    """``model`` with random biases, 80% of each weight pruned, and the first survivor of the first
    weight set to exactly 0.0; returns ``(net, (param name, flat index of that survivor))``."""
    net = random_biases(build_model(model, seed), seed)
    prune(net, "percentile", 0.8)
    name = next(n for n, p in net.params().items() if p.prunable)
    i = int(numpy.flatnonzero(net.params()[name].mask)[0])
    net.params()[name].data.flat[i] = 0.0
    return net, (name, i)


def images(net, n=5, seed=1):
    return numpy.random.default_rng(seed).standard_normal((n, *net.input_shape)).astype(numpy.float32)


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def compare(ours, ref):
    d, scale = float(numpy.abs(ours - ref).max()), float(numpy.abs(ref).max())
    assert ours.shape == ref.shape and d <= 1e-4 * max(scale, 1e-3), f"max |diff| {d:.3g}, max |ref| {scale:.3g}"


def torch_layout(W, chw=None):
    """The expected torch layout, written out entry by entry: conv T[f, c, i, j] = W[f, i, j, c];
    after the flatten of an (H, W, C) map T[o, (c·H + h)·W + w] = W[o, (h·W + w)·C + c]."""
    if W.ndim == 4:
        return numpy.einsum("fijc->fcij", W)
    if chw is None:
        return W
    H, Wd, C = chw
    h, w, c = numpy.meshgrid(numpy.arange(H), numpy.arange(Wd), numpy.arange(C), indexing="ij")
    T = numpy.empty_like(W)
    T[:, ((c * H + h) * Wd + w).ravel()] = W[:, ((h * Wd + w) * C + c).ravel()]
    return T


def assert_same_params(a, b, masks=True):
    for (name, p), q in zip(a.params().items(), b.params().values()):
        assert numpy.array_equal(p.data, q.data), name
        assert numpy.array_equal(q.mask, p.mask if masks else numpy.ones_like(p.mask)), name


# ----------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse-initializers"])
@pytest.mark.parametrize("model", ["lenet-300-100", "lenet-5", "cnn"])
def test_onnx_runs_in_onnxruntime_as_forward(model, sparse, tmp_path, cnn_file):
    net, _ = pruned(model_arg(model, cnn_file))
    out = tmp_path / "net.onnx"
    info = interop.export_onnx(net, out, sparse_initializers=sparse)
    assert info["bytes"] == out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".json") == ["net.onnx"]  # no temporary left
    s = session(out)
    (i,), (o,) = s.get_inputs(), s.get_outputs()
    assert (i.name, i.shape, i.type) == ("input", ["N", *net.input_shape], "tensor(float)")
    assert (o.name, o.shape) == ("logits", ["N", net.n_classes])
    x = images(net)
    compare(s.run(None, {"input": x})[0], net.forward(x))


def test_onnx_initializers_hold_exact_zeros_and_sparse_ones_the_connections(tmp_path, cnn_file):
    net, (name0, i0) = pruned(cnn_file)
    interop.export_onnx(net, tmp_path / "dense.onnx")
    interop.export_onnx(net, tmp_path / "sparse.onnx", sparse_initializers=True)
    dense, sparse = (onnx.load(str(tmp_path / f)) for f in ("dense.onnx", "sparse.onnx"))
    props = {p.key: p.value for p in dense.metadata_props}
    spec = json.loads(props["sparsenet.network"])
    assert props["sparsenet.input_layout"] == "NHWC" and build_network(spec).spec()["layers"] == net.spec()["layers"]
    inits = {t.name: numpy_helper.to_array(t) for t in dense.graph.initializer}
    sparse_inits = {t.values.name: t for t in sparse.graph.sparse_initializer}
    weights = [n for n, p in net.params().items() if p.prunable]
    assert sorted(sparse_inits) == sorted(f"{n[:-2]}.weight" for n in weights)
    for name in weights:
        p, key = net.params()[name], f"{name[:-2]}.weight"
        W, mask = torch_layout(p.data), torch_layout(p.mask)  # linear: as it is (the graph flattens NHWC)
        assert numpy.array_equal(inits[key], W) and inits[key].dtype == numpy.float32
        assert not inits[key][mask == 0].any() and (mask == 0).sum() >= 0.79 * mask.size  # exact zeros, 80% pruned
        t = sparse_inits[key]
        idx = numpy_helper.to_array(t.indices)
        assert list(t.dims) == list(W.shape) and numpy.array_equal(idx, numpy.flatnonzero(mask))
        assert numpy.array_equal(numpy_helper.to_array(t.values), W.ravel()[idx])
        assert key not in {t.name for t in sparse.graph.initializer}
    where = torch_layout(numpy.arange(net.params()[name0].data.size).reshape(net.params()[name0].data.shape))
    survivor = numpy.flatnonzero(where.ravel() == i0)[0]  # the survivor of value 0.0, at its (F, C, k, k) position
    assert survivor in numpy_helper.to_array(sparse_inits[f"{name0[:-2]}.weight"].indices)


def test_real_alexnet_onnx(tmp_path):
    """Caffe's AlexNet at full size (61M parameters): LRN, groups, ceil pools at 227."""
    net = build_model("alexnet")
    for p in net.params().values():
        if not p.prunable:
            p.data[...] = 0.01
    interop.export_onnx(net, tmp_path / "alexnet.onnx")
    x = images(net, n=1)
    compare(session(tmp_path / "alexnet.onnx").run(None, {"input": x})[0], net.forward(x))


@st.composite
def small_networks(draw):
    """A conv (groups, stride, pad) → [LRN] → max-pool (any k, stride and rounding) → ReLU → flatten →
    linear; the pool sees values of both signs."""
    g = draw(st.sampled_from([1, 2]))
    H, Wd, C, F = draw(st.integers(4, 9)), draw(st.integers(4, 9)), g * draw(st.integers(1, 2)), g * draw(
        st.integers(1, 3))
    k, stride, pad = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 1))
    Ho, Wo = ((n + 2 * pad - k) // stride + 1 for n in (H, Wd))
    pk = draw(st.integers(1, min(Ho, Wo, 3)))
    layers = [{"kind": "conv2d", "name": "conv", "c_in": C, "c_out": F, "k": k, "stride": stride, "pad": pad,
               "groups": g}]
    if draw(st.booleans()):
        layers.append({"kind": "lrn", "name": "norm", "size": draw(st.sampled_from([1, 3, 5])), "alpha": 0.3,
                       "beta": 0.75, "k": 1.5})
    ps, ceil = draw(st.integers(1, 3)), draw(st.booleans())
    n_in = pool_output_size(Ho, pk, ps, ceil) * pool_output_size(Wo, pk, ps, ceil) * F
    layers += [{"kind": "maxpool2d", "name": "pool", "k": pk, "stride": ps, "ceil": ceil},
               {"kind": "relu", "name": "relu"}, {"kind": "flatten", "name": "flat"}, {"kind": "linear", "name": "fc", "n_in": n_in, "n_out": 3}]
    return {"name": "net", "input_shape": [H, Wd, C], "layers": layers}, draw(st.floats(0.2, 1.0)), draw(
        st.integers(0, 2**16))


@given(small_networks())
def test_random_networks_agree_in_onnxruntime_and_round_trip_through_torch(tmp_path_factory, case):
    spec, density, seed = case
    net = prune_at_random(random_biases(build_network(spec, seed), seed), {"conv": density, "fc": density}, seed)
    tmp = tmp_path_factory.mktemp("random")
    interop.export_onnx(net, tmp / "n.onnx")
    x = images(net, n=2, seed=seed)
    compare(session(tmp / "n.onnx").run(None, {"input": x})[0], net.forward(x))
    interop.export_torch(net, tmp / "n.safetensors")
    assert_same_params(net, interop.import_torch(tmp / "n.safetensors", spec)[0])


# ----------------------------------------------------------------------------- torch: export and import
def test_torch_file_holds_torch_prunes_layout(tmp_path, cnn_file):
    net, _ = pruned(cnn_file)
    interop.export_torch(net, tmp_path / "p.safetensors")
    interop.export_torch(net, tmp_path / "d.safetensors", layout="dense")
    p, d = (stn.load_file(str(tmp_path / f)) for f in ("p.safetensors", "d.safetensors"))
    chw = {"conv1": None, "conv2": None, "fc1": (3, 3, 12), "fc2": None}  # fc1 follows the flatten of 3x3x12
    assert sorted(p) == sorted(f"{n}.{k}" for n in chw for k in ("weight_orig", "weight_mask", "bias"))
    assert sorted(d) == sorted(f"{n}.{k}" for n in chw for k in ("weight", "bias"))
    for name, c in chw.items():
        W, M, b = (net.params()[f"{name}.{k}"] for k in ("W", "W", "b"))
        assert numpy.array_equal(p[f"{name}.weight_orig"], torch_layout(W.data, c))
        assert numpy.array_equal(p[f"{name}.weight_mask"], torch_layout(M.mask, c))
        assert numpy.array_equal(d[f"{name}.weight"], p[f"{name}.weight_orig"])
        assert numpy.array_equal(p[f"{name}.bias"], b.data) and numpy.array_equal(d[f"{name}.bias"], b.data)
        assert all(a.dtype == numpy.float32 for a in p.values())
    from safetensors import safe_open
    with safe_open(str(tmp_path / "p.safetensors"), framework="numpy") as f:
        meta = f.metadata()
    assert meta["format"] == "sparsenet-torch" and meta["layout"] == "pruned" and meta["input_layout"] == "NCHW"
    assert json.loads(meta["network"]) == {k: net.spec()[k] for k in ("name", "input_shape", "layers")}


@pytest.mark.parametrize("model", ["lenet-5", "cnn"])
def test_torch_round_trip_through_the_command_line(model, tmp_path, cnn_file, capsys):
    net, (name0, i0) = pruned(model_arg(model, cnn_file))
    save_checkpoint(tmp_path / "ck.h5", net)
    for layout in ("pruned", "dense"):
        out, back = tmp_path / f"{layout}.safetensors", tmp_path / f"{layout}.h5"
        assert main(["export", str(tmp_path / "ck.h5"), str(out), "--layout", layout]) == 0
        assert main(["import", str(out), "--model", model_arg(model, cnn_file), "--out", str(back)]) == 0
        assert f"torch-{layout} layout" in capsys.readouterr().out
        ck = load_checkpoint(back)
        assert_same_params(net, ck.net, masks=layout == "pruned")  # the dense layout has no masks
        assert ck.config["imported"]["source"] == str(out) and ck.config["model"] == net.name
    survivor = load_checkpoint(tmp_path / "pruned.h5").net.params()[name0]
    assert survivor.data.flat[i0] == 0.0 and survivor.mask.flat[i0] == 1  # still a connection


def tampered(tmp_path, net, change):
    """The pruned-layout file of ``net`` with ``change(tensors)`` applied (metadata kept)."""
    interop.export_torch(net, tmp_path / "good.safetensors")
    t = stn.load_file(str(tmp_path / "good.safetensors"))
    change(t)
    path = tmp_path / "bad.safetensors"
    stn.save_file(t, str(path), metadata={"format": "sparsenet-torch"})
    return path


def hide(t):
    """A value under a pruned mask, as torch's prune leaves it."""
    m = t["fc1.weight_mask"]
    t["fc1.weight_orig"][m == 0] = numpy.where(numpy.arange((m == 0).sum()) < 3, 0.25, 0.0)


def nan(t):
    t["conv2.weight_orig"].flat[numpy.flatnonzero(t["conv2.weight_mask"])[1]] = numpy.nan


def _set(key, value):
    def change(t):
        t[key] = value
    return change


REFUSED = {
    "hidden": (hide, "tensor 'fc1.weight_orig' is non-zero at 3 entries that 'fc1.weight_mask' prunes"),
    "shape": (_set("fc1.bias", numpy.zeros(3, numpy.float32)), "tensor 'fc1.bias' has shape (3,), expected (20,)"),
    "missing": (lambda t: t.pop("conv1.bias"), "tensor 'conv1.bias' is missing"),
    "unknown": (_set("fc3.weight", numpy.zeros(1, numpy.float32)), "tensor 'fc3.weight' is not part of the network"),
    "nan": (nan, "tensor 'conv2.weight_orig' holds NaN"),
    "mask": (lambda t: t["fc2.weight_mask"].__setitem__((0, 0), 0.5), "'fc2.weight_mask' holds values other than"),
    "dtype": (_set("fc2.bias", numpy.zeros(7, numpy.int32)), "tensor 'fc2.bias' has dtype I32"),
    "range": (lambda t: t.__setitem__("fc2.bias", numpy.full(7, 1e300)), "'fc2.bias' holds 1e+300, outside the range"),
}


@pytest.mark.parametrize("case", [*REFUSED, "not-safetensors", "truncated"])
def test_import_refusals_are_one_line_and_write_nothing(case, tmp_path, cnn_file, capsys):
    net, _ = pruned(cnn_file)
    if case in REFUSED:
        path, needle = tampered(tmp_path, net, REFUSED[case][0]), REFUSED[case][1]
    else:
        interop.export_torch(net, tmp_path / "good.safetensors")
        data = (tmp_path / "good.safetensors").read_bytes()
        path = tmp_path / "bad.safetensors"
        path.write_bytes(b"not tensors at all, just some text" if case == "not-safetensors" else data[:len(data) // 2])
        needle = "not a safetensors file" if case == "not-safetensors" else "not a readable safetensors file"
    before = sorted(tmp_path.iterdir())
    capsys.readouterr()
    assert main(["import", str(path), "--model", cnn_file, "--out", str(tmp_path / "ck.h5")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"sparsenet: error: {path}: ") and needle in err, err
    assert sorted(tmp_path.iterdir()) == before
    if case == "hidden":
        assert "--apply-masks" in err
        assert main(["import", str(path), "--model", cnn_file, "--out", str(tmp_path / "ck.h5"), "--apply-masks"]) == 0
        assert_same_params(net, load_checkpoint(tmp_path / "ck.h5").net)  # the hidden values zeroed, masks kept


def test_import_checks_out_before_reading(tmp_path, cnn_file, capsys):
    (tmp_path / "ck.h5").write_bytes(b"keep me")
    assert main(["import", str(tmp_path / "absent.safetensors"), "--model", cnn_file, "--out",
                 str(tmp_path / "ck.h5")]) == 2
    assert "ck.h5 already exists" in capsys.readouterr().err and (tmp_path / "ck.h5").read_bytes() == b"keep me"


def test_import_dispatches_on_the_files_layout(tmp_path, capsys):
    """alexnet/vgg-16 still read the model zoo's and torchvision's files; tensors named after the
    network's layers are torch's layout; --apply-masks is refused where no file has masks."""
    tv, ours = tmp_path / "tv.safetensors", tmp_path / "ours.safetensors"
    stn.save_file({"features.0.weight": numpy.zeros(1, numpy.float32)}, str(tv))
    stn.save_file({"conv1.weight": numpy.zeros(1, numpy.float32)}, str(ours))
    for path, args, needle in (
            (tv, (), "safetensors files are imported for vgg-16 only, not alexnet"),  # the pretrained reader
            (ours, (), "tensor 'conv1.bias' is missing (and 14 more) for alexnet in torch's layout"),
            (tv, ("--apply-masks",), "--apply-masks is for torch's pruned layout")):
        assert main(["import", str(path), "--model", "alexnet", "--out", str(tmp_path / "ck.h5"), *args]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and needle in err, err
    with pytest.raises(SparsenetError, match="not a safetensors file"):
        interop.import_torch(Path(__file__).parent / "fixtures" / "mlp_checkpoint_v1.h5", "lenet-300-100")
    assert not (tmp_path / "ck.h5").exists()


@pytest.mark.parametrize("args, needle", [
    (("OUT.onnx", "--layout", "dense"), "--layout is an option of --format torch, not onnx"),
    (("OUT.safetensors", "--sparse-initializers"), "--sparse-initializers is an option of --format onnx"),
    (("--report", "--format", "onnx"), "--format onnx needs an output file"),
])
def test_export_option_errors(args, needle, tmp_path, capsys):
    save_checkpoint(tmp_path / "ck.h5", build_model("lenet-300-100"))
    args = [str(tmp_path / a) if a.startswith("OUT") else a for a in args]
    assert main(["export", str(tmp_path / "ck.h5"), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.h5"]


LRN_ANYWHERE = [  # LRN across the last axis of a vector, of a (H, W) map, and of a (H, W, C) map
    ([6], [{"kind": "linear", "name": "fc1", "n_in": 6, "n_out": 5}, {"kind": "lrn", "name": "norm", "size": 3},
           {"kind": "linear", "name": "fc2", "n_in": 5, "n_out": 3}]),
    ([4, 5], [{"kind": "lrn", "name": "norm", "size": 3}, {"kind": "flatten", "name": "flat"},
              {"kind": "linear", "name": "fc", "n_in": 20, "n_out": 3}]),
    ([4, 4, 3], [{"kind": "lrn", "name": "norm", "size": 3}, {"kind": "flatten", "name": "flat"},
                 {"kind": "linear", "name": "fc", "n_in": 48, "n_out": 3}])]


@pytest.mark.parametrize("shape, layers", LRN_ANYWHERE, ids=["vector", "map", "channels"])
def test_onnx_lrn_on_any_input_runs_as_forward(shape, layers, tmp_path):
    net = build_network({"name": "lrn", "input_shape": shape, "layers": layers})
    interop.export_onnx(net, tmp_path / "m.onnx")
    x = images(net)
    compare(session(tmp_path / "m.onnx").run(None, {"input": x})[0], net.forward(x, train=False))


@pytest.mark.parametrize("names", [["input", "r", "fc"], ["fc1", "logits", "fc"], ["fc1", "fc1.weight", "fc"],
                                   ["a:out", "a", "b"]])
def test_onnx_takes_layer_names_that_look_like_its_tensors(names, tmp_path):
    net = build_network({"name": "n", "input_shape": [6], "layers": [
        {"kind": "linear", "name": names[0], "n_in": 6, "n_out": 5}, {"kind": "relu", "name": names[1]},
        {"kind": "linear", "name": names[2], "n_in": 5, "n_out": 3}]})
    interop.export_onnx(net, tmp_path / "n.onnx")
    x = images(net)
    compare(session(tmp_path / "n.onnx").run(None, {"input": x})[0], net.forward(x, train=False))


def test_export_onto_a_folder_is_one_line_and_leaves_nothing(tmp_path, capsys):
    (tmp_path / "out.onnx").mkdir()
    (tmp_path / "out.safetensors").mkdir()
    save_checkpoint(tmp_path / "ck.h5", build_model("lenet-300-100"))
    for name in ("out.onnx", "out.safetensors"):
        assert main(["export", str(tmp_path / "ck.h5"), str(tmp_path / name), "--force"]) == 2
        err = capsys.readouterr().err
        assert "a folder is in the way" in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.h5", "out.onnx", "out.safetensors"]
    assert not any(list((tmp_path / n).iterdir()) for n in ("out.onnx", "out.safetensors"))


def test_export_refuses_dotted_layer_names(tmp_path):
    spec = {**CNN, "layers": [{**s, "name": "conv.1"} if s["name"] == "conv1" else s for s in CNN["layers"]]}
    with pytest.raises(SparsenetError, match="'conv.1' has a '.'"):
        interop.export_torch(build_network(spec), tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- torch itself (optional)
def docs_helper():
    """The torch helper of docs/interop.md, executed as a reader would paste it."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    block = next(b for b in blocks if "def load_sparsenet" in b)
    ns = {}
    exec(compile(block, "docs/interop.md", "exec"), ns)
    return ns


@pytest.mark.parametrize("model", ["lenet-300-100", "lenet-5", "cnn"])
def test_torch_module_of_the_docs_loads_the_file_and_agrees(model, tmp_path, cnn_file):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file
    from torch.nn.utils import prune as tprune

    net, _ = pruned(model_arg(model, cnn_file))
    interop.export_torch(net, tmp_path / "p.safetensors")
    interop.export_torch(net, tmp_path / "d.safetensors", layout="dense")
    x = images(net)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2) if x.ndim == 4 else torch.from_numpy(x)
    helper = docs_helper()
    for f in ("p.safetensors", "d.safetensors"):
        module = helper["load_sparsenet"](str(tmp_path / f))
        with torch.no_grad():
            compare(module(xt).numpy(), net.forward(x))
    module = helper["load_sparsenet"](str(tmp_path / "p.safetensors"))
    flattened = {"lenet-5": (4, 4, 50), "cnn": (3, 3, 12)}.get(model)  # the map fc1 reads
    for l in (l for l in net.layers if l.params):
        c = flattened if l.name == "fc1" else None
        assert numpy.array_equal(getattr(module, l.name).weight_mask.numpy(), torch_layout(l.params["W"].mask, c))
    # pruned further in torch, saved as torch saves it: the values under the new zeros of the masks stay
    tprune.l1_unstructured(module[-1], "weight", amount=0.9)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp_path / "t.safetensors"))
    with pytest.raises(SparsenetError, match="--apply-masks"):
        interop.import_torch(tmp_path / "t.safetensors", model_arg(model, cnn_file))
    back, _ = interop.import_torch(tmp_path / "t.safetensors", model_arg(model, cnn_file), apply_masks=True)
    last = module[-1]
    assert numpy.array_equal(back.params()[f"{net.layers[-1].name}.W"].mask, last.weight_mask.numpy())
    assert numpy.array_equal(back.params()[f"{net.layers[-1].name}.W"].data, last.weight.detach().numpy())
