"""The reduced reproductions (reproduce/*-ci.json) end to end, with their stated bounds."""
import json
import os

import numpy
import pytest

from sparsenet import cli
from sparsenet.checkpoint import load_checkpoint
from sparsenet.data import load_split
from sparsenet.model import build_model
from sparsenet.figures import plot_curves, tradeoff_limits
from sparsenet.reproduce import REPRO_DIR, find_config, format_check, load_config, repo_path, reproduce
from sparsenet.modelfile import export_model, load_model
from sparsenet.util import SparsenetError


def strings(obj):
    """Every string inside a JSON value."""
    if isinstance(obj, str):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else []
    return [s for v in values for s in strings(v)]


@pytest.mark.mnist
@pytest.mark.parametrize("name", ["lenet-300-100-ci", "lenet-5-ci"])
def test_reduced_reproduction_meets_its_bounds(name, tmp_path, capsys):
    cfg, _ = load_config(name)
    # results committed without their work/ folder (a fresh clone) are not resumed from
    (tmp_path / "metrics.json").write_text(json.dumps({"seconds": {"dense": 1e6},
                                                       "provenance": {"commits": ["0" * 40]}}))
    m = reproduce(name, tmp_path, progress=True)
    # progress on stderr, line by line (not a terminal): every stage, each with an estimate of the time left
    err = capsys.readouterr().err
    assert "\r" not in err
    assert f"dense training: {cfg['train']['epochs']} epochs in {tmp_path / 'work' / 'dense'}" in err
    assert f"iterative pruning: {len(cfg['prune']['rounds'])} rounds in" in err and "reused" not in err
    assert "epochs, ~" in err and " left]" in err  # the engine's epoch lines
    assert "report: 2 of 2, per-layer table of the pruned network, ~" in err
    n_layers = len(m["sensitivity"]["layers"])
    assert f"Fig. 6: sensitivity (dense network, no retraining): {n_layers} of {n_layers}, layer" in err
    if "tradeoff" in cfg:
        n = 2 * len(cfg["tradeoff"]["ratios"]) + 2
        assert f"Fig. 5: 2 of {n}, L2, " in err and f"Fig. 5: {n} of {n}, L2, iterative in" in err
        assert all(f"Fig. 5: {k} of {n}, " in line and " left" in line
                   for k in range(2, n + 1) for line in err.splitlines() if f"Fig. 5: {k} of {n}, " in line)
    assert "curves" in m["figures"] and "![curves](curves.png)" in (tmp_path / "report.md").read_text()
    assert m["seconds"]["dense"] < 1e6 and "0" * 40 not in m["provenance"]["commits"]
    bounds = cfg["bounds"]
    assert m["pruned"]["test_error"] <= bounds["max_test_error"]
    assert m["pruned"]["compression"] >= bounds["min_compression"]
    assert all(c["ok"] for c in m["checks"].values()) and set(m["checks"]) == set(bounds)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["pruned"] == m["pruned"] and saved["provenance"]["seed"] == cfg["train"].get("seed", 0)
    report = (tmp_path / "report.md").read_text()
    assert "| paper |" in report and "Per-layer table" in report and "Provenance" in report
    assert f"test error {100 * m['pruned']['test_error']:.2f}% (bound ≤ {100 * bounds['max_test_error']:.2f}%) ✓" \
        in report
    assert "Figs. 5 and 6 are measured on AlexNet" in report
    # no absolute paths: config and results relative to the repository root
    assert m["config"] == f"reproduce/{name}.json" and not os.path.isabs(m["results"])
    assert (REPRO_DIR.parent / m["results"]).resolve() == tmp_path.resolve()
    assert not [v for v in strings(saved) if os.path.isabs(v)]
    # weights% left per layer in the report match the pruning log's last round
    last = m["rounds"][-1]["density"]
    assert m["pruned"]["weights_left"] == pytest.approx(last, abs=1e-6)
    for fig in m["figures"].values():
        assert (tmp_path / fig).stat().st_size > 1000
    # the pruned net as a model file: on disk it is >= 10x smaller than the unpruned
    # dense file (the sparse-storage target; not min_compression, which counts
    # parameters), with the same predictions on the MNIST test set
    net = load_checkpoint(tmp_path / "work" / "pruned" / "checkpoint.h5").net
    export_model(net, tmp_path / "pruned.h5", "relative")
    export_model(build_model(cfg["train"]["model"]), tmp_path / "dense.h5", "dense")
    ratio = (tmp_path / "dense.h5").stat().st_size / (tmp_path / "pruned.h5").stat().st_size
    assert ratio >= 10.0, ratio
    x, _ = load_split("mnist", net.input_shape, numpy, split="test")["test"]
    assert numpy.array_equal(load_model(tmp_path / "pruned.h5").predict(x), net.predict(x))
    # a second call finds every step done, says so, and reproduces the same numbers
    capsys.readouterr()
    again = reproduce(name, tmp_path, progress=True)
    assert again["pruned"] == m["pruned"] and again["dense"] == m["dense"]
    stages = {k: v for k, v in again["seconds"].items() if k != "total"}
    assert again["seconds"]["total"] == pytest.approx(sum(stages.values()), abs=0.2)  # no total counted twice
    assert again["seconds"]["total"] < 1.5 * m["seconds"]["total"] + 30
    err = capsys.readouterr().err
    assert f"dense training: reused {tmp_path / 'work' / 'dense'} (done earlier)" in err
    assert f"iterative pruning: reused {tmp_path / 'work' / 'pruned'} (done earlier)" in err
    assert "epoch 1:" not in err  # nothing retrained
    if "tradeoff" in cfg:
        assert f"Fig. 5: 1 of {n}, reused {tmp_path / 'work' / 'tradeoff' / 'l1-base'} (done earlier)" in err
        assert f"Fig. 5: {n} of {n}, reused" in err
    # an edited config does not silently reuse runs made with other settings
    for part, key, value in (("prune", "seed", 1), ("train", "epochs", cfg["train"]["epochs"] + 1)):
        edited = json.loads(json.dumps(cfg))
        edited[part][key] = value
        (tmp_path / "edited.json").write_text(json.dumps(edited))
        with pytest.raises(SparsenetError, match="other settings"):
            reproduce(str(tmp_path / "edited.json"), tmp_path, progress=False)


def test_experiments_and_errors(tmp_path, capsys):
    names = {p.stem for p in REPRO_DIR.glob("*.json")}
    assert {"lenet-300-100", "lenet-5", "lenet-300-100-ci", "lenet-5-ci"} <= names
    for n in names:
        load_config(n)  # every committed config is valid
    with pytest.raises(SparsenetError, match="no experiment 'googlenet'"):
        find_config("googlenet")
    (tmp_path / "bad.json").write_text('{"experiment": "x"}')
    assert cli.main(["reproduce", str(tmp_path / "bad.json")]) == 2
    assert "needs 'experiment', 'prune' and either 'train' or 'pretrained'" in capsys.readouterr().err


def test_paths_and_checks_read_as_bound_and_value():
    assert repo_path(REPRO_DIR / "lenet-5.json") == "reproduce/lenet-5.json"
    assert repo_path(REPRO_DIR / "results" / "lenet-5") == "reproduce/results/lenet-5"
    assert format_check("max_test_error", {"bound": 0.0164, "value": 0.0156, "ok": True}) == \
        "test error 1.56% (bound ≤ 1.64%) ✓"
    assert format_check("min_compression", {"bound": 12, "value": 11.5, "ok": False}) == \
        "compression 11.5× (bound ≥ 12×) ✗ NOT MET"


def test_tradeoff_frame_follows_the_retrained_curves():
    """Fig. 5's y range fits 0 and the retrained curves (0.1-point differences stay visible); a curve without
    retraining that falls far below leaves the frame and its lowest point is reported for the title."""
    curves = {"L2 w/o retrain": {"pruned": [0.5, 0.9], "loss": [0.001, 0.47]},
              "L2 w/ retrain": {"pruned": [0.5, 0.9], "loss": [-0.0004, 0.013]},
              "L2 iterative prune + retrain": {"pruned": [0.5, 0.9], "loss": [-0.0007, 0.0044]}}
    lo, hi, low = tradeoff_limits({"curves": curves, "dense_error": 0.015})
    assert -1.6 < lo < -1.3 and 0.07 < hi < 0.3 and low == pytest.approx(-47.0)
    lo, hi, low = tradeoff_limits({"curves": {k: curves[k] for k in list(curves)[1:]}, "dense_error": 0.015})
    assert low is None  # nothing leaves the frame


def test_training_curves_png(tmp_path):
    pytest.importorskip("matplotlib")
    dense = [{"epoch": e, "loss": 1.0 / e, "train_error": 0.1, "test_error": 0.05 / e, "seconds": 1.0}
             for e in (1, 2, 3)]
    prune = [{"event": "start", "test_error": 0.02},
             *[r for k in (1, 2) for r in ({"event": "prune", "round": k, "test_error": 0.03 * k},
                                          *({"event": "epoch", "round": k, "epoch": e, "loss": 0.1, "test_error": 0.02}
                                            for e in (1, 2)), {"event": "round", "round": k, "test_error": 0.02})]]
    assert plot_curves({"dense training": dense, "iterative pruning": prune}, tmp_path / "curves.png")
    assert plot_curves(dense, tmp_path / "one.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000 and (tmp_path / "one.png").stat().st_size > 1000


def test_training_curves_say_what_their_marks_are(monkeypatch, tmp_path):
    """One legend names the lines, the post-prune marks and the round boundaries; epochs tick as whole numbers."""
    pytest.importorskip("matplotlib")
    import contextlib

    from matplotlib.figure import Figure

    from sparsenet import figures

    drawn = []  # the figure, kept instead of written
    monkeypatch.setattr(figures, "atomic_path", contextlib.nullcontext)
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    prune = [{"event": "start", "test_error": 0.02}] + [
        r for k in (1, 2) for r in ({"event": "prune", "round": k, "test_error": 0.03},
                                    *({"event": "epoch", "round": k, "epoch": e, "loss": 0.1, "test_error": 0.02}
                                      for e in (1, 2)))]
    assert plot_curves({"iterative pruning": prune}, tmp_path / "c.png")
    fig, = drawn
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "training loss", "test error", "round starts: prune", "test error right after the prune"]
    ticks = [t for t in fig.axes[0].get_xticks() if 0 <= t <= 5]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
