"""The run engine: dense training and iterative pruning on small slices of real MNIST
(skipped when MNIST is absent), schedules, resume after a kill at any instant, divergence."""
import json
import os
import tempfile

import numpy
import numpy as np
import pytest
from conftest import Killed

from sparsenet import cli, engine
from sparsenet import pruning as P
from sparsenet.checkpoint import load_checkpoint
from sparsenet.engine import Schedule, TrainConfig, evaluate, load_schedule, prune_run, train, uniform_schedule
from sparsenet.util import SparsenetError, eta, progress_bar
needs_mnist = pytest.mark.mnist


@needs_mnist
def test_lenet_300_100_learns_on_a_slice(tmp_path):
    """5,000 training images, 3 epochs of the default solver: under 10% test error (10,000 test images)."""
    cfg = TrainConfig(model="lenet-300-100", epochs=3, train_subset=5000)
    log = train(tmp_path / "run", cfg, progress=False)
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert log[-1]["test_error"] < 0.10
    assert log[-1]["loss"] < log[0]["loss"]
    r = evaluate(tmp_path / "run" / "checkpoint.h5")
    assert r["test_error"] == log[-1]["test_error"]
    assert r["params"] == r["nonzero_params"] == 266610


@needs_mnist
def test_lenet_5_learns_on_a_slice(tmp_path):
    """2,000 training images, 1 epoch: under 25% test error."""
    cfg = TrainConfig(model="lenet-5", epochs=1, train_subset=2000)
    log = train(tmp_path / "run", cfg, progress=False)
    assert log[-1]["test_error"] < 0.25


@needs_mnist
def test_resume_is_bit_identical(tmp_path):
    cfg = TrainConfig(model="lenet-300-100", epochs=3, train_subset=640, batch_size=32)
    straight = train(tmp_path / "a", cfg, progress=False)
    cfg1 = TrainConfig(**{**cfg.__dict__, "epochs": 1})
    train(tmp_path / "b", cfg1, progress=False)
    resumed = train(tmp_path / "b", resume=True, progress=False, epochs=3)
    strip = lambda log: [{k: v for k, v in r.items() if k != "seconds"} for r in log]
    assert strip(resumed) == strip(straight)
    a = load_checkpoint(tmp_path / "a" / "checkpoint.h5")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.h5")
    for name, p in a.net.params().items():
        assert np.array_equal(p.data, b.net.params()[name].data), name
        assert np.array_equal(p.state["momentum"], b.net.params()[name].state["momentum"]), name
    lines = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3]


@needs_mnist
def test_existing_run_is_not_overwritten(tmp_path):
    cfg = TrainConfig(epochs=1, train_subset=128)
    train(tmp_path, cfg, progress=False)
    with pytest.raises(SparsenetError, match="--resume"):
        train(tmp_path, cfg, progress=False)


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(SparsenetError, match="no such checkpoint"):
        train(tmp_path, resume=True, progress=False)


@pytest.mark.parametrize("bad", [dict(model="vgg"), dict(epochs=0), dict(batch_size=0),
                                 dict(lr_policy="cos"), dict(dataset="cifar")])
def test_bad_config(bad, tmp_path):
    with pytest.raises(SparsenetError):
        train(tmp_path, TrainConfig(**bad), progress=False)
    assert not (tmp_path / "checkpoint.h5").exists()


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A LeNet-300-100 trained for 2 epochs on 3,000 MNIST images."""
    run = tmp_path_factory.mktemp("dense")
    train(run, TrainConfig(epochs=2, train_subset=3000), progress=False)
    return run / "checkpoint.h5"


SMALL = {"seed": 3, "retrain": {"epochs": 2, "lr": 0.01, "lr_policy": "fixed"},
         "rounds": [{"criterion": "percentile", "amount": {"default": 0.5, "fc3": 0.2}},
                    {"criterion": "quality", "amount": 0.6, "epochs": 1, "freeze": ["fc1"]},
                    {"criterion": "percentile", "amount": 0.9}]}


# ----------------------------------------------------------------------------- schedules
def test_schedule_defaults_and_overrides():
    s = Schedule.from_dict(SMALL)
    assert [r["epochs"] for r in s.rounds] == [2, 1, 2]
    assert s.rounds[1]["freeze"] == ["fc1"] and s.rounds[0]["freeze"] == []
    assert s.rounds[2]["weight_decay"] == engine.RETRAIN_DEFAULTS["weight_decay"]
    assert Schedule.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("bad, message", [
    ({"rounds": []}, "non-empty 'rounds'"),
    ({"rounds": [{"criterion": "magic"}]}, "unknown criterion"),
    ({"rounds": [{"epochs": -1}]}, "epochs must be a whole number"),
    ({"rounds": [{"lr": "fast"}]}, "lr must be a finite number"),
    ({"rounds": [{"prune_more": True}]}, "unknown keys prune_more"),
    ({"retrain": {"speed": 1}, "rounds": [{}]}, "unknown retraining settings"),
    ({"rounds": [{}], "extra": 1}, "unknown schedule keys"),
    ([1, 2], "must be a JSON/TOML object"),
])
def test_schedule_rejects_bad_input(bad, message):
    with pytest.raises(SparsenetError, match=message):
        Schedule.from_dict(bad)


def test_schedule_files_and_inline_json(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(SMALL))
    (tmp_path / "s.toml").write_text(
        'seed = 3\n[retrain]\nepochs = 2\nlr = 0.01\nlr_policy = "fixed"\n'
        '[[rounds]]\ncriterion = "percentile"\namount = {default = 0.5, fc3 = 0.2}\n'
        '[[rounds]]\ncriterion = "quality"\namount = 0.6\nepochs = 1\nfreeze = ["fc1"]\n'
        '[[rounds]]\ncriterion = "percentile"\namount = 0.9\n')
    expect = Schedule.from_dict(SMALL)
    assert load_schedule(tmp_path / "s.json") == load_schedule(tmp_path / "s.toml") == expect
    assert load_schedule(json.dumps(SMALL)) == expect
    (tmp_path / "bad.toml").write_text("rounds = [")
    with pytest.raises(SparsenetError, match="cannot parse schedule"):
        load_schedule(tmp_path / "bad.toml")
    with pytest.raises(SparsenetError, match="no such schedule file"):
        load_schedule(tmp_path / "missing.json")


def test_uniform_schedule_reaches_the_target_in_equal_ratios():
    s = uniform_schedule("percentile", {"fc1": 0.92, "default": 0.75}, rounds=3, epochs=1)
    kept = [1 - r["amount"]["fc1"] for r in s.rounds]
    assert kept == pytest.approx([0.08 ** (1 / 3), 0.08 ** (2 / 3), 0.08])
    assert [r["amount"]["default"] for r in s.rounds][-1] == pytest.approx(0.75)
    assert all(r["amount"] == 1.2 for r in uniform_schedule("quality", 1.2, rounds=4).rounds)


# ----------------------------------------------------------------------------- runs
def _records(run, event):
    return [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines() if json.loads(l)["event"] == event]


@pytest.mark.mnist
def test_prune_run_end_to_end(dense, straight):
    log, ckpt = straight
    run = ckpt.parent
    assert [r["event"] for r in log] == ["start"] + ["prune", "epoch", "epoch", "round", "prune", "epoch", "round",
                                                     "prune", "epoch", "epoch", "round"]
    assert [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()] == log
    first = _records(run, "prune")[0]["density"]
    assert first["fc1"] == pytest.approx(0.5, abs=1e-4) and first["fc3"] == pytest.approx(0.8, abs=1e-3)
    rounds = _records(run, "round")
    nonzero = [log[0]["nonzero_params"]] + [r["nonzero_params"] for r in rounds]
    assert nonzero == sorted(nonzero, reverse=True) and rounds[-1]["compression"] > 8
    assert rounds[-1]["density"]["fc1"] <= 0.1 + 1e-3
    assert rounds[-1]["test_error"] < 0.12  # 3k training images, 2 epochs: dense is ~7%
    ck = load_checkpoint(run / "checkpoint.h5")
    P.check_masks(ck.net)
    assert ck.net.count_nonzero() == rounds[-1]["nonzero_params"]
    assert ck.config["run"]["round"] == 3 and ck.config["dataset"] == "mnist"
    assert json.loads((run / "schedule.json").read_text()) == Schedule.from_dict(SMALL).to_dict()
    with pytest.raises(SparsenetError, match="already holds a pruning run"):
        prune_run(dense, run, Schedule.from_dict(SMALL), progress=False)


@pytest.mark.mnist
def test_frozen_layer_is_unchanged_by_its_round(dense, tmp_path):
    sched = Schedule.from_dict({"retrain": {"epochs": 1}, "rounds": [
        {"criterion": "percentile", "amount": 0.5, "freeze": ["fc1", "fc3"], "remove_neurons": False}]})
    prune_run(dense, tmp_path / "r", sched, progress=False)
    before = load_checkpoint(dense).net
    P.prune(before, "percentile", 0.5)
    after = load_checkpoint(tmp_path / "r" / "checkpoint.h5").net
    for n in ("fc1.W", "fc1.b", "fc3.W", "fc3.b"):
        assert numpy.array_equal(before.params()[n].data, after.params()[n].data), n
    assert not numpy.array_equal(before.params()["fc2.W"].data, after.params()["fc2.W"].data)


@pytest.fixture(scope="module")
def straight(dense, tmp_path_factory):
    """The SMALL schedule run without interruption: (log, checkpoint path)."""
    run = tmp_path_factory.mktemp("straight")
    return prune_run(dense, run, Schedule.from_dict(SMALL), progress=False), run / "checkpoint.h5"


@pytest.mark.mnist
@pytest.mark.parametrize("kill_at", [1, 3, 5])  # round 1 right after its prune, round 2 (frozen fc1), round 3
def test_a_killed_run_resumes_bit_identically(dense, straight, tmp_path, kill_training, kill_at):
    kill_training(kill_at)
    with pytest.raises(Killed):
        prune_run(dense, tmp_path / "b", Schedule.from_dict(SMALL), progress=False)
    kill_training(None)
    resumed = prune_run(None, tmp_path / "b", resume=True, progress=False)
    strip = lambda log: [{k: v for k, v in r.items() if k != "seconds"} for r in log]  # noqa: E731
    assert strip(resumed) == strip(straight[0])
    a, b = load_checkpoint(straight[1]), load_checkpoint(tmp_path / "b" / "checkpoint.h5")
    for n, p in a.net.params().items():
        q = b.net.params()[n]
        assert numpy.array_equal(p.data, q.data) and numpy.array_equal(p.mask, q.mask), n
        assert numpy.array_equal(p.state["momentum"], q.state["momentum"]), n


def test_resume_needs_a_pruning_run(tmp_path):
    with pytest.raises(SparsenetError, match="no such checkpoint"):
        prune_run(None, tmp_path / "nothing", resume=True, progress=False)


@pytest.mark.mnist
def test_bad_layer_names_fail_before_any_work(dense, tmp_path):
    sched = Schedule.from_dict({"rounds": [{"criterion": "percentile", "amount": 0.5},
                                           {"criterion": "quality", "amount": {"conv1": 1.0}}]})
    with pytest.raises(SparsenetError, match="no prunable layer named conv1"):
        prune_run(dense, tmp_path / "r", sched, progress=False)
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- CLI
@pytest.mark.mnist
def test_cli_prune_and_resume(dense, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["prune", str(dense), "--out", str(out), "--criterion", "percentile", "--amount", "fc1=0.9,default=0.5",
            "--rounds", "2", "--epochs", "1", "--no-progress"]
    assert cli.main(args) == 0
    line = capsys.readouterr().out
    assert "parameters left" in line
    final = _records(out, "round")[-1]
    assert final["density"]["fc1"] == pytest.approx(0.1, abs=2e-3)
    assert cli.main(args) == 2
    assert "already holds a pruning run" in capsys.readouterr().err
    assert cli.main(["prune", "--out", str(out), "--resume", "--no-progress"]) == 0  # nothing left to do


@pytest.mark.parametrize("extra, message", [
    (["--amount", "fc1:0.9"], "expected a number or layer=number"),
    (["--schedule", "{not json"], "not valid JSON"),
    (["--amount", "fc7=0.5"], "no prunable layer named fc7"),
])
@pytest.mark.mnist
def test_cli_prune_errors_are_one_line(dense, tmp_path, capsys, extra, message):
    assert cli.main(["prune", str(dense), "--out", str(tmp_path / "r"), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_prune_needs_a_checkpoint(tmp_path, capsys):
    assert cli.main(["prune", "--out", str(tmp_path / "r")]) == 2
    assert "needs a CHECKPOINT" in capsys.readouterr().err


# ----------------------------------------------------------------------------- one commit point
def _strip(log):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in log]


@pytest.mark.mnist
@pytest.mark.parametrize("where", ["checkpoint", "log"])
@pytest.mark.parametrize("nth", [2, 4, 7])
def test_a_kill_inside_either_write_loses_nothing(dense, straight, tmp_path, monkeypatch, where, nth):
    """Killed inside the checkpoint write (a temporary file is left) or between the
    checkpoint and the log view: resume gives the uninterrupted run's checkpoint and log,
    and removes the leftover temporary files."""
    import sparsenet.util as U

    real, calls = U.atomic_path, []
    target = "checkpoint.h5" if where == "checkpoint" else "log.jsonl"

    def dying(path):
        if str(path).endswith(target):
            calls.append(1)
            if len(calls) == nth:  # a half-written temporary file stays, as after a real kill
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
                os.write(fd, b"half a file")
                os.close(fd)
                raise Killed
        return real(path)

    monkeypatch.setattr(U, "atomic_path", dying)
    import sparsenet.h5io as H
    monkeypatch.setattr(H, "atomic_path", dying)
    with pytest.raises(Killed):
        prune_run(dense, tmp_path / "b", Schedule.from_dict(SMALL), progress=False)
    monkeypatch.setattr(U, "atomic_path", real)
    monkeypatch.setattr(H, "atomic_path", real)
    assert list((tmp_path / "b").glob(".*.tmp"))
    resumed = prune_run(None, tmp_path / "b", resume=True, progress=False)
    assert not list((tmp_path / "b").glob(".*.tmp"))
    assert _strip(resumed) == _strip(straight[0])
    assert _strip([json.loads(l) for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]) == _strip(straight[0])
    a, b = load_checkpoint(straight[1]), load_checkpoint(tmp_path / "b" / "checkpoint.h5")
    assert _strip(a.log) == _strip(b.log)
    for n, p in a.net.params().items():
        assert numpy.array_equal(p.data, b.net.params()[n].data), n


# ----------------------------------------------------------------------------- failures
@pytest.mark.mnist
def test_a_diverging_run_stops_with_one_line_and_keeps_pruned_weights_zero(dense, tmp_path, recwarn):
    sched = Schedule.from_dict({"retrain": {"epochs": 2, "lr": 1e6, "lr_policy": "fixed"},
                                "rounds": [{"criterion": "percentile", "amount": 0.9}]})
    with pytest.raises(SparsenetError) as e:
        prune_run(dense, tmp_path / "r", sched, progress=False)
    msg = str(e.value)
    assert "diverged in round 1, epoch 1" in msg and str(tmp_path / "r" / "checkpoint.h5") in msg and "\n" not in msg
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    ck = load_checkpoint(tmp_path / "r" / "checkpoint.h5")  # the last good state: right after the prune
    assert ck.config["run"]["stage"] == "retrain" and ck.config["run"]["epoch"] == 0
    P.check_masks(ck.net)


@pytest.mark.mnist
def test_the_step_policy_steps_at_epoch_boundaries_of_a_subset(tmp_path):
    """step_epochs counts epochs of the data the run reads: 200 images at batch 64 are 4 batches an epoch, so
    the lr drops after iterations 4 and 8 (a log record's lr is the one the next epoch starts with)."""
    log = train(tmp_path / "run", TrainConfig(epochs=2, train_subset=200, step_epochs=1), progress=False)
    assert [r["iteration"] for r in log] == [4, 8]
    assert [r["lr"] for r in log] == pytest.approx([0.005, 0.0005])


@pytest.mark.mnist
def test_an_amount_that_would_empty_a_layer_is_refused_up_front_or_at_its_round(dense, tmp_path):
    """Round 1's q is checked on the network before anything is written; a later round's q depends on the
    weights the earlier rounds leave, so its prune refuses it, naming the round, with rounds before it saved."""
    fc3 = load_checkpoint(dense).net.params()["fc3.W"]
    w0 = fc3.data.ravel()
    w1 = w0[P.quality_mask(fc3.data, fc3.mask, 1.0).ravel() == 1]  # the survivors of q = 1
    lim0, lim1 = (numpy.abs(w).max() / w.std() for w in (w0, w1))  # the largest q that keeps one
    assert lim1 < lim0
    rounds = [{"criterion": "quality", "amount": {"fc3": q}} for q in (1.0, float(lim0 + lim1) / 2)]
    with pytest.raises(SparsenetError, match="prunes every weight of fc3") as e:
        prune_run(dense, tmp_path / "a", Schedule.from_dict({"rounds": [
            {"criterion": "quality", "amount": {"fc3": 1.01 * float(lim0)}}, rounds[0]]}), progress=False)
    assert not (tmp_path / "a").exists() and "\n" not in str(e.value)
    sched = Schedule.from_dict({"retrain": {"epochs": 0, "remove_neurons": False}, "rounds": rounds})
    with pytest.raises(SparsenetError, match="round 2: quality amount .* prunes every weight of fc3") as e:
        prune_run(dense, tmp_path / "b", sched, progress=False)
    assert str(tmp_path / "b" / "checkpoint.h5") in str(e.value)
    ck = load_checkpoint(tmp_path / "b" / "checkpoint.h5")
    assert (ck.config["run"]["round"], ck.config["run"]["stage"]) == (1, "prune")
    assert ck.net.params()["fc3.W"].nonzero() == w1.size


def test_a_failed_prune_command_leaves_no_files(tmp_path, capsys):
    from sparsenet.checkpoint import save_checkpoint
    from sparsenet.model import build_model

    save_checkpoint(tmp_path / "ck.h5", build_model("lenet-300-100"), config={"dataset": "mnist"})
    for extra in (["--amount", "fc7=0.5"], ["--amount", "1.5", "--criterion", "percentile"],
                  ["--schedule", '{"rounds": [{"criterion": "global", "amount": {"fc1": 0.5}}]}']):
        out = tmp_path / "new"
        assert cli.main(["prune", str(tmp_path / "ck.h5"), "--out", str(out), "--no-progress", *extra]) == 2
        assert not out.exists(), extra
        assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.mnist
def test_percentile_targets_are_fractions_of_the_original_layer(dense, tmp_path):
    """Round 2's target counts the weights that dead-neuron removal took away in round 1."""
    sched = Schedule.from_dict({"retrain": {"epochs": 0}, "rounds": [
        {"criterion": "percentile", "amount": {"fc1": 0.97, "default": 0.0}},
        {"criterion": "percentile", "amount": {"fc1": 0.98, "default": 0.0}}]})
    log = prune_run(dense, tmp_path / "r", sched, progress=False)
    rounds = [r for r in log if r["event"] == "round"]
    assert log[-1]["shapes"]["fc1.W"][0] < 300  # removal shrank fc1
    net = load_checkpoint(tmp_path / "r" / "checkpoint.h5").net
    assert net.params()["fc1.W"].nonzero() == round(0.02 * 300 * 784)
    assert rounds[-1]["density"]["fc1"] == pytest.approx(0.02, abs=1e-5)
    shrunk = P.prune(net, "percentile", {"fc1": 0.99}, relative_to="current")["fc1.W"]
    assert shrunk[1] == round(0.01 * net.params()["fc1.W"].size)


def test_progress_bar_only_on_a_terminal(monkeypatch):
    """A piped or redirected stderr gets no tqdm bar (its carriage returns would fill the log)."""
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress_bar(10, "epoch 1") is None
    monkeypatch.setattr(sys, "stderr", Terminal())
    pytest.importorskip("tqdm")
    bar = progress_bar(10, "epoch 1")
    assert bar is not None and progress_bar(10, "epoch 1", enabled=False) is None
    bar.close()


def test_time_left_reads_as_a_person_says_it():
    assert [eta(s) for s in (0.2, 40, 89, 180, 5000, 9000)] == ["~1 s", "~40 s", "~89 s", "~3 min", "~83 min", "~2.5 h"]


@needs_mnist
def test_epoch_lines_say_how_much_is_left(tmp_path, capsys):
    train(tmp_path / "run", TrainConfig(epochs=3, train_subset=500), progress=True)
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("epoch")]
    assert len(lines) == 3 and "[1/3 epochs, ~" in lines[0] and "[2/3 epochs, ~" in lines[1]
    assert lines[0].endswith(" left]") and "left" not in lines[2]  # the last one has nothing left
