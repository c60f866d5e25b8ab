"""End-to-end training on small slices of real MNIST (skipped when MNIST is absent)."""
import json

import numpy as np
import pytest

from sparsenet.checkpoint import load_checkpoint
from sparsenet.train import TrainConfig, evaluate, train
from sparsenet.util import SparsenetError

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
        assert np.array_equal(a.velocity[name], b.velocity[name]), name
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
