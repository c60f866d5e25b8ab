"""Per-layer report (act%, FLOP% left) and layer sensitivity, against hand-computed cases."""
import itertools
import json
import subprocess
import sys

import numpy
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from sparsenet import figures as F
from sparsenet import report as R
from sparsenet.backend import asnumpy
from sparsenet.checkpoint import save_checkpoint
from sparsenet.cli import main
from sparsenet.data import load_split
from sparsenet.model import build_model, build_network
from sparsenet.paper import LAYERS
from sparsenet.pruning import percentile_mask, prune, remove_dead_neurons
from sparsenet.util import SparsenetError

needs_mnist = pytest.mark.mnist


def make_net(xp, input_shape, layers, values):
    """A network from layer specs with chosen ``{"fc1": (W, M, b)}`` (W is multiplied by M)."""
    net = build_network({"name": "tiny", "input_shape": list(input_shape), "layers": layers}, xp=xp)
    for name, (W, M, b) in values.items():
        p = net.layer(name).params
        M = numpy.asarray(M, dtype=numpy.float32)
        p["W"].load(xp.asarray(numpy.asarray(W, dtype=numpy.float32) * M), xp.asarray(M))
        p["b"].data = xp.asarray(numpy.asarray(b, dtype=numpy.float32))
    return net


def rows(rep):
    return {r["name"]: r for r in [*rep["layers"], rep["total"]]}


def snapshot(net):
    return {k: (id(p.data), id(p._mask), asnumpy(p.data).tobytes(), asnumpy(p.mask).tobytes())
            for k, p in net.params().items()}


# ----------------------------------------------------------------------------- hand-computed
def test_mlp_by_hand(xp):
    # 3 -> fc1 (2) -> ReLU -> fc2 (2). Pruned: fc1 W[0,2], W[1,0]; fc2 W[1,0].
    net = make_net(xp, (3,), [{"kind": "linear", "name": "fc1", "n_in": 3, "n_out": 2},
                              {"kind": "relu", "name": "relu1"},
                              {"kind": "linear", "name": "fc2", "n_in": 2, "n_out": 2}],
                   {"fc1": ([[1, -1, 0], [0, 2, 1]], [[1, 1, 0], [0, 1, 1]], [0, -1]),
                    "fc2": ([[1, 1], [0, -1]], [[1, 1], [0, 1]], [0, 0])})
    x = xp.asarray([[1, 0, 0], [0, 1, 1], [2, 1, 0]], dtype=numpy.float32)
    rep = R.layer_report(net, x, batch_size=2, t=xp.asarray([0, 1, 0]))
    r = rows(rep)
    # fc1 pre-activations [1,-1], [-1,2], [1,1] -> ReLU [1,0], [0,2], [1,1]: 4 of 6 non-zero.
    # logits [1,0], [2,-2], [2,-1]: 5 of 6 non-zero; predictions 0, 0, 0 -> 1 of 3 wrong.
    assert (r["fc1"]["act_nonzero"], r["fc1"]["act_entries"], r["fc1"]["act"]) == (4, 6, 4 / 6)
    assert (r["fc2"]["act_nonzero"], r["fc2"]["act_entries"], r["fc2"]["act"]) == (5, 6, 5 / 6)
    assert rep["error"] == 1 / 3
    # fc1 sees the image as dense: 4 survivors x 3 samples of 6 x 3, although x has zeros.
    assert (r["fc1"]["macs_left"], r["fc1"]["flop_left"], r["fc1"]["weights_left"]) == (12 / 3, 12 / 18, 4 / 6)
    # fc2: unit 0 of fc1 non-zero in samples 1, 3 (1 surviving weight reads it), unit 1 in
    # samples 2, 3 (2 surviving weights): 2*1 + 2*2 = 6 of 4 x 3 (per image: 2 of fc2's 4 MACs).
    assert (r["fc2"]["macs"], r["fc2"]["macs_left"], r["fc2"]["flop_left"], r["fc2"]["weights_left"]) == \
           (4, 6 / 3, 6 / 12, 3 / 4)
    assert r["total"]["macs_left"] == (12 + 6) / 3
    assert (r["fc1"]["weights"], r["fc1"]["flop"], r["fc2"]["flop"]) == (6, 12, 8)
    t = r["total"]
    assert (t["weights"], t["flop"], t["act"], t["weights_left"], t["flop_left"]) == (10, 20, 9 / 12, 7 / 10, 18 / 30)
    # params 6+2+4+2 = 14; non-zero (mask ones, biases included) 4+2+3+2 = 11
    assert (rep["params"], rep["nonzero_params"], rep["compression"], rep["samples"]) == (14, 11, 14 / 11, 3)


CONV_NET = [{"kind": "conv2d", "name": "conv1", "c_in": 1, "c_out": 2, "k": 2, "pad": 0},
            {"kind": "relu", "name": "relu1"},
            {"kind": "maxpool2d", "name": "pool1", "k": 2, "stride": 1},
            {"kind": "flatten", "name": "flatten"},
            {"kind": "linear", "name": "fc1", "n_in": 8, "n_out": 2}]
# filter 0 keeps tap (0,0) = 1: y = x[p,q]; filter 1 keeps (0,0) = -1 and (1,1) = 1: y = x[p+1,q+1] - x[p,q]
CONV_W = (numpy.array([[[1, 0], [0, 0]], [[-1, 0], [0, 1]]])[..., None],
          numpy.array([[[1, 0], [0, 0]], [[1, 0], [0, 1]]])[..., None], [0, 0])
FC_M = [[1, 0, 1, 0, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0, 0, 1]]


def test_conv_by_hand(xp):
    net = make_net(xp, (4, 4, 1), CONV_NET, {"conv1": CONV_W, "fc1": (FC_M, FC_M, [0, -1])})
    a = numpy.zeros((4, 4))
    a[0, 0], a[2, 2] = 1, 2
    x = xp.asarray(numpy.stack([a, numpy.ones((4, 4))])[..., None], dtype=numpy.float32)
    rep = R.layer_report(net, x, t=xp.asarray([1, 1]))
    r = rows(rep)
    # Sample A: filter 0 = [[1,0,0],[0,0,0],[0,0,2]] -> pool 2/1 [[1,0],[0,2]] (2 non-zero);
    #   filter 1 = [[-1,0,0],[0,2,0],[0,0,-2]] -> ReLU, pool [[2,2],[2,2]] (4). Sample B (ones):
    #   filter 0 all 1 -> 4 non-zero, filter 1 all 0. conv act = (2+4+4+0) / (2 x 8).
    assert (r["conv1"]["act_nonzero"], r["conv1"]["act_entries"]) == (10, 16)
    # Dense image: 3 surviving taps x 9 positions x 2 samples of 36 MACs x 2 filters... = 54 / 144.
    assert (r["conv1"]["macs"], r["conv1"]["macs_left"], r["conv1"]["flop_left"]) == (72, 54 / 2, 54 / 144)
    assert r["conv1"]["weights_left"] == 3 / 8
    # fc1 input (NHWC flatten): A [1,2,0,2,0,2,2,2], B [1,0,1,0,1,0,1,0]. Row 0 reads columns
    # 0,2,4,6: A 2 non-zero, B 4; row 1 reads 0,1,7: A 3, B 1 -> 10 of 16 x 2.
    # Logits A [3, 5-1], B [4, 1-1]: 3 of 4 non-zero; predictions 1, 0 -> error 1/2.
    assert (r["fc1"]["macs_left"], r["fc1"]["flop_left"], r["fc1"]["act"]) == (10 / 2, 10 / 32, 3 / 4)
    t = r["total"]
    assert (t["weights"], t["flop"], t["act"], t["weights_left"], t["flop_left"]) == (24, 176, 13 / 20, 10 / 24, 64 / 176)
    assert (rep["params"], rep["nonzero_params"], rep["error"]) == (28, 14, 0.5)


def test_padding_counts_as_zero_input(xp):
    layers = [dict(CONV_NET[0], pad=1), *CONV_NET[1:4], dict(CONV_NET[4], n_in=32)]
    net = make_net(xp, (4, 4, 1), layers, {"conv1": CONV_W})
    x = xp.ones((2, 4, 4, 1), dtype=numpy.float32)
    r = rows(R.layer_report(net, x))
    # Output 5x5; a tap (i, j) reads a real pixel at 4 of 5 rows and 4 of 5 columns:
    # 3 taps x 16 positions x 2 samples = 96 of (25 positions x 4 taps x 2 filters = 200) x 2.
    assert (r["conv1"]["macs"], r["conv1"]["macs_left"], r["conv1"]["flop_left"]) == (200, 96 / 2, 0.24)


# ----------------------------------------------------------------------------- brute force
def brute_force(net, x):
    """act and MACs left per parametric layer by explicit loops over samples/positions/weights."""
    a, z, out, prev = asnumpy(x), None, {}, None
    for l in net.layers:
        if "W" in l.params:
            if prev is not None:
                out[prev]["act"] = numpy.count_nonzero(a)
            z = numpy.ones_like(a, dtype=bool) if prev is None else a != 0
            M = asnumpy(l.params["W"].mask)
            count = 0
            if l.kind == "linear":
                for n, o, i in itertools.product(range(len(z)), *map(range, M.shape)):
                    count += bool(M[o, i] and z[n, i])
            else:
                F, kh, kw, C = M.shape
                N, H, W, _ = z.shape
                Ho, Wo, _ = l.output_shape(z.shape[1:])
                s, pad = l.stride, l.pad
                for n, p, q, f, i, j, c in itertools.product(*map(range, (N, Ho, Wo, F, kh, kw, C))):
                    h, w = s * p + i - pad, s * q + j - pad
                    count += bool(M[f, i, j, c] and 0 <= h < H and 0 <= w < W and z[n, h, w, c])
            out[l.name] = {"macs_left": count}
            prev = l.name
        a = asnumpy(l.forward(net.xp.asarray(a)))
    out[prev]["act"] = numpy.count_nonzero(a)
    return out


@given(st.data())
def test_counts_match_brute_force(xp, data):
    d = data.draw
    H, W, C, N = d(st.integers(3, 6)), d(st.integers(3, 6)), d(st.integers(1, 2)), d(st.integers(1, 3))
    k1, s1, p1, k2, s2, p2 = (d(st.integers(1, 3)), d(st.integers(1, 2)), d(st.integers(0, 1)),
                              d(st.integers(1, 2)), d(st.integers(1, 2)), d(st.integers(0, 1)))
    H1, W1 = (H + 2 * p1 - k1) // s1 + 1, (W + 2 * p1 - k1) // s1 + 1
    assume(min(H1, W1) + 2 * p2 >= k2)
    H2, W2 = (H1 + 2 * p2 - k2) // s2 + 1, (W1 + 2 * p2 - k2) // s2 + 1
    F1, F2 = d(st.integers(1, 3)), d(st.integers(1, 2))
    density, seed = d(st.floats(0.0, 1.0)), d(st.integers(0, 2**31))
    layers = [{"kind": "conv2d", "name": "conv1", "c_in": C, "c_out": F1, "k": k1, "stride": s1, "pad": p1},
              {"kind": "relu", "name": "relu1"}, {"kind": "dropout", "name": "drop1", "rate": 0.5},
              {"kind": "conv2d", "name": "conv2", "c_in": F1, "c_out": F2, "k": k2, "stride": s2, "pad": p2},
              {"kind": "relu", "name": "relu2"}, {"kind": "flatten", "name": "flatten"},
              {"kind": "linear", "name": "fc1", "n_in": H2 * W2 * F2, "n_out": 3}]
    rng = numpy.random.default_rng(seed)
    net = build_network({"name": "r", "input_shape": [H, W, C], "layers": layers}, xp=xp)
    for l in net.layers:
        if "W" in l.params:
            W_, b = l.params["W"], l.params["b"]
            M = xp.asarray((rng.random(W_.data.shape) < density).astype(numpy.float32))
            W_.load(xp.asarray(rng.normal(size=W_.data.shape).astype(numpy.float32)) * M, M)
            b.data = xp.asarray(rng.normal(size=b.data.shape).astype(numpy.float32))
    x = rng.normal(size=(N, H, W, C)) * (rng.random((N, H, W, C)) < 0.6)
    rep = R.layer_report(net, xp.asarray(x.astype(numpy.float32)), batch_size=2)
    expected = brute_force(net, xp.asarray(x.astype(numpy.float32)))
    for r in rep["layers"]:
        assert r["macs_left"] == expected[r["name"]]["macs_left"] / N  # per image
        assert r["act_nonzero"] == expected[r["name"]]["act"]


# ----------------------------------------------------------------------------- origin
def test_shrunk_layers_are_measured_against_origin():
    net = build_model("lenet-300-100")
    prune(net, "percentile", {"fc1": 0.9, "default": 0.0})
    fc1 = net.layer("fc1").params["W"]
    keep = numpy.ones_like(fc1.mask)
    keep[:40] = 0  # units 0..39 lose every input (bias 0, so ReLU gives 0): dead
    fc1.prune(keep)
    x = numpy.random.default_rng(0).random((64, 784)).astype(numpy.float32)
    before = R.layer_report(net, x)
    assert remove_dead_neurons(net)["fc1"] >= 40
    after = R.layer_report(net, x)
    assert net.layer("fc1").params["W"].data.shape[0] <= 260
    a, b = rows(after), rows(before)
    assert (a["fc1"]["weights"], a["fc1"]["flop"], a["fc2"]["weights"]) == (235200, 470400, 30000)
    assert a["fc1"]["weights_left"] == fc1.nonzero() / 235200 == b["fc1"]["weights_left"]
    assert a["fc2"]["weights_left"] == net.layer("fc2").params["W"].nonzero() / 30000 < 1.0
    assert a["fc1"]["act_entries"] == 64 * 300  # removed units count as zero activations
    for name in ("fc1", "fc2", "fc3", "total"):  # removal changed no output, no useful MAC
        assert (a[name]["act_nonzero"], a[name]["act_entries"], a[name]["macs_left"], a[name]["flop_left"]) == \
               (b[name]["act_nonzero"], b[name]["act_entries"], b[name]["macs_left"], b[name]["flop_left"])
    assert after["params"] == before["params"] == 266610


def test_report_leaves_the_network_alone(xp):
    net = build_model("lenet-5", xp=xp)
    prune(net, "percentile", 0.7)
    x = xp.asarray(numpy.random.default_rng(1).random((30, 28, 28, 1)).astype(numpy.float32))
    t = xp.asarray(numpy.arange(30) % 10)
    before = snapshot(net)
    rep = R.layer_report(net, x, batch_size=7, t=t)
    assert snapshot(net) == before and all(l.cache is None for l in net.layers)
    assert rep["error"] == net.error(x, t)
    assert rep["params"] == 431080 and rep["layers"][0]["flop"] == 2 * 24 * 24 * 25 * 20
    assert rows(rep)["conv1"]["flop_left"] == rows(rep)["conv1"]["weights_left"]  # dense image, no padding


# ----------------------------------------------------------------------------- sensitivity
@pytest.fixture(scope="module")
def mnist():
    d = load_split("mnist", (784,), numpy, split="both", train_subset=5000)
    x, t = d["test"]
    return d["train"], (x[:2000], t[:2000])


@pytest.fixture(scope="module")
def trained(mnist):
    """LeNet-300-100 with its random hidden layers and fc3 fitted by ridge regression to
    one-hot labels (~72% test accuracy in well under a second, no training loop)."""
    (x, t), _ = mnist
    net = build_model("lenet-300-100")
    for l in net.layers[:-1]:
        x = l.forward(x)
    A = numpy.hstack([x, numpy.ones((len(x), 1), dtype=numpy.float32)]).astype(numpy.float64)
    sol = numpy.linalg.solve(A.T @ A + 1e-3 * numpy.eye(A.shape[1]), A.T @ numpy.eye(10)[t])
    fc3 = net.layer("fc3").params
    fc3["W"].data = numpy.ascontiguousarray(sol[:-1].T, dtype=numpy.float32)
    fc3["b"].data = sol[-1].astype(numpy.float32)
    return net


@needs_mnist
def test_sensitivity_on_mnist(trained, mnist):
    net, (x, t) = trained, mnist[1]
    before = snapshot(net)
    res = R.sensitivity(net, x, t, ratios=(0.0, 0.5, 0.9, 1.0))
    assert snapshot(net) == before  # the very same arrays, bitwise
    assert res["baseline"] == net.error(x, t) < 0.35
    assert res["ratios"] == [0.0, 0.5, 0.9, 1.0] and list(res["layers"]) == ["fc1", "fc2", "fc3"]
    assert all(errors[0] == res["baseline"] for errors in res["layers"].values())
    # fc3 with every weight pruned outputs its bias: one class for all, chance level.
    b3 = asnumpy(net.layer("fc3").params["b"].data)
    assert res["layers"]["fc3"][3] == 1 - numpy.mean(t == b3.argmax()) > 0.8
    # One cell against pruning a copy of the network by hand.
    copy = build_network(net.spec())
    for k, p in copy.params().items():
        p.load(net.params()[k].data.copy(), net.params()[k].mask.copy())
    W = copy.layer("fc2").params["W"]
    W.prune(percentile_mask(W.data, W.mask, 0.9))
    assert res["layers"]["fc2"][2] == copy.error(x, t)


def test_sensitivity_of_a_pruned_layer_and_bad_arguments():
    net = build_model("lenet-300-100")
    prune(net, "percentile", 0.5)
    x = numpy.random.default_rng(2).random((50, 784)).astype(numpy.float32)
    t = numpy.arange(50) % 10
    res = R.sensitivity(net, x, t, ratios=(0.3, 0.5), layers=["fc2"])
    assert res["layers"] == {"fc2": [res["baseline"]] * 2}  # already 50% sparse: nothing more pruned
    with pytest.raises(SparsenetError, match="no prunable layer named fc9"):
        R.sensitivity(net, x, t, layers=["fc9"])
    with pytest.raises(SparsenetError, match="in \\[0, 1\\]"):
        R.sensitivity(net, x, t, ratios=(0.5, 1.5))


def test_plot(tmp_path, monkeypatch):
    res = {"model": "m", "ratios": [0.0, 0.5], "baseline": 0.1, "layers": {"fc1": [0.1, 0.2], "fc2": [0.1, 0.4]}}
    pytest.importorskip("matplotlib")
    trade = {"dense_error": 0.02, "curves": {"L2 w/ retrain": {"pruned": [0.5, 0.9], "loss": [0.0, 0.01]}}}
    net = build_model("lenet-300-100")
    prune(net, "percentile", 0.9)
    for plot, arg in ((F.plot_sensitivity, res), (F.plot_tradeoff, trade), (F.plot_pattern, net)):
        assert plot(arg, tmp_path / "s.png")
        assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # as if not installed
        assert plot(arg, tmp_path / "t.png") is False and not (tmp_path / "t.png").exists()
        monkeypatch.undo()


def test_pattern_title_states_both_references():
    net = build_model("lenet-300-100")
    prune(net, "percentile", {"fc1": 0.9, "default": 0.0})
    W = net.layer("fc1").params["W"]
    assert F.pattern_title(net, "fc1") == f"fc1: {100 * W.nonzero() / 235200:.1f}% of the original 300x784 weights " \
                                          "kept (no neuron removed)"
    keep = numpy.ones_like(W.mask)
    keep[:40] = 0
    W.prune(keep)
    remove_dead_neurons(net)
    units = W.data.shape[0]
    assert units <= 260
    assert F.pattern_title(net, "fc1") == (
        f"fc1: {100 * W.nonzero() / 235200:.1f}% of the original 300x784 weights kept "
        f"({100 * W.nonzero() / (units * 784):.1f}% of the {units}x784 layer after dead-neuron removal)")


def test_markdown_shows_the_paper():
    net = make_net(numpy, (3,), [{"kind": "linear", "name": "fc1", "n_in": 3, "n_out": 2}],
                   {"fc1": ([[1, 1, 1], [1, 1, 1]], [[1, 0, 0], [1, 1, 1]], [0, 0])})
    rep = R.layer_report(net, numpy.ones((2, 3), dtype=numpy.float32))
    md = R.format_markdown(rep, {"source": "Table X", "rows": {"fc1": {"act": 1.0, "weights_left": 0.08,
                                                                      "flop_left": 0.07}}})
    assert "| fc1 | 6 | 12 | 100.0% | 66.7% | 66.7% | 100.0% | 8.0% | 7.0% |" in md and "Table X" in md
    assert "paper" not in R.format_markdown(rep) and "total" in R.format_table(rep)
    md = R.format_markdown(rep, LAYERS["lenet-300-100"])
    assert "| fc1 | 6 | 12 | 100.0% | 66.7% | 66.7% | 38.0% | 8.0% | 8.0% |" in md and "Table 2" in md


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    net = build_model("lenet-300-100")
    prune(net, "percentile", 0.9)
    path = tmp_path_factory.mktemp("ck") / "checkpoint.h5"
    save_checkpoint(path, net, config={"dataset": "mnist"})
    return path


@needs_mnist
def test_cli_report(checkpoint, tmp_path, capsys):
    assert main(["report", str(checkpoint), "--json", "--out", str(tmp_path)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {"layers", "total", "params", "nonzero_params", "compression", "error"} <= set(rep)
    assert [r["name"] for r in rep["layers"]] == ["fc1", "fc2", "fc3"]
    assert rep["layers"][0]["weights_left"] == rep["layers"][0]["flop_left"] == 0.1  # 23,520 of 235,200, dense input
    assert rep["samples"] == 10000 and rep["dataset"] == "mnist"
    assert json.loads((tmp_path / "report.json").read_text())["total"] == rep["total"]
    assert "Table 2" in (tmp_path / "report.md").read_text()
    assert main(["report", str(checkpoint)]) == 0  # default --out: the checkpoint's folder
    assert "total" in capsys.readouterr().out and (checkpoint.parent / "report.md").is_file()


@needs_mnist
def test_cli_sensitivity(checkpoint, tmp_path, capsys):
    args = ["sensitivity", str(checkpoint), "--ratios", "0,0.95", "--layers", "fc3", "--out", str(tmp_path)]
    assert main([*args, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ratios"] == [0.0, 0.95] and list(res["layers"]) == ["fc3"] and res["layers"]["fc3"][0] == res["baseline"]
    assert (tmp_path / "sensitivity.json").is_file() and (tmp_path / "sensitivity.md").is_file()
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "sensitivity.png").is_file()
    except ImportError:
        pass


@pytest.mark.parametrize("args, needle", [
    (["report", "missing.h5"], "no such checkpoint"),
    (["sensitivity", "missing.h5"], "no such checkpoint"),
    (["sensitivity", "missing.h5", "--ratios", "0.1,x"], "--ratios"),
])
def test_cli_errors_are_one_line(args, needle):
    r = subprocess.run([sys.executable, "-m", "sparsenet", *args], check=False, capture_output=True, text=True,
                       timeout=60)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("sparsenet: error:") and needle in lines[0]
