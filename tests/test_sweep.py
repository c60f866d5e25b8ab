"""sparsenet sweep: the spec, the task graph, the same numbers serially / on a LocalCluster / through an external
scheduler, faults (a worker killed mid-task, an interrupted sweep, failing tasks, an unreachable scheduler), the
statistics against SciPy by hand, and the random pruning criterion the ``random`` method needs."""
import contextlib
import json
import math
import os
import re
import signal
import sys
import threading
from pathlib import Path

import numpy
import pytest
from hypothesis import given, strategies as st

import sparsenet
from sparsenet import engine, methods, pruning, stats
from sparsenet.cli import main
from sparsenet.util import SparsenetError

SW = sys.modules["sparsenet.sweeps"]
# Small and quick: 256 images, 3 dense epochs (a worker can be killed between them), han in 2 rounds of 1 epoch,
# rewind (han's masks on the initial weights: a run of the other kind, engine.run with a masked network).
SPEC = {"name": "t", "train": {"epochs": 3, "train_subset": 256, "lr": 0.05, "lr_policy": "fixed"},
        "retrain": {"lr": 0.01, "lr_policy": "fixed"}, "rounds": 2, "epochs": 1,
        "seeds": [0, 1], "methods": ["han", "rewind"], "densities": [0.1]}
DYNAMIC = {"seconds", "run_seconds", "resumed", "blas", "source"}  # what may differ between two runs


def _logs(out):
    """Every task's log (without timings and paths) and final weights, by task id."""
    got = {}
    for log in sorted(Path(out, "tasks").rglob("log.jsonl")):
        task = log.parent.relative_to(Path(out, "tasks")).as_posix()
        recs = [{k: v for k, v in json.loads(line).items() if k not in DYNAMIC}
                for line in log.read_text().splitlines()]
        net = sparsenet.load_checkpoint(log.parent / "checkpoint.h5").net
        got[task] = (recs, {n: (p.data.tobytes(), p.mask.tobytes()) for n, p in net.params().items()})
    return got


def _records(result):
    return {r["task"]: {k: v for k, v in r.items() if k not in DYNAMIC} for r in result["tasks"]}


def assert_same_numbers(out, ref_out, result, ref):
    assert _records(result) == _records(ref)
    a, b = _logs(out), _logs(ref_out)
    assert a.keys() == b.keys() and len(a) == 6
    for task in a:
        assert a[task] == b[task], task


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """SPEC run serially: the numbers every other way of running it must give."""
    out = tmp_path_factory.mktemp("serial") / "sweep"
    result = sparsenet.sweep(SPEC, out, serial=True, progress=False)
    assert all(r["status"] == "ok" for r in result["tasks"]), result["tasks"]
    return out, result


# ----------------------------------------------------------------------------- the spec and the graph
BAD = [({"bogus": 1}, "unknown keys bogus"), ({"seeds": None}, "'seeds' is missing"),
       ({"methods": ["han", "magic"]}, "methods: 'magic' is not allowed"),
       ({"densities": [0.5, 1.0]}, "densities: 1.0"),
       ({"densities": [0.1, 0.1]}, "repeated"), ({"train": {"seed": 3}}, "seeds are an axis"),
       ({"train": {"model": "lenet-5"}, "models": ["lenet-5"]}, "give the model once"),
       ({"retrain": {"epochs": 2}}, "retrain: unknown settings ['epochs']"), ({"retrain": {"lr": -1}}, "lr must be"),
       ({"quality": {"fc9": 1.0}}, "no prunable layer fc9"), ({"rounds": 0}, "rounds must be"),
       ({"methods": ["l2-retrain"], "densities": [1e-4]}, "keeps no weight of lenet-300-100's layer fc3"),
       ({"train": {"epochs": 0}}, "epochs must be"), ({"datasets": ["npz:nowhere.npz"]}, "no such .npz file"),
       ({"description": 5}, "description must be a string"), ({"name": ".."}, "not dots alone"),
       ({"methods": [["han"]]}, "methods: ['han'] is not allowed"), ({"seeds": 10**15}, "more than 10,000"),
       ({"rounds": 10**12}, "out of range")]


@pytest.mark.parametrize("change, message", BAD)
def test_a_bad_spec_is_one_line_and_writes_nothing(tmp_path, change, message, capsys):
    spec = {k: v for k, v in {**SPEC, **change}.items() if v is not None}
    with pytest.raises(SparsenetError, match="^sweep spec: .*" + re.escape(message)) as e:
        sparsenet.sweep(spec, tmp_path / "out", serial=True, progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert main(["sweep", str(path), "--out", str(tmp_path / "out2"), "--serial"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sparsenet: error: {path}: ") and err.count("\n") == 1 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.json"]


def test_toml_spec_and_its_parse_errors(tmp_path):
    good = tmp_path / "s.toml"
    good.write_text('seeds = 2\nmethods = ["han"]\ndensities = [0.1]\n[train]\nmodel = "lenet-5"\nepochs = 1\n')
    spec = SW.load_spec(good)
    assert spec["name"] == "s" and spec["seeds"] == [0, 1] and spec["models"] == ["lenet-5"]
    bad = tmp_path / "b.toml"
    bad.write_text("seeds = [0,\n")
    with pytest.raises(SparsenetError, match=f"^{bad}: cannot parse the sweep spec"):
        SW.load_spec(bad)


def test_the_task_graph():
    spec = SW.load_spec({**SPEC, "methods": ["reinit", "l1-retrain", "global"], "densities": [0.5, 0.05]})
    jobs = SW.plan(spec)
    ids = [j["task"] for j in jobs]
    assert len(ids) == len(set(ids)) == 2 * (2 + 2 * 4)  # per seed: dense, l1-base; per density han (for reinit) + 3
    for j in jobs:  # every task after the ones it needs, which are of its seed
        assert all(ids.index(d) < ids.index(j["task"]) and f"seed-{j['seed']}/" in d for d in j["deps"])
    by = {j["task"]: j for j in jobs}
    at = "lenet-300-100-mnist/seed-1/"
    assert by[at + "reinit-0.05"]["deps"] == [at + "han-0.05"] and by[at + "han-0.05"]["deps"] == [at + "dense"]
    assert by[at + "l1-retrain-0.5"]["deps"] == [at + "l1-base"] and by[at + "global-0.5"]["deps"] == [at + "dense"]
    assert by[at + "dense"]["weight"] == SPEC["train"]["epochs"] + 1 and by[at + "global-0.5"]["weight"] == 2 * 1 + 1


def test_a_rerun_must_keep_the_settings(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "spec.json").write_text(json.dumps(SW.load_spec(SPEC)))
    before = (out / "spec.json").read_bytes()
    with pytest.raises(SparsenetError, match="other settings \\(rounds\\)"):
        sparsenet.sweep({**SPEC, "rounds": 3, "seeds": 5}, out, serial=True, progress=False)
    assert (out / "spec.json").read_bytes() == before and sorted(out.iterdir()) == [out / "spec.json"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    with pytest.raises(SparsenetError, match="not a sweep folder"):
        sparsenet.sweep(SPEC, tmp_path / "other", serial=True, progress=False)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "spec.json").write_text("[]")
    with pytest.raises(SparsenetError, match="damaged"):
        sparsenet.sweep(SPEC, tmp_path / "odd", serial=True, progress=False)
    with pytest.raises(SparsenetError, match="not a sweep folder"):  # "missing/.." is the folder holding "other"
        sparsenet.sweep(SPEC, tmp_path / "missing" / "..", serial=True, progress=False)


# ----------------------------------------------------------------------------- methods and the random criterion
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_random_mask_keeps_the_count_among_survivors_and_is_reproducible(seed, first, sparsity):
    rng = numpy.random.default_rng(seed)
    W = rng.standard_normal((20, 30)).astype(numpy.float32)
    M = (rng.random(W.shape) >= first).astype(numpy.float32)
    new = pruning.random_mask(W, M, sparsity)
    assert new.dtype == M.dtype and set(numpy.unique(new)) <= {0, 1} and not (new > M).any()
    assert new.sum() == min(M.sum(), round((1 - sparsity) * M.size))
    assert numpy.array_equal(new, pruning.random_mask(W.copy(), M.copy(), sparsity))


def test_random_criterion_ignores_magnitude_and_depends_on_the_weights():
    net = sparsenet.build_model("lenet-300-100", 0)
    w = abs(net.params()["fc1.W"].data.copy())
    twin = sparsenet.build_model("lenet-300-100", 0)
    pruning.prune(net, "random", {"fc1": 0.9, "default": 0.5})
    pruning.prune(twin, "random", {"fc1": 0.9, "default": 0.5})
    assert pruning.densities(net) == pytest.approx({"fc1": 0.1, "fc2": 0.5, "fc3": 0.5}, abs=1e-6)
    kept = net.params()["fc1.W"].mask.astype(bool)
    assert numpy.array_equal(kept, twin.params()["fc1.W"].mask)  # the same layer: the same draw
    big = w >= numpy.median(w)  # half the weights by magnitude: as many survivors there as chance says
    assert abs(kept[big].mean() - 0.1) < 0.01 and abs(kept[~big].mean() - 0.1) < 0.01
    other = sparsenet.build_model("lenet-300-100", 1)
    pruning.prune(other, "random", {"fc1": 0.9, "default": 0.5})
    assert not numpy.array_equal(kept, other.params()["fc1.W"].mask)
    with pytest.raises(SparsenetError, match="random amount for fc1 must be in \\[0, 1\\]"):
        pruning.prune(net, "random", {"fc1": 1.5})


@pytest.mark.parametrize("density", [0.5, 0.08, 0.01])
def test_han_targets_follow_the_quality_rule(density):
    net = sparsenet.build_model("lenet-300-100", 0)
    t = methods.han_targets(net, density, {"fc3": 0.5})
    sizes = {"fc1": 235200, "fc2": 30000, "fc3": 1000}
    kept = {k: round(v * sizes[k]) for k, v in t.items()}
    assert sum(kept.values()) == pytest.approx(round(density * sum(sizes.values())), abs=2)
    assert all(v >= 1 for v in kept.values()) and t["fc3"] > t["fc1"]  # a smaller q keeps more of fc3
    scale = {k: float(net.params()[f"{k}.W"].data.std()) * (0.5 if k == "fc3" else 1) for k in sizes}
    # the weakest kept and the strongest pruned weight of every layer, in units of q·std: one threshold
    lo = min(numpy.sort(abs(net.params()[f"{k}.W"].data.ravel()))[-kept[k]] / scale[k] for k in sizes)
    hi = max(numpy.sort(abs(net.params()[f"{k}.W"].data.ravel()))[-kept[k] - 1] / scale[k] for k in sizes)
    assert hi <= lo + 1e-6


def test_every_method_is_documented():
    for name, m in methods.METHODS.items():
        assert m.start in ("dense", "l1-base", "han") and len(m.doc) > 40
        assert f"``{name}``" in methods.__doc__


# ----------------------------------------------------------------------------- statistics
def test_statistics_against_scipy_by_hand():
    from scipy import stats as sp

    a = [0.0152, 0.0161, 0.0149, 0.0170, 0.0158]
    b = [0.0160, 0.0163, 0.0158, 0.0171, 0.0166]
    d = stats.describe(a)
    n, mean = len(a), sum(a) / len(a)
    sd = math.sqrt(sum((x - mean) ** 2 for x in a) / (n - 1))
    half = sp.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    assert d["n"] == 5 and d["mean"] == pytest.approx(mean) and d["sd"] == pytest.approx(sd)
    assert d["ci"] == pytest.approx([mean - half, mean + half])
    p = stats.paired(a, b)
    diffs = [x - y for x, y in zip(a, b)]
    dm = sum(diffs) / n
    dsd = math.sqrt(sum((x - dm) ** 2 for x in diffs) / (n - 1))
    t = dm / (dsd / math.sqrt(n))
    assert p["mean_diff"] == pytest.approx(dm) and p["t"] == pytest.approx(t)
    assert p["p"] == pytest.approx(2 * sp.t.sf(abs(t), n - 1))
    assert stats.describe([0.3]) == {"n": 1, "mean": 0.3, "sd": None, "ci": None}
    assert stats.paired([1, 2], [1, 2])["p"] == 1.0 and stats.paired([1, 2], [0, 1])["p"] == 0.0


def test_claims_in_words():
    def pair(a, b, da, db, density=0.05):
        return {"density": density, "a": a, "b": b, "seeds": list(range(len(da))), **stats.paired(da, db)}

    better = pair("han", "one-shot", [0.010, 0.012, 0.011, 0.013], [0.020, 0.023, 0.021, 0.022])
    same = pair("l1-retrain", "l2-retrain", [0.02, 0.03, 0.02, 0.03], [0.03, 0.02, 0.02, 0.03])  # stored l1 first
    out = {c["a"] + " " + c["b"]: c for c in SW.claims([better, same], [0.5, 0.05])}
    assert out["han one-shot"]["verdict"] == "holds" and "p = " in out["han one-shot"]["sentence"]
    flipped = out["l2-retrain l1-retrain"]  # the claim is about l2 − l1: the stored l1 − l2 turned around
    assert flipped["comparisons"][0]["mean_diff"] == pytest.approx(-same["mean_diff"])
    assert flipped["verdict"].startswith("not shown: no significant difference")
    assert out["han random"]["verdict"] == "not tested by this sweep"
    assert "not tested by this sweep (it needs han and random)" in out["han random"]["sentence"]
    worse = pair("han", "reinit", [0.05, 0.06, 0.055], [0.01, 0.012, 0.011])
    assert stats.verdict([worse]) == "does not hold: the opposite holds"


# ----------------------------------------------------------------------------- the same numbers everywhere
@pytest.mark.mnist
def test_local_cluster_gives_the_serial_numbers_even_with_a_worker_killed(reference, tmp_path):
    """The embedded LocalCluster (2 workers); once the first dense run has saved epoch 1 of 3, every worker
    process is killed with SIGKILL: the nannies start new ones, the tasks resume from their checkpoints."""
    import psutil

    out, target = tmp_path / "sweep", "lenet-300-100-mnist/seed-0/dense"
    log, killed, stop = out / "tasks" / target / "log.jsonl", [], threading.Event()

    def kill_when_an_epoch_is_saved():
        while not stop.wait(0.005):
            if log.is_file() and len(log.read_text().splitlines()) == 1:
                for child in psutil.Process().children(recursive=True):  # the worker processes (spawned)
                    with contextlib.suppress(psutil.Error):
                        if "spawn_main" in " ".join(child.cmdline()):
                            os.kill(child.pid, signal.SIGKILL)
                            killed.append(child.pid)
                return

    killer = threading.Thread(target=kill_when_an_epoch_is_saved, daemon=True)
    killer.start()
    try:
        result = sparsenet.sweep(SPEC, out, workers=2, progress=False)
    finally:
        stop.set()
        killer.join(timeout=10)
    assert len(killed) >= 2, "the workers were not found, or the dense task ended before it could be killed"
    assert "LocalCluster, 2 worker" in result["where"]
    rec = next(r for r in result["tasks"] if r["task"] == target)
    assert rec["status"] == "ok" and rec["resumed"]  # it found its checkpoint of epoch 1
    assert_same_numbers(out, reference[0], result, reference[1])
    report = (out / "report.md").read_text()
    assert "## lenet-300-100-mnist" in report and "95% CI" in report
    saved = json.loads((out / "sweep.json").read_text())
    assert {r["method"] for r in saved["groups"][0]["rows"]} == {"han", "rewind"}
    assert all(r["total_epochs"] > r["epochs"] for r in saved["tasks"] if r["method"] != "dense")


@pytest.mark.mnist
def test_an_external_scheduler_gives_the_serial_numbers(reference, external_scheduler, tmp_path):
    out = tmp_path / "sweep"
    result = sparsenet.sweep(SPEC, out, scheduler=external_scheduler, progress=False)
    assert result["where"] == f"Dask, scheduler {external_scheduler}"
    assert_same_numbers(out, reference[0], result, reference[1])


# ----------------------------------------------------------------------------- faults
@pytest.mark.mnist
def test_an_interrupted_sweep_reruns_only_what_is_missing(reference, tmp_path, monkeypatch):
    real, calls, stop = engine.train_epoch, [], [5]

    def counting(*a, **k):
        calls.append(1)
        if len(calls) == stop[0]:  # seed 0: dense (3 epochs) done, han's round 1 saved, in round 2: Ctrl-C
            stop[0] = None
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(engine, "train_epoch", counting)
    out = tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        sparsenet.sweep(SPEC, out, serial=True, progress=False)
    assert (out / "tasks/lenet-300-100-mnist/seed-0/dense/result.json").is_file()
    assert not (out / "tasks/lenet-300-100-mnist/seed-0/han-0.1/result.json").exists()
    calls.clear()
    result = sparsenet.sweep(SPEC, out, serial=True, progress=False)
    total = 2 * (3 + 2 + 3)  # epochs of the whole sweep
    assert len(calls) == total - 4  # the 4 saved epochs are not trained again
    recs = {r["task"]: r for r in result["tasks"]}
    assert recs["lenet-300-100-mnist/seed-0/han-0.1"]["resumed"]
    assert_same_numbers(out, reference[0], result, reference[1])


@pytest.mark.mnist
def test_failing_tasks_are_recorded_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    spec = {"name": "f", "train": {"epochs": 1, "train_subset": 256, "lr": 0.05, "lr_policy": "fixed"},
            "retrain": {"lr": 0.01, "lr_policy": "fixed"}, "rounds": 1, "epochs": 1, "l1": 1e7, "l1_epochs": 1,
            "seeds": [0], "methods": list(methods.METHODS), "densities": [0.1]}
    path = tmp_path / "f.json"
    path.write_text(json.dumps(spec))

    def boom(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setitem(methods.METHODS, "one-shot", methods.METHODS["one-shot"].__class__("one-shot", "dense", boom,
                                                                                           "raises"))
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--serial", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "report: " in printed and "tasks failed" in printed
    res = json.loads((tmp_path / "out" / "sweep.json").read_text())
    status = {r["method"]: (r["status"], r.get("reason", "")) for r in res["tasks"]}
    assert status["one-shot"] == ("failed", "RuntimeError: boom")
    assert status["l1-base"][0] == "failed" and status["l1-base"][1].startswith("training diverged in round 1, epoch 1")
    assert status["l1-retrain"] == status["l1-noretrain"] == (
        "failed", "not run: lenet-300-100-mnist/seed-0/l1-base failed")
    ok = {m for m, (s, _) in status.items() if s == "ok"}
    assert ok == set(methods.METHODS) - {"one-shot", "l1-retrain", "l1-noretrain"} | {"dense"}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Failed tasks" in report and "RuntimeError: boom |" in report
    rows = {(r["method"]): r for r in res["groups"][0]["rows"]}
    assert rows["one-shot"]["n"] == 0 and rows["one-shot"]["failed"] == 1 and rows["han"]["n"] == 1
    assert all(r["weights_left"] == pytest.approx(0.1, abs=1e-3) for r in rows.values() if r["n"])


def test_an_unreachable_scheduler_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(SPEC))
    args = ["sweep", str(path), "--out", str(tmp_path / "out"), "--connect-timeout", "1"]
    assert main([*args, "--scheduler", f"tcp://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sparsenet: error: cannot reach the Dask scheduler at tcp://127.0.0.1:{port}")
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
    monkeypatch.setenv("SPARSENET_SCHEDULER", "nonsense")
    assert main(args) == 2
    assert "missing port number" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parent.parent.glob("reproduce/sweeps/*.toml")),
                         ids=lambda p: p.name)
def test_the_committed_specs_are_valid(path):
    spec = SW.load_spec(path)
    assert spec["name"] and spec["description"]
    assert len(SW.plan(spec)) >= len(spec["seeds"]) * (1 + len(spec["methods"]) * len(spec["densities"]))


@pytest.mark.mnist
def test_a_result_that_is_not_the_tasks_own_is_not_taken_for_it(reference, tmp_path):
    """A result.json is taken only for the task it names, with the numbers the statistics read: a stub, another
    task's result, or one with a missing error make that task run again (to the serial numbers)."""
    import shutil

    out = tmp_path / "sweep"
    shutil.copytree(reference[0], out)
    tasks = {r["method"]: r["task"] for r in reference[1]["tasks"] if r["seed"] == 0}
    han, rewind = (out / "tasks" / tasks[m] / "result.json" for m in ("han", "rewind"))
    han.write_text(json.dumps({"status": "ok"}))
    rewind.write_text((out / "tasks" / tasks["dense"] / "result.json").read_text())
    result = sparsenet.sweep(SPEC, out, serial=True, progress=False)
    assert result["where"] == "serial" and _records(result) == _records(reference[1])
    assert json.loads(han.read_text())["task"] == tasks["han"]


def test_a_study_kept_as_its_results_only_is_finished_in_pieces(reference, tmp_path):
    """What a repository keeps of a study (spec.json and each task's result.json, no run folders) reruns to
    nothing; with one result missing, that task runs again from its dense source, which is retrained
    (its checkpoint is gone) to the same numbers."""
    import shutil

    out = tmp_path / "sweep"
    shutil.copytree(reference[0], out, ignore=lambda d, names: [n for n in names if n != "result.json"
                                                                  and not (Path(d) / n).is_dir()
                                                                  and n != "spec.json"])
    assert not list(out.rglob("checkpoint.h5")) and len(list(out.rglob("result.json"))) == 6
    result = sparsenet.sweep(SPEC, out, serial=True, progress=False)
    assert result["where"] == "nothing to run" and _records(result) == _records(reference[1])
    leaf = out / "tasks" / next(r["task"] for r in reference[1]["tasks"] if r["method"] == "rewind")
    (leaf / "result.json").unlink()
    result = sparsenet.sweep(SPEC, out, serial=True, progress=False)
    assert _records(result) == _records(reference[1])
    ran = {p.parent.relative_to(out / "tasks").as_posix() for p in out.rglob("checkpoint.h5")}
    rewind = leaf.relative_to(out / "tasks").as_posix()
    assert ran == {rewind, rewind.rsplit("/", 1)[0] + "/dense", rewind.replace("rewind", "han")}, ran
    assert all(_logs(out)[t] == _logs(reference[0])[t] for t in ran)


@pytest.mark.mnist
def test_dead_neurons_removed_change_no_output_and_count_in_the_frontier(reference):
    """Every pruned task records §3.5 on its final network: the units ``remove_dead_neurons`` finds in the
    checkpoint, the parameters left (at most the masked count) and the test error measured again, the same;
    the rows and the frontier carry them as a method of their own."""
    out, result = reference
    pruned = [r for r in result["tasks"] if r["density"] is not None]
    assert pruned
    for r in pruned:
        net = sparsenet.load_checkpoint(out / "tasks" / r["task"] / "checkpoint.h5").net
        units = pruning.remove_dead_neurons(net)
        gone = r["dead_removed"]
        assert gone["units"] == units and gone["nonzero_params"] == net.count_nonzero() <= r["nonzero_params"]
        assert gone["compression"] == round(r["params"] / gone["nonzero_params"], 3) >= r["compression"]
        assert gone["test_error"] == r["test_error"]
    group = result["groups"][0]
    for row in group["rows"]:
        mine = [r for r in pruned if (r["method"], r["density"]) == (row["method"], row["density"])]
        assert row["dead_removed"]["compression"] == pytest.approx(
            sum(r["dead_removed"]["compression"] for r in mine) / len(mine))
    labels = {f["method"] for f in group["frontier"]}
    assert labels == {"han", "rewind", "han, dead neurons removed", "rewind, dead neurons removed"}
    assert "dead neurons removed (§3.5)" in SW.format_report(result)
    stale = {k: v for k, v in pruned[0].items() if k != "dead_removed"}  # a record of an older version
    assert SW._valid_record(stale, stale) and not SW._valid_record({**stale, "dead_removed": {"test_error": None}},
                                                                    stale)


def test_the_figures_log_axis_labels_its_minor_ticks():
    """A narrow error range (a frontier study: 0.6–1.2%) gets every minor tick labelled; a wide one only the
    2s, 3s and 5s, below 1% as above it."""
    assert [SW.minor_label(v, 0.55, 1.25) for v in (0.6, 0.7, 0.9)] == ["0.6", "0.7", "0.9"]
    assert [SW.minor_label(v, 0.4, 40) for v in (0.2, 0.3, 0.4, 0.7, 5, 8, 20)] == ["0.2", "0.3", "", "", "5", "",
                                                                                   "20"]
