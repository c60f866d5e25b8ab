"""sparsenet.paper: the published numbers, consistent with themselves, and the only copy."""
import ast
import inspect

import pytest

from sparsenet import paper, report, reproduce
from sparsenet.model import build_model


@pytest.mark.parametrize("model", sorted(paper.TABLE1))
def test_table1_compression_matches_params(model):
    row = paper.TABLE1[model]
    assert row["error_after"] <= row["error_before"] < 0.5
    assert row["params_before"] / row["params_after"] == pytest.approx(row["compression"], rel=0.05)


@pytest.mark.parametrize("model", sorted(paper.LAYERS))
def test_per_layer_tables(model):
    t = paper.LAYERS[model]
    assert f"Table {t['table']}" in t["source"] and "total" in t["rows"]
    assert all(0 < r["weights_left"] <= 1 for r in t["rows"].values())
    left = paper.weights_left(model)
    assert "total" not in left and min(left.values()) <= t["rows"]["total"]["weights_left"] <= max(left.values())
    if model in paper.TABLE1:  # the per-layer total is Table 1's compression
        assert 1 / t["rows"]["total"]["weights_left"] == pytest.approx(paper.TABLE1[model]["compression"], rel=0.1)


@pytest.mark.parametrize("model, table", [("lenet-300-100", 2), ("lenet-5", 3)])
def test_lenet_rows_match_the_networks(model, table):
    t = paper.LAYERS[model]
    assert t["table"] == table
    net = build_model(model)
    assert list(paper.weights_left(model)) == list(net.origin)  # same layer names, same order
    rows = t["rows"]
    for name, o in net.origin.items():  # published weights/FLOP are the dense layer's, rounded
        assert rows[name]["weights"] == pytest.approx(o["weights"], rel=0.05, abs=500)
        assert rows[name]["flop"] == pytest.approx(2 * o["macs"], rel=0.05, abs=500)
        assert set(rows[name]) == {"weights", "flop", "act", "weights_left", "flop_left"}
    assert sum(rows[n]["weights"] for n in net.origin) == pytest.approx(rows["total"]["weights"], rel=0.01)
    assert paper.TABLE1[model]["params_before"] == pytest.approx(sum(o["params"] for o in net.origin.values()),
                                                                 rel=0.01)


def test_reports_import_the_numbers_instead_of_copying_them():
    assert reproduce.TABLE1 is paper.TABLE1 and reproduce.LAYERS is paper.LAYERS and report.LAYERS is paper.LAYERS
    published = {v for row in paper.TABLE1.values() for k, v in row.items() if k != "compression"} - {"mnist"}
    keys = {"error_before", "error_after", "params_before", "params_after", "act", "weights_left", "flop_left"}
    for module in (report, reproduce):
        assert not hasattr(module, "PAPER") and not hasattr(module, "PAPER_TABLE1")
        for node in ast.walk(ast.parse(inspect.getsource(module))):  # docstrings and strings aside
            if isinstance(node, ast.Constant) and type(node.value) in (int, float):
                assert node.value not in published, (module.__name__, node.lineno, node.value)
            if isinstance(node, ast.Dict):  # no table of published numbers written out again
                assert not any(isinstance(k, ast.Constant) and k.value in keys and isinstance(v, ast.Constant)
                               for k, v in zip(node.keys, node.values)), (module.__name__, node.lineno)
