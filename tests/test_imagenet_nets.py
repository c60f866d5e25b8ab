"""AlexNet and VGG-16: exact sizes, the paper's plans applied, one training step each, and the
smoke reproduction (random weights, a generated JPEG tree) end to end."""
import json
import math

import numpy
import pytest

from sparsenet import cli, paper
from sparsenet.model import build_model
from sparsenet.modelfile import export_model
from sparsenet.optim import SGD
from sparsenet.pruning import check_masks, densities
from sparsenet.reproduce import apply_plan, load_config
from sparsenet.engine import Schedule

SIZES = {"alexnet": 60_965_224, "vgg-16": 138_357_544}


@pytest.mark.parametrize("model", sorted(SIZES))
def test_summary_counts_and_the_papers_columns(model, capsys):
    assert cli.main(["summary", "--model", model, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["params"] == SIZES[model] and s["nonzero_params"] == SIZES[model]
    rows = {r["name"]: r for r in s["layers"] if r["weight_shape"]}
    assert list(rows) == list(paper.weights_left(model))  # the paper's layer names, in order
    for name, r in rows.items():  # published weights and FLOP are these layers', rounded
        assert r["flop"] == 2 * r["macs"]
        assert r["paper"]["weights"] == pytest.approx(r["weights"], rel=0.35 if r["weights"] < 3e6 else 0.05)
        assert r["paper"]["flop"] == pytest.approx(r["flop"], rel=0.06, abs=5e7)  # 0.2B: rounded to 0.1B
    assert s["paper"]["weights"] == pytest.approx(s["params"], rel=0.01)
    assert cli.main(["summary", "--model", model]) == 0
    out = capsys.readouterr().out
    assert f"{SIZES[model]:,}" in out and f"Table {paper.LAYERS[model]['table']}" in out


def test_alexnet_input_sizes_reach_fc6_with_caffes_rounding():
    from sparsenet.model import alexnet, build_network

    shape, layers = alexnet()
    for size in (227, 224):  # Caffe's crop and the ONNX model zoo's
        net = build_network({"name": "alexnet", "input_shape": [size, size, 3], "layers": layers})
        rows = {r["name"]: r for r in net.summary()}
        assert rows["pool1"]["output_shape"] == [27, 27, 96] and rows["pool5"]["output_shape"] == [6, 6, 256]


@pytest.mark.parametrize("model, published", [("alexnet", 6_700_000), ("vgg-16", 10_300_000)])
def test_the_papers_plan_gives_the_published_counts_and_an_8x_smaller_file(model, published, tmp_path):
    cfg, _ = load_config(model)
    net = apply_plan(build_model(model), Schedule.from_dict(cfg["prune"]))
    check_masks(net)
    kept = net.count_nonzero()
    assert kept == pytest.approx(published, rel=0.02)
    t1 = paper.TABLE1[model]
    assert SIZES[model] / kept == pytest.approx(t1["params_before"] / t1["params_after"], rel=0.02)  # 9x, 13x
    left, want = densities(net), paper.weights_left(model)
    for name, d in left.items():  # every layer at its published share (VGG's fc6: 3.8%, see paper.py)
        want_d = 0.038 if (model, name) == ("vgg-16", "fc6") else want[name]
        assert d == pytest.approx(want_d, abs=0.6 / net.origin[name]["weights"])  # rounded to whole weights
    sizes = {}
    for encoding in ("dense", "relative"):
        export_model(net, tmp_path / f"{encoding}.h5", encoding)
        sizes[encoding] = (tmp_path / f"{encoding}.h5").stat().st_size
    assert sizes["dense"] / sizes["relative"] >= 8, sizes
    assert sizes["dense"] >= 4 * SIZES[model]  # float32, every weight


def test_the_plans_prune_fc_and_conv_in_turn_with_the_other_part_frozen():
    for model in ("alexnet", "vgg-16"):
        cfg, _ = load_config(model)
        rounds, convs = cfg["prune"]["rounds"], [n for n in paper.weights_left(model) if n.startswith("conv")]
        assert len(rounds) >= 2
        for r in rounds:
            part = set(r["amount"])
            assert part in (set(convs), {"fc6", "fc7", "fc8"})
            assert set(r["freeze"]) == set(paper.weights_left(model)) - part
        for name, left in paper.weights_left(model).items():
            last = [r["amount"][name] for r in rounds if name in r["amount"]]
            assert last == sorted(last) and last[-1] == pytest.approx(1 - left, abs=0.0021)
        assert rounds[0]["criterion"] == "percentile" and cfg["prune"]["retrain"]["lr"] <= 0.001


@pytest.mark.parametrize("model, batch", [("alexnet", 2), ("vgg-16", 1)])
def test_one_training_step_on_the_cpu_keeps_the_pruned_weights_zero(model, batch):
    net = build_model(model, seed=1)
    from sparsenet.pruning import prune

    prune(net, "percentile", 0.5)
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((batch, *net.input_shape)).astype(numpy.float32)
    t = rng.integers(0, 1000, batch)
    before = {n: p.data.copy() for n, p in net.params().items()}
    opt = SGD(net.params(), lr=0.01, momentum=0.9, weight_decay=5e-4, lr_policy="fixed")
    loss, z = net.loss_and_backward(x, t)
    assert z.shape == (batch, 1000) and math.isfinite(float(loss))
    assert float(loss) == pytest.approx(math.log(1000), rel=0.2)  # xavier init: near-uniform scores
    opt.step()
    check_masks(net)
    for name, p in net.params().items():
        assert p.data.dtype == numpy.float32
        assert not numpy.array_equal(p.data, before[name]), name  # every layer trained
        assert numpy.all(p.data[p.mask == 0] == 0) and numpy.all(p.state["momentum"][p.mask == 0] == 0)


def _alexnet_onnx(path, size=227, seed=1):
    """The ONNX model zoo's bvlcalexnet layout with random weights (tests/test_pretrained.py builds it)."""
    pytest.importorskip("onnx")
    import onnx
    from test_pretrained import ALEX_CONV, FC, alexnet_graph, bias, he

    rng, w = numpy.random.default_rng(seed), {}
    for name, F, C, k, _, _, g in ALEX_CONV:
        w[name] = he(rng, (F, C // g, k, k)), bias(rng, F)
    for (name, n), d in zip(FC, (9216, 4096, 4096)):
        w[name] = he(rng, (n, d)) * numpy.float32(0.1), bias(rng, n)
    onnx.save(alexnet_graph(w, size, 1).model(["prob"]), path)
    return path


def _jpeg_tree(root, classes=("n01440764", "n01443537", "n01484850"), train=4, val=2):
    Image = pytest.importorskip("PIL.Image")
    rng = numpy.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c, wnid in enumerate(classes):
            (root / split / wnid).mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=numpy.uint8)
                a[..., c] = 255  # one bright channel per class
                Image.fromarray(a).save(root / split / wnid / f"{wnid}_{i}.JPEG", quality=90)
    return root


def test_the_alexnet_smoke_reproduction_runs_the_whole_command(tmp_path, capsys):
    weights, tree, out = _alexnet_onnx(tmp_path / "bvlcalexnet.onnx"), _jpeg_tree(tmp_path / "ilsvrc"), tmp_path / "out"
    argv = ["reproduce", "alexnet-smoke", "--weights", str(weights), "--imagenet", str(tree), "--out", str(out),
            "--no-progress"]
    assert cli.main(argv) == 0
    said = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    pr = m["pruned"]
    assert pr["params"] == SIZES["alexnet"] and pr["nonzero_params"] == pytest.approx(6_700_000, rel=0.02)
    assert m["checks"]["min_compression"]["ok"] and m["dense_over_relative"] >= 8
    for e in (m["dense"]["error"], m["dense"]["top5_error"], pr["test_error"], pr["top5_error"]):
        assert 0 <= e <= 1  # 3 classes of 1000: meaningless, but measured on the 6 validation images
    log = [json.loads(x) for x in (out / "work" / "pruned" / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log if r.get("event") != "epoch"] == ["start", "prune", "round", "prune", "round"]
    assert all("top5_error" in r for r in log)
    report = (out / "report.md").read_text()
    assert "Table 4" in report and "paper" in report and f"{pr['nonzero_params']:,}" in report and "alexnet-smoke" in said
    ck = out / "work" / "dense" / "checkpoint.h5"
    from sparsenet.checkpoint import load_checkpoint

    cfg = load_checkpoint(ck).config
    assert cfg["dataset"] == "imagenet" and cfg["preprocess"]["mode"] == "caffe" and cfg["imported"]["format"] == "onnx"
    mtime = (out / "work" / "pruned" / "checkpoint.h5").stat().st_mtime_ns
    assert cli.main(argv) == 0  # run again: everything reused, nothing retrained
    assert (out / "work" / "pruned" / "checkpoint.h5").stat().st_mtime_ns == mtime
    assert cli.main(["reproduce", "alexnet-smoke", "--out", str(tmp_path / "plan"), "--weights", str(weights),
                     "--prune-only", "--no-progress"]) == 0  # no data: the plan's counts and sizes only
    plan = json.loads((tmp_path / "plan" / "metrics.json").read_text())
    assert plan["pruned"]["nonzero_params"] == pr["nonzero_params"] and plan["pruned"]["test_error"] is None
    assert plan["file_bytes"]["dense"] > 30 * plan["file_bytes"]["compressed"]  # shared (8/5 bits) and Huffman-coded
    capsys.readouterr()
    assert cli.main(["reproduce", "alexnet-smoke", "--out", str(tmp_path / "none"), "--no-progress"]) == 2
    assert "--weights" in capsys.readouterr().err


def test_sparse_inference_and_the_flop_count_handle_grouped_convolutions():
    from sparsenet.inference import SparseNetwork
    from sparsenet.model import build_network
    from sparsenet.pruning import prune_at_random
    from sparsenet.report import macs_left

    spec = {"name": "g", "input_shape": [9, 9, 4], "layers": [
        {"kind": "conv2d", "name": "c1", "c_in": 4, "c_out": 6, "k": 3, "pad": 1, "groups": 2},
        {"kind": "relu", "name": "r1"}, {"kind": "lrn", "name": "n1", "size": 3, "alpha": 1e-4, "beta": 0.75, "k": 1.0},
        {"kind": "maxpool2d", "name": "p1", "k": 3, "stride": 2, "ceil": True},
        {"kind": "conv2d", "name": "c2", "c_in": 6, "c_out": 6, "k": 3, "groups": 3},
        {"kind": "flatten", "name": "f"}, {"kind": "linear", "name": "fc", "n_in": 24, "n_out": 5}]}
    net = prune_at_random(build_network(spec, seed=3), {"c1": 0.5, "c2": 0.6, "fc": 0.7}, seed=4)
    x = numpy.random.default_rng(5).standard_normal((7, 9, 9, 4)).astype(numpy.float32)
    for mode in ("sparse", "dense", "auto"):
        numpy.testing.assert_allclose(SparseNetwork(net, mode).forward(x), net.forward(x), rtol=1e-5, atol=1e-5)
    layer, S = net.layer("c1"), (x != 0).sum(axis=0)
    W = layer.params["W"].mask  # brute force: every output, every weight it uses (group f // 3), non-zero input
    xp_ = numpy.pad(S, ((1, 1), (1, 1), (0, 0)))
    want = sum(int(W[f, i, j, c]) * int(xp_[p + i, q + j, (f // 3) * 2 + c])
               for f in range(6) for i in range(3) for j in range(3) for c in range(2) for p in range(9) for q in range(9))
    assert macs_left(layer, S) == want


def test_the_import_command(tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    weights, ck = _alexnet_onnx(tmp_path / "zoo.onnx", size=224), tmp_path / "alexnet.h5"
    assert cli.main(["import", str(weights), "--model", "alexnet", "--out", str(ck)]) == 0
    assert "input 224x224, preprocessing caffe" in capsys.readouterr().out
    assert cli.main(["summary", str(ck), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["params"] == SIZES["alexnet"] and s["input_shape"] == [224, 224, 3]
    assert cli.main(["import", str(weights), "--model", "alexnet", "--out", str(ck)]) == 2  # no overwrite
    assert "--force" in capsys.readouterr().err
    m = onnx.load(str(weights))
    conv1 = next(n for n in m.graph.node if n.op_type == "Conv")
    next(a for a in conv1.attribute if a.name == "strides").ints[:] = [2, 2]  # not AlexNet's stride 4
    bad = tmp_path / "bad.onnx"
    onnx.save(m, bad)
    for argv in (["import", str(bad), "--model", "alexnet", "--out", str(tmp_path / "x.h5")],
                 ["import", str(weights), "--model", "vgg-16", "--out", str(tmp_path / "y.h5")],
                 ["import", str(tmp_path / "missing.onnx"), "--model", "alexnet", "--out", str(tmp_path / "z.h5")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("sparsenet: error: ") and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alexnet.h5", "bad.onnx", "zoo.onnx"]


def test_an_imagenet_network_on_mnist_is_refused_before_any_file_is_read(tmp_path):
    from sparsenet.data import load_split
    from sparsenet.util import SparsenetError

    with pytest.raises(SparsenetError, match=r"\(224, 224, 3\), but mnist images are 28x28"):
        load_split("mnist", (224, 224, 3), numpy, data_dir=tmp_path / "nowhere")  # no download attempted
    assert not (tmp_path / "nowhere").exists()
