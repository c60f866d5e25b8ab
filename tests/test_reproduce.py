"""The reduced reproductions (reproduce/*-ci.json) end to end, with their stated bounds."""
import json
import os

import numpy
import pytest

from sparsenet import cli
from sparsenet.checkpoint import load_checkpoint
from sparsenet.data import load_split
from sparsenet.model import build_model
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
def test_reduced_reproduction_meets_its_bounds(name, tmp_path):
    cfg, _ = load_config(name)
    # results committed without their work/ folder (a fresh clone) are not resumed from
    (tmp_path / "metrics.json").write_text(json.dumps({"seconds": {"dense": 1e6},
                                                       "provenance": {"commits": ["0" * 40]}}))
    m = reproduce(name, tmp_path, progress=False)
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
    # a second call finds every step done and reproduces the same numbers
    again = reproduce(name, tmp_path, progress=False)
    assert again["pruned"] == m["pruned"] and again["dense"] == m["dense"]
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
    with pytest.raises(SparsenetError, match="no experiment 'alexnet'"):
        find_config("alexnet")
    (tmp_path / "bad.json").write_text('{"experiment": "x"}')
    assert cli.main(["reproduce", str(tmp_path / "bad.json")]) == 2
    assert "needs 'experiment', 'train' and 'prune'" in capsys.readouterr().err


def test_paths_and_checks_read_as_bound_and_value():
    assert repo_path(REPRO_DIR / "lenet-5.json") == "reproduce/lenet-5.json"
    assert repo_path(REPRO_DIR / "results" / "lenet-5") == "reproduce/results/lenet-5"
    assert format_check("max_test_error", {"bound": 0.0164, "value": 0.0156, "ok": True}) == \
        "test error 1.56% (bound ≤ 1.64%) ✓"
    assert format_check("min_compression", {"bound": 12, "value": 11.5, "ok": False}) == \
        "compression 11.5× (bound ≥ 12×) ✗ NOT MET"
