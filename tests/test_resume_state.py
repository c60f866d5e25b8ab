"""Issue classes of the reliability review: a run folder is a state machine that every resume
checks whole before writing; a value read from a file is checked after its cast to the run's
dtype; read-only arrays are read-only; a command that fails leaves nothing half-made."""
import hashlib
import json
import warnings

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from sparsenet import cli, engine
from sparsenet import pruning as P
from sparsenet.checkpoint import load_checkpoint, save_checkpoint
from sparsenet.engine import Schedule, TrainConfig, prune_run, train
from sparsenet.h5io import set_text
from sparsenet.model import build_model
from sparsenet.param import Param
from sparsenet.util import SparsenetError, checked_cast

mnist = pytest.mark.mnist


def snapshot(folder):
    """Every file under ``folder`` (hidden ones too) with the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(args, capsys):
    """Run the CLI; it must exit 2 with one line on stderr, which is returned."""
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsenet: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A dense run, a pruning run from it and a quantisation run from that (small MNIST slices)."""
    root = tmp_path_factory.mktemp("runs")
    train(root / "dense", TrainConfig(epochs=2, train_subset=256), progress=False)
    prune_run(root / "dense" / "checkpoint.h5", root / "prune", Schedule.from_dict(
        {"retrain": {"epochs": 1}, "rounds": [{"criterion": "percentile", "amount": 0.5},
                                              {"criterion": "percentile", "amount": 0.8}]}), progress=False)
    prune_run(root / "prune" / "checkpoint.h5", root / "quant", Schedule.from_dict(
        {"rounds": [{"quantise": 4, "epochs": 1, "remove_neurons": False}]}), progress=False)
    return root


def copy_run(runs, name, tmp_path):
    import shutil

    shutil.copytree(runs / name, tmp_path / name)
    return tmp_path / name


# ----------------------------------------------------------------------------- a run resumed by another command
@mnist
@pytest.mark.parametrize("held, command", [("dense", "prune"), ("dense", "quantise"), ("prune", "quantise"),
                                           ("prune", "train"), ("quant", "prune"), ("quant", "train")])
def test_a_run_resumed_by_another_kind_of_command_is_one_line_and_changes_nothing(runs, tmp_path, capsys, held,
                                                                                   command):
    run = copy_run(runs, held, tmp_path)
    before = snapshot(run)
    err = one_line_error([command, "--out", str(run), "--resume", "--no-progress"], capsys)
    kind = {"dense": "train", "prune": "prune", "quant": "quantise"}[held]
    assert engine.RUN_KINDS[kind] in err and f"sparsenet {kind} --out {run} --resume" in err
    assert snapshot(run) == before


@mnist
def test_the_right_command_resumes_a_finished_run_without_writing(runs, tmp_path, capsys):
    for name, command in (("dense", "train"), ("prune", "prune"), ("quant", "quantise")):
        run = copy_run(runs, name, tmp_path)
        before = snapshot(run)
        assert cli.main([command, "--out", str(run), "--resume"]) == 0
        assert "finished" in capsys.readouterr().err
        assert snapshot(run) == before


# ----------------------------------------------------------------------------- the stored position
@mnist
def test_a_finished_run_gets_back_the_views_a_kill_left_behind(runs, tmp_path, capsys):
    """A kill after the last checkpoint commit but before its views (``log.jsonl``, the settings) were rewritten
    leaves them one step behind; resuming the finished run rewrites them from the checkpoint, and only them."""
    for name, command, settings in (("dense", "train", "config.json"), ("prune", "prune", "schedule.json"),
                                    ("quant", "quantise", "schedule.json")):
        run = copy_run(runs, name, tmp_path)
        before = snapshot(run)
        log = run / "log.jsonl"
        log.write_text("".join(log.read_text().splitlines(keepends=True)[:-1]))  # the last record not yet there
        (run / settings).unlink()
        assert cli.main([command, "--out", str(run), "--resume"]) == 0
        assert "finished" in capsys.readouterr().err
        assert snapshot(run) == before, name


def _edit_state(ck_path, edit):
    """Rewrite the run state stored in a checkpoint's config (as a damaged or hand-edited file would have it)."""
    with h5py.File(ck_path, "r+") as f:
        config = json.loads(f.attrs["config"])
        edit(config["run"], config)
        set_text(f, "config", json.dumps(config))


def _set(key, value):
    def edit(state, config):
        state[key] = value
    return edit


def _schedule_epochs(state, config):
    state["schedule"]["rounds"][0]["epochs"] += 1  # the schedule changed, its fingerprint not


def _drop_log_record(ck_path):
    ck = load_checkpoint(ck_path)
    with h5py.File(ck_path, "r+") as f:
        del f["log"]
        text = "".join(json.dumps(r) + "\n" for r in ck.log[:-1]).encode()
        f.create_dataset("log", data=np.frombuffer(text, np.uint8))


STATE_EDITS = {
    "round -1": _set("round", -1), "round past the end": _set("round", 3), "round 1.5": _set("round", 1.5),
    "round true": _set("round", True), "stage": _set("stage", "retrian"), "epoch past the round": _set("epoch", 7),
    "epoch -1": _set("epoch", -1), "iteration": _set("iteration", 5),
    "kind": lambda state, config: state.update(kind="prune" if state.get("kind") != "prune" else "train"),
    "unknown kind": _set("kind", "sweep"), "schedule": _schedule_epochs, "no schedule": _set("schedule", None),
    "extra key": _set("extra", 1), "fingerprint": _set("schedule_id", "0" * 16),
}


@mnist
@pytest.mark.parametrize("what", sorted(STATE_EDITS) + ["log record missing"])
@pytest.mark.parametrize("name, command", [("prune", "prune"), ("quant", "quantise"), ("dense", "train")])
def test_a_damaged_run_position_is_refused_before_anything_is_written(runs, tmp_path, capsys, what, name, command):
    run = copy_run(runs, name, tmp_path)
    if what == "log record missing":
        _drop_log_record(run / "checkpoint.h5")
    else:
        _edit_state(run / "checkpoint.h5", STATE_EDITS[what])
    before = snapshot(run)
    err = one_line_error([command, "--out", str(run), "--resume", "--no-progress"], capsys)
    assert "cannot be resumed" in err or "holds a" in err
    assert snapshot(run) == before


@mnist
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.fixed_dictionaries({}, optional={
    "round": st.integers(-2, 4), "stage": st.sampled_from(["prune", "retrain"]), "epoch": st.integers(-1, 3),
    "iteration": st.integers(-1, 20)}))
def test_any_position_but_the_stored_one_is_refused(runs, tmp_path_factory, state):
    """A pruning run stopped after round 1: every other (round, stage, epoch, iteration) is refused
    (resume or not), and the true one resumes to the uninterrupted run's log."""
    run = tmp_path_factory.mktemp("pos") / "prune"
    prune_run(runs / "dense" / "checkpoint.h5", run, Schedule.from_dict(
        {"retrain": {"epochs": 1}, "rounds": [{"criterion": "percentile", "amount": 0.5}]}), progress=False)
    stored = load_checkpoint(run / "checkpoint.h5").config["run"]
    if all(stored[k] == v for k, v in state.items()):
        return
    _edit_state(run / "checkpoint.h5", lambda s, c: s.update(state))
    before = snapshot(run)
    with pytest.raises(SparsenetError, match="cannot be resumed"):
        prune_run(None, run, resume=True, progress=False)
    assert snapshot(run) == before


@mnist
def test_resume_continues_a_stopped_run_of_each_kind(runs, tmp_path, kill_training):
    """The checks accept what a killed run stores (the kill fixture stops training mid-way)."""
    from conftest import Killed

    kill_training(2)
    with pytest.raises(Killed):
        prune_run(runs / "prune" / "checkpoint.h5", tmp_path / "q", Schedule.from_dict(
            {"rounds": [{"quantise": 4, "epochs": 2, "remove_neurons": False}]}), progress=False)
    kill_training(None)
    log = prune_run(None, tmp_path / "q", resume=True, progress=False, expect="quantise")
    assert [r.get("event") for r in log] == ["start", "quantise", "epoch", "epoch", "round"]


# ----------------------------------------------------------------------------- the cast is part of the check
@pytest.mark.parametrize("value, dtype, message", [
    (1e300, np.float32, "outside the range of float32"), (-1e39, np.float32, "outside the range"),
    (np.nan, np.float32, "NaN or infinite"), (np.inf, np.float64, "NaN or infinite"),
    (256, np.uint8, "outside the range of uint8"), (-1, np.uint8, "outside the range"),
    (2.5, np.int32, "not whole numbers"), (1 + 1e-12, np.float32, "cannot hold exactly"),
])
def test_checked_cast_refuses_what_the_dtype_cannot_hold(value, dtype, message):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SparsenetError, match=message):
            checked_cast(np.array([0.0, value]), dtype, "x", exact=True)


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=20))
def test_checked_cast_keeps_what_fits(values):
    a = np.array(values, np.float64)
    assert np.array_equal(checked_cast(a, np.float32, "x", exact=True), a.astype(np.float32))


def _float64_checkpoint(tmp_path, group, value, shared=False):
    """A pruned (or weight-shared) LeNet-300-100 checkpoint whose ``group`` (params, velocity, codebooks, …)
    entry for fc1.W is float64 and holds ``value`` at a kept position."""
    from sparsenet.optim import SGD
    from sparsenet.quantise import share_weights

    net = build_model("lenet-300-100")
    P.prune(net, "percentile", 0.5)
    if shared:
        share_weights(net, 3)
    opt = SGD(net.params())
    for p in net.params().values():
        p.state["momentum"] = p.data * 0
    path = tmp_path / "ck.h5"
    save_checkpoint(path, net, opt, config={"dataset": "mnist"})
    with h5py.File(path, "r+") as f:
        key = f"{group}/fc1.W"
        a = f[key][()].astype(np.float64)
        at = np.argwhere(f["masks/fc1.W"][()] == 1)[0] if a.ndim > 1 else (0,)
        a[tuple(at)] = value
        del f[key]
        f.create_dataset(key, data=a)
    return path


@pytest.mark.parametrize("group, shared", [("params", False), ("velocity", False), ("codebooks", True),
                                           ("codebook_velocity", True)])
def test_a_float64_value_float32_cannot_hold_is_refused_on_load_without_warnings(tmp_path, group, shared):
    path = _float64_checkpoint(tmp_path, group, 1e300, shared)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SparsenetError, match="outside the range of float32") as e:
            load_checkpoint(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_mask_that_float32_rounds_to_one_is_refused(tmp_path):
    path = _float64_checkpoint(tmp_path, "params", 0.5)
    with h5py.File(path, "r+") as f:
        m = f["masks/fc1.W"][()].astype(np.float64)
        m[m == 1] = 1 + 1e-12
        del f["masks/fc1.W"]
        f.create_dataset("masks/fc1.W", data=m)
    with pytest.raises(SparsenetError, match="masks/fc1.W.*cannot hold exactly"):
        load_checkpoint(path)


@pytest.mark.parametrize("command", ["eval", "predict", "report", "summary", "export", "quantise", "prune"])
def test_every_command_refuses_an_out_of_range_checkpoint_and_writes_nothing(tmp_path, capsys, command):
    path = _float64_checkpoint(tmp_path, "params", 1e300)
    target = tmp_path / "out"
    target.mkdir()
    (target / "model.h5").write_bytes(b"a good file")
    args = {"eval": [], "predict": [], "report": ["--out", str(target / "rep")], "summary": [],
            "export": [str(target / "model.h5"), "--force"], "quantise": ["--out", str(target / "q")],
            "prune": ["--out", str(target / "p")]}[command]
    before = snapshot(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        err = one_line_error([command, str(path), *args], capsys)
    assert "outside the range of float32" in err
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- read-only means read-only
def test_mask_codes_and_codebook_cannot_be_written():
    from sparsenet.quantise import share_weights

    net = build_model("lenet-300-100")
    P.prune(net, "percentile", 0.5)
    share_weights(net, 3)
    p = net.params()["fc1.W"]
    pruned = tuple(np.argwhere(p.mask == 0)[0])
    for name in ("mask", "codes", "codebook"):
        with pytest.raises(ValueError, match="read-only"):
            getattr(p, name)[pruned if name != "codebook" else 0] = 1
    with pytest.raises(ValueError, match="read-only"):
        p.mask.fill(1)
    P.check_masks(net)


@settings(max_examples=20, deadline=None)
@given(st.data())
def test_check_masks_catches_a_mask_changed_behind_params_back(data):
    """As a CuPy mask (no read-only arrays) written in place: the parameter's check says so."""
    p = Param(np.arange(1.0, 13.0, dtype=np.float32).reshape(3, 4))
    keep = np.array(data.draw(st.lists(st.booleans(), min_size=12, max_size=12))).reshape(3, 4)
    p.prune(keep)
    p.check()
    i = data.draw(st.integers(0, 11))
    live = p._mask  # the array Param keeps (what a CuPy user's in-place write would reach)
    flipped = live.copy()
    flipped.flat[i] = 1 - flipped.flat[i]
    live[...] = flipped
    with pytest.raises(SparsenetError, match="disagrees with the connections"):
        p.check()


def test_a_network_whose_mask_was_changed_in_place_is_neither_passed_nor_saved(tmp_path):
    net = build_model("lenet-300-100")
    P.prune(net, "percentile", 0.5)
    p = net.params()["fc2.W"]
    p._mask[tuple(np.argwhere(p.mask == 0)[0])] = 1  # what a write to a CuPy mask would do
    with pytest.raises(SparsenetError, match="fc2.W: mask disagrees"):
        P.check_masks(net)
    with pytest.raises(SparsenetError, match="fc2.W: mask disagrees"):
        save_checkpoint(tmp_path / "ck.h5", net)
    assert not list(tmp_path.iterdir())
