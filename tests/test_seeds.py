"""The paper's experiments over seeds (``sparsenet reproduce NAME --seeds N``) and the sensitivity grid
(``sparsenet sensitivity``), both run by the sweep engine: the same numbers in this process, on a LocalCluster
and through an external scheduler; statistics recomputed by hand from each seed's own metrics; reruns that
skip what is done; bad input in one line with nothing written."""
import json
import shutil
from pathlib import Path

import numpy
import pytest
from scipy import stats as sps

import sparsenet
from sparsenet import engine
from sparsenet.checkpoint import load_checkpoint
from sparsenet.cli import main
from sparsenet import data as D
from sparsenet.reproduce import reproduce, reproduce_seeds
from sparsenet.report import sensitivity, sensitivity_checkpoint
from sparsenet.util import SparsenetError

pytestmark = pytest.mark.mnist

# A LeNet-300-100 experiment of a few seconds: every stage of the real ones (dense, a pruning round, Fig. 6, Fig. 5).
TINY = {"experiment": "tiny", "train": {"model": "lenet-300-100", "epochs": 1, "train_subset": 1000, "lr": 0.05,
                                        "lr_policy": "fixed"},
        "prune": {"seed": 0, "retrain": {"epochs": 1, "lr": 0.01, "lr_policy": "fixed"},
                  "rounds": [{"criterion": "percentile", "amount": 0.8}]},
        "sensitivity": {"ratios": [0.0, 0.9]},
        "tradeoff": {"ratios": [0.5, 0.9], "epochs": 1, "l1": 1e-4, "l1_epochs": 1,
                     "retrain": {"lr": 0.01, "lr_policy": "fixed"}}}
DYNAMIC = {"seconds", "blas"}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def serial(config, tmp_path_factory):
    """TINY over seeds 0, 1, 2 in this process: the numbers every other way must give."""
    out = tmp_path_factory.mktemp("serial") / "seeds"
    return out, reproduce_seeds(config, 3, out, serial=True, progress=False)


def _records(result):
    return {t["task"]: {k: v for k, v in t.items() if k not in DYNAMIC} for t in result["tasks"]}


def test_each_seed_is_its_own_run_and_the_statistics_are_those_of_the_seeds(serial):
    out, r = serial
    assert [t["status"] for t in r["tasks"]] == ["ok"] * 3 and r["where"] == "serial"
    metrics = [json.loads((out / f"seed-{s}" / "metrics.json").read_text()) for s in range(3)]
    for s, m in enumerate(metrics):  # every seed of the config replaced
        assert m["provenance"]["seed"] == s and m["provenance"]["prune_seed"] == s
        work = out / f"seed-{s}" / "work"
        assert json.loads((work / "dense" / "config.json").read_text())["seed"] == s
        assert json.loads((work / "tradeoff" / "l2-0.50" / "schedule.json").read_text())["seed"] == s
    dense = [m["dense"]["test_error"] for m in metrics]
    pruned = [m["pruned"]["test_error"] for m in metrics]
    assert len(set(dense)) == 3  # three different networks
    for key, values in (("dense_error", dense), ("pruned_error", pruned)):
        s = r[key]
        half = sps.t.ppf(0.975, 2) * numpy.std(values, ddof=1) / numpy.sqrt(3)
        assert s["n"] == 3 and s["mean"] == pytest.approx(numpy.mean(values))
        assert s["sd"] == pytest.approx(numpy.std(values, ddof=1))
        assert s["ci"] == pytest.approx([numpy.mean(values) - half, numpy.mean(values) + half])
    diff = numpy.subtract(pruned, dense)
    assert r["change"]["mean_diff"] == pytest.approx(diff.mean())
    if diff.std() > 0:
        assert r["change"]["p"] == pytest.approx(sps.ttest_rel(pruned, dense).pvalue)
    sens = [m["sensitivity"]["layers"]["fc3"][1] for m in metrics]
    assert r["sensitivity"]["layers"]["fc3"][1] == pytest.approx(numpy.mean(sens))
    assert r["sensitivity"]["ci"]["fc3"][1][0] < numpy.mean(sens) < r["sensitivity"]["ci"]["fc3"][1][1]
    loss = [m["tradeoff"]["curves"]["L2 w/ retrain"]["loss"][1] for m in metrics]
    assert r["tradeoff"]["curves"]["L2 w/ retrain"]["loss"][1] == pytest.approx(numpy.mean(loss))
    report = (out / "report.md").read_text()
    for text in ("## Table 1 over seeds", "95% interval", "Pruned − dense", "## Each seed", "fig5_tradeoff_bands.png"):
        assert text in report
    pytest.importorskip("matplotlib")
    assert (out / "fig5_tradeoff_bands.png").stat().st_size > 0 and (out / "fig6_sensitivity_bands.png").is_file()


def test_a_seed_is_the_experiment_rerun_with_that_seed(serial, config, tmp_path):
    """TINY's own seeds are 0: its seed 0 over seeds is the plain run, number for number."""
    plain = reproduce(config, tmp_path / "plain", progress=False)
    seed0 = json.loads((serial[0] / "seed-0" / "metrics.json").read_text())
    for key in ("dense", "rounds", "sensitivity", "tradeoff"):
        assert plain[key] == seed0[key], key
    assert plain["pruned"] == seed0["pruned"]


def test_a_local_cluster_gives_the_serial_numbers(serial, config, tmp_path):
    r = reproduce_seeds(config, 3, tmp_path / "cluster", workers=2, progress=False)
    assert r["where"] == "Dask LocalCluster, 2 worker processes"
    assert _records(r) == _records(serial[1])
    for key in ("dense_error", "pruned_error", "compression", "change", "sensitivity", "tradeoff"):
        assert r[key] == serial[1][key], key


def test_a_rerun_runs_only_the_seeds_not_done(serial, config, tmp_path):
    out = tmp_path / "seeds"
    shutil.copytree(serial[0], out)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("seed-*/result.json")}
    again = reproduce_seeds(config, 3, out, serial=True, progress=False)
    assert again["where"] == "nothing to run" and _records(again) == _records(serial[1])
    (out / "seed-1" / "result.json").write_text("{damaged")  # a damaged or stub result: that seed runs again
    (out / "seed-2" / "result.json").write_text(json.dumps({"status": "ok", "seed": 2}))
    again = reproduce_seeds(config, 3, out, serial=True, progress=False)
    assert again["where"] == "serial" and _records(again) == _records(serial[1])
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("seed-*/result.json")}
    shutil.rmtree(out / "seed-0" / "work")  # a study kept as its results is still done
    more = reproduce_seeds(config, [0, 1, 2, 3], out, serial=True, progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert [t["seed"] for t in more["tasks"]] == [0, 1, 2, 3] and more["pruned_error"]["n"] == 4
    assert not (out / "seed-0" / "work").exists()


def _snapshot(folder):
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()} if Path(folder).exists() else None


def test_bad_input_is_one_line_and_writes_nothing(serial, config, tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**TINY, "train": {**TINY["train"], "epochs": 2}}))
    before = _snapshot(serial[0])
    cases = [(["reproduce", str(other), "--seeds", "2", "--out", str(serial[0]), "--serial"], "another config"),
             (["reproduce", "alexnet", "--seeds", "2", "--out", str(tmp_path / "a")], "trained weights"),
             (["reproduce", str(config), "--seeds", "0", "--out", str(tmp_path / "a")], "seeds must be"),
             (["reproduce", str(config), "--seeds", "1,1", "--out", str(tmp_path / "a")], "repeated"),
             (["reproduce", str(config), "--seeds", str(10**15), "--out", str(tmp_path / "a")], "more than 10,000"),
             (["reproduce", str(config), "--seeds", "x", "--out", str(tmp_path / "a")], "--seeds 'x'"),
             (["reproduce", str(config), "--workers", "2", "--out", str(tmp_path / "a")], "give --seeds N"),
             (["reproduce", str(config), "--seeds", "2", "--workers", "0", "--out", str(tmp_path / "a")],
              "workers must be"),
             (["reproduce", str(config), "--seeds", "2", "--scheduler", "tcp://127.0.0.1:1", "--connect-timeout",
               "1", "--out", str(tmp_path / "a")], "cannot reach the Dask scheduler")]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (args, err)
    assert _snapshot(serial[0]) == before and not (tmp_path / "a").exists()


BAD_CONFIGS = [({"tradeoff": True}, "'tradeoff' must be an object"), ({"tradeoff": {"ratios": [1.0]}}, "tradeoff.ratios"),
               ({"tradeoff": {"ratios": [0.5], "epochs": -1}}, "tradeoff.epochs"),
               ({"tradeoff": {"ratios": [0.5], "retrain": {"lr": -1}}}, "lr must be"),
               ({"sensitivity": {"ratios": "0.5"}}, "sensitivity.ratios"), ({"sensitivity": {"x": 1}}, "keys among"),
               ({"quantise": {"bits": 99}}, "bits"), ({"quantise": {"bits": 5, "sweep": {"layer": 3}}}, "sweep.layer"),
               ({"bounds": {"max_test_error": "low"}}, "bounds.max_test_error"), ({"bounds": {"best": 1}}, "keys among"),
               ({"description": 7}, "must be strings")]


@pytest.mark.parametrize("change, message", BAD_CONFIGS)
def test_a_bad_config_section_is_one_line_before_anything_runs(change, message, tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**TINY, **change}))
    for args in (["reproduce", str(path), "--out", str(tmp_path / "o")],
                 ["reproduce", str(path), "--seeds", "2", "--serial", "--out", str(tmp_path / "o")]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"sparsenet: error: {path}: ") and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def test_a_failing_seed_is_recorded_and_the_others_finish(config, tmp_path, monkeypatch, capsys):
    real = sparsenet.reproduce._reproduce

    def flaky(cfg, *a, **kw):
        if cfg["train"]["seed"] == 1:
            raise FloatingPointError("diverged")
        return real(cfg, *a, **kw)

    monkeypatch.setattr(sparsenet.reproduce, "_reproduce", flaky)
    out = tmp_path / "seeds"
    assert main(["reproduce", str(config), "--seeds", "2", "--serial", "--out", str(out), "--no-progress"]) == 2
    cap = capsys.readouterr()
    assert "over 1 seeds" in cap.out and "1 of 2 seeds failed: FloatingPointError: diverged" in cap.err
    assert "failed: FloatingPointError: diverged" in (out / "report.md").read_text()
    assert not (out / "seed-1" / "result.json").exists()
    monkeypatch.setattr(sparsenet.reproduce, "_reproduce", real)
    r = reproduce_seeds(config, 2, out, serial=True, progress=False)  # the rerun retries it
    assert [t["status"] for t in r["tasks"]] == ["ok", "ok"]


# ----------------------------------------------------------------------------- sensitivity on the engine
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck") / "run"
    engine.train(d, engine.TrainConfig(epochs=1, train_subset=1000, lr=0.05, lr_policy="fixed"), progress=False)
    return d / "checkpoint.h5"


RATIOS = [0.0, 0.5, 0.9, 1.0]


@pytest.fixture(scope="module")
def in_process(checkpoint, tmp_path_factory):
    return sensitivity_checkpoint(checkpoint, tmp_path_factory.mktemp("s"), RATIOS)


def test_sensitivity_cells_give_the_numbers_of_the_whole_grid(checkpoint, in_process):
    ck = load_checkpoint(checkpoint)
    x, t = D.test_arrays(ck.config, ck.net, numpy)
    ref = sensitivity(ck.net, x, t, RATIOS)
    assert in_process["where"] == "serial" and in_process["samples"] == len(x) == 10_000
    assert in_process["layers"] == ref["layers"] and in_process["baseline"] == ref["baseline"]
    assert in_process["layers"]["fc3"][-1] > 0.5  # a layer with nothing left: chance level


@pytest.mark.parametrize("how", ["local", "external"])
def test_sensitivity_on_dask_gives_the_same_numbers(checkpoint, in_process, tmp_path, how, request):
    where = {"workers": 2} if how == "local" else {"scheduler": request.getfixturevalue("external_scheduler")}
    r = sensitivity_checkpoint(checkpoint, tmp_path, RATIOS, **where)
    assert r["where"].startswith("Dask")
    assert r["layers"] == in_process["layers"] and r["baseline"] == in_process["baseline"]
    assert json.loads((tmp_path / "sensitivity.json").read_text())["layers"] == r["layers"]


def test_sensitivity_command_on_the_engine_and_its_errors(checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s"
    assert main(["sensitivity", str(checkpoint), "--ratios", "0,0.9", "--layers", "fc2", "--out", str(out),
                 "--workers", "1", "--no-progress", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert list(res["layers"]) == ["fc2"] and res["where"] == "Dask LocalCluster, 1 worker process"
    monkeypatch.setenv("SPARSENET_SCHEDULER", "tcp://127.0.0.1:1")
    for args, message in ((["--layers", "fc9"], "no prunable layer named fc9"),
                          (["--ratios", "0,2"], "pruning ratios must be"),
                          (["--connect-timeout", "1"], "cannot reach the Dask scheduler"),
                          (["--serial", "--workers", "2"], "--workers sizes the embedded cluster")):
        assert main(["sensitivity", str(checkpoint), "--out", str(tmp_path / "bad"), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "bad").exists()
    monkeypatch.delenv("SPARSENET_SCHEDULER")
    with pytest.raises(SparsenetError, match="no such checkpoint"):
        sensitivity_checkpoint(tmp_path / "missing.h5", tmp_path / "bad")
