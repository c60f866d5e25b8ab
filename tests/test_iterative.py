"""§3.4 iterative pruning runs: schedules, logs, checkpoints, resume, CLI — on real MNIST slices."""
import json

import numpy
import pytest

from sparsenet import cli, iterative
from sparsenet import pruning as P
from sparsenet.checkpoint import load_checkpoint
from sparsenet.iterative import Schedule, load_schedule, prune_run, uniform_schedule
from sparsenet.train import TrainConfig, train
from sparsenet.util import SparsenetError


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
    assert s.rounds[2]["weight_decay"] == iterative.RETRAIN_DEFAULTS["weight_decay"]
    assert Schedule.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("bad, message", [
    ({"rounds": []}, "non-empty 'rounds'"),
    ({"rounds": [{"criterion": "magic"}]}, "unknown criterion"),
    ({"rounds": [{"epochs": -1}]}, "epochs must be a whole number"),
    ({"rounds": [{"lr": "fast"}]}, "lr must be a number"),
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
    P.check_masks(ck.net, ck.velocity)
    assert ck.net.count_nonzero() == rounds[-1]["nonzero_params"]
    assert ck.config["prune"]["round"] == 3 and ck.config["dataset"] == "mnist"
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


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def straight(dense, tmp_path_factory):
    """The SMALL schedule run without interruption: (log, checkpoint path)."""
    run = tmp_path_factory.mktemp("straight")
    return prune_run(dense, run, Schedule.from_dict(SMALL), progress=False), run / "checkpoint.h5"


@pytest.mark.mnist
@pytest.mark.parametrize("kill_at", [1, 3, 5])  # round 1 right after its prune, round 2 (frozen fc1), round 3
def test_a_killed_run_resumes_bit_identically(dense, straight, tmp_path, monkeypatch, kill_at):
    real, calls = iterative.train_epoch, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == kill_at:
            raise Killed
        return real(*a, **k)

    monkeypatch.setattr(iterative, "train_epoch", dying)
    with pytest.raises(Killed):
        prune_run(dense, tmp_path / "b", Schedule.from_dict(SMALL), progress=False)
    monkeypatch.setattr(iterative, "train_epoch", real)
    resumed = prune_run(None, tmp_path / "b", resume=True, progress=False)
    strip = lambda log: [{k: v for k, v in r.items() if k != "seconds"} for r in log]  # noqa: E731
    assert strip(resumed) == strip(straight[0])
    a, b = load_checkpoint(straight[1]), load_checkpoint(tmp_path / "b" / "checkpoint.h5")
    for n, p in a.net.params().items():
        q = b.net.params()[n]
        assert numpy.array_equal(p.data, q.data) and numpy.array_equal(p.mask, q.mask), n
        assert numpy.array_equal(a.velocity[n], b.velocity[n]), n


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
