"""The reduced reproductions (reproduce/*-ci.json) end to end, with their stated bounds."""
import json

import numpy
import pytest

from sparsenet import cli
from sparsenet.checkpoint import load_checkpoint
from sparsenet.model import build_model
from sparsenet.reproduce import REPRO_DIR, find_config, load_config, reproduce
from sparsenet.sparse import export_model, load_model
from sparsenet.train import load_split
from sparsenet.util import SparsenetError


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
