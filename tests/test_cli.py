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
