"""The command line as a user runs it: exit codes, one-line errors, JSON output."""
import json
import os
import subprocess
import sys

import pytest


def run(*args, env=None):
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "sparsenet", *args], capture_output=True, text=True, env=e,
                          timeout=300)


def test_summary_json():
    r = run("summary", "--model", "lenet-5", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["params"] == 431080 and d["nonzero_params"] == 431080
    assert [row["name"] for row in d["layers"] if row["params"]] == ["conv1", "conv2", "fc1", "fc2"]


def test_summary_table():
    r = run("summary", "--model", "lenet-300-100")
    assert r.returncode == 0 and "266,610" in r.stdout


@pytest.mark.parametrize("args, needle", [
    (("eval", "missing.h5"), "no such checkpoint"),
    (("summary",), "CHECKPOINT or --model"),
    (("train", "--out", "{tmp}", "--device", "gpu", "--epochs", "1"), "gpu"),
    (("train", "--out", "{tmp}", "--epochs", "0"), "epochs"),
])
def test_errors_are_one_line(args, needle, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path / "run")) for a in args]
    r = run(*args, env={"SPARSENET_DATA": str(tmp_path / "nodata")})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("sparsenet: error:") and needle in lines[0], r.stderr


def test_missing_data_says_where_to_put_it(tmp_path):
    r = run("train", "--out", str(tmp_path / "run"), "--epochs", "1", "--data-dir", str(tmp_path / "empty"),
            env={"SPARSENET_OFFLINE": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "SPARSENET_DATA" in r.stderr and str(tmp_path / "empty") in r.stderr
    assert "downloads are disabled" in r.stderr


@pytest.mark.mnist
def test_train_then_eval_json(tmp_path):
    out = tmp_path / "run"
    r = run("train", "--model", "lenet-300-100", "--out", str(out), "--epochs", "2", "--train-subset", "4000",
            "--no-progress")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.h5", "config.json", "log.jsonl"]
    r = run("eval", str(out / "checkpoint.h5"), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert 0.0 < d["test_error"] < 0.25 and d["params"] == 266610 and d["nonzero_params"] == 266610
    r = run("summary", str(out / "checkpoint.h5"), "--json")
    assert json.loads(r.stdout)["params"] == 266610


def _one_line_error(r, needle=""):
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("sparsenet: error:") and needle in lines[0], r.stderr


@pytest.mark.parametrize("args", [("train",), ("train", "--out", "x", "--lr", "fast"), ("nonsense",),
                                  ("prune", "--criterion", "magic", "--out", "x")])
def test_argument_errors_are_one_line(args):
    _one_line_error(run(*args))


def test_version():
    from sparsenet import __version__

    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"sparsenet {__version__}"


def test_eval_of_a_run_folder_points_at_its_checkpoint(tmp_path):
    _one_line_error(run("eval", str(tmp_path)), str(tmp_path / "checkpoint.h5"))


BAD_NETWORKS = {
    "image input to an MLP": lambda s: s.update(input_shape=[28, 28, 1]),
    "sizes that do not chain": lambda s: s["layers"][2].update(n_in=7),
    "a layer of 1e8 x 1e8": lambda s: (s.update(input_shape=[10**8]), s["layers"][0].update(n_in=10**8, n_out=10**8)),
    "no layers": lambda s: s["layers"].clear(),
}


@pytest.mark.parametrize("fault", sorted(BAD_NETWORKS))
def test_a_checkpoint_that_is_wrong_as_a_network_is_one_line_everywhere(fault, tmp_path):
    """Its arrays may be self-consistent; every command refuses it in one line and writes nothing."""
    import h5py

    from sparsenet.checkpoint import save_checkpoint
    from sparsenet.model import build_network

    spec = {"name": "tiny", "input_shape": [784], "layers": [
        {"kind": "linear", "name": "fc1", "n_in": 784, "n_out": 5}, {"kind": "relu", "name": "r"},
        {"kind": "linear", "name": "fc2", "n_in": 5, "n_out": 10}]}
    ck = tmp_path / "ck.h5"
    save_checkpoint(ck, build_network(spec), config={"dataset": "mnist"})
    BAD_NETWORKS[fault](spec)
    with h5py.File(ck, "r+") as f:
        f.attrs["network"] = json.dumps(spec)
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in (("eval", ck), ("summary", ck), ("report", ck), ("sensitivity", ck), ("predict", ck),
                 ("export", ck, tmp_path / "m.h5"), ("export", ck, "--report"), ("prune", ck, "--out", tmp_path / "p")):
        _one_line_error(run(*map(str, args)))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_export_refuses_to_overwrite(tmp_path):
    from sparsenet.checkpoint import save_checkpoint
    from sparsenet.model import build_model

    save_checkpoint(tmp_path / "ck.h5", build_model("lenet-300-100"))
    (tmp_path / "m.h5").write_bytes(b"keep me")
    _one_line_error(run("export", str(tmp_path / "ck.h5"), str(tmp_path / "m.h5")), "--force")
    assert (tmp_path / "m.h5").read_bytes() == b"keep me"
    assert run("export", str(tmp_path / "ck.h5"), str(tmp_path / "m.h5"), "--force").returncode == 0
    assert (tmp_path / "m.h5").read_bytes() != b"keep me"


def test_threads_option_and_default(tmp_path):
    """BLAS runs on one thread unless asked (busy machines); a bad count is one line."""
    from sparsenet.backend import blas_info, set_threads

    assert set_threads() == 1 and "1 threads" in blas_info()
    assert set_threads(2) == 2 and "2 threads" in blas_info()
    set_threads(1)
    _one_line_error(run("eval", "x.h5", "--threads", "0"), "threads must be")
    _one_line_error(run("eval", "x.h5", env={"SPARSENET_THREADS": "many"}), "threads must be")


@pytest.mark.mnist
def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path):
    """Piped into a log, training prints one line per epoch and no progress bar (no carriage returns)."""
    r = run("train", "--out", str(tmp_path / "run"), "--epochs", "1", "--train-subset", "500")
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and any(l.startswith("epoch 1: loss ") for l in r.stderr.splitlines()), r.stderr


@pytest.mark.mnist
def test_report_and_sensitivity_follow_the_same_overwrite_policy(tmp_path):
    from sparsenet.checkpoint import save_checkpoint
    from sparsenet.model import build_model

    save_checkpoint(tmp_path / "ck.h5", build_model("lenet-300-100"), config={"dataset": "mnist"})
    for cmd, extra, name in (("report", (), "report.json"), ("sensitivity", ("--ratios", "0,0.5"), "sensitivity.json")):
        assert run(cmd, str(tmp_path / "ck.h5"), *extra).returncode == 0
        before = (tmp_path / name).read_bytes()
        _one_line_error(run(cmd, str(tmp_path / "ck.h5"), *extra), "--force")
        assert (tmp_path / name).read_bytes() == before
        assert run(cmd, str(tmp_path / "ck.h5"), *extra, "--force").returncode == 0


@pytest.mark.parametrize("args, named", [
    (("prune", "{ck}", "--schedule", '{"rounds": [{"amount": 0.5}]}', "--criterion", "quality", "--epochs", "0"),
     "--criterion, --epochs"),
    (("prune", "--resume", "--lr", "0.1", "--epochs", "3"), "--lr, --epochs"),
    (("prune", "{ck}", "--resume", "--step-size", "10"), "CHECKPOINT, --step-size"),
    (("quantise", "--resume", "--bits", "4"), "--bits"),
    (("train", "--resume", "--epochs", "5", "--seed", "1", "--lr-policy", "inv"), "--seed, --lr-policy"),
])
def test_options_that_would_be_ignored_are_refused(args, named, tmp_path, capsys):
    """With --schedule, or when resuming (train: all but --epochs), run settings on the command line would not
    be used: one line names them, before anything is read or written."""
    from sparsenet import cli

    out = tmp_path / "run"
    args = [a.replace("{ck}", str(tmp_path / "ck.h5")) for a in args]
    assert cli.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"sparsenet: error: {named}: not used with "), err
    assert not out.exists()


@pytest.mark.mnist
def test_eval_says_what_the_checkpoint_holds(tmp_path, capsys):
    """Not "epoch 0" for a pruned checkpoint: the position of the run that wrote it."""
    from sparsenet import cli

    dense, pruned = tmp_path / "dense", tmp_path / "pruned"
    assert cli.main(["train", "--out", str(dense), "--epochs", "2", "--train-subset", "300", "--no-progress"]) == 0
    assert cli.main(["prune", str(dense / "checkpoint.h5"), "--out", str(pruned), "--rounds", "2", "--epochs", "0",
                     "--criterion", "percentile", "--amount", "0.5", "--no-progress"]) == 0
    capsys.readouterr()
    for run_dir, what in ((dense, "dense training run, finished (2 epochs)"),
                          (pruned, "pruning run, finished (2 rounds)")):
        assert cli.main(["eval", str(run_dir / "checkpoint.h5")]) == 0
        assert f"lenet-300-100, {what}  test error" in capsys.readouterr().out
    assert cli.main(["eval", str(pruned / "checkpoint.h5"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run"] == "pruning run, finished (2 rounds)"
