"""§3.4 iterative pruning: rounds of prune → retrain, logged, checkpointed, resumable.

A schedule is a list of rounds. Each round prunes with one criterion
(:func:`sparsenet.pruning.prune`), adjusts dropout (§3.2), retrains the surviving weights
for a few epochs with its own optimiser settings (§3.1: L2 ``weight_decay`` and/or
``l1``; §3.3: ``freeze`` some layers), and optionally removes dead neurons (§3.5).
As a JSON/TOML document::

    {"seed": 0,
     "retrain": {"epochs": 4, "lr": 0.01, ...},           # defaults for every round
     "rounds": [{"criterion": "quality", "amount": 1.0},
                {"criterion": "percentile", "amount": {"default": 0.9, "fc3": 0.7},
                 "epochs": 8, "freeze": ["fc3"]}]}

A run directory (``sparsenet prune CHECKPOINT --out RUN_DIR``) holds ``schedule.json``,
``log.jsonl`` (one record per event: ``start``, ``prune``, ``epoch``, ``round``) and
``checkpoint.h5``, rewritten atomically after every prune and every epoch; the
checkpoint's config records the round, the stage and the epoch reached, so ``--resume``
continues exactly there (bit-identically on CPU).
"""
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy

from . import pruning
from .backend import array_module
from .checkpoint import load_checkpoint, save_checkpoint
from .optim import POLICIES, SGD
from .train import DEFAULT_GAMMA, _progress_bar, _read_log, load_split, reuse_heap_memory, train_epoch
from .util import SparsenetError, write_text_atomic

# Retraining defaults, chosen by experiment on LeNet-300-100 (README, "Pruning").
RETRAIN_DEFAULTS = {
    "epochs": 4, "lr": 0.02, "lr_policy": "step", "gamma": None, "power": 0.75, "step_size": 1876,
    "momentum": 0.9, "weight_decay": 5e-4, "l1": 0.0, "batch_size": 64,
    "freeze": [], "remove_neurons": True,
}
ROUND_KEYS = {"criterion", "amount"} | set(RETRAIN_DEFAULTS)


@dataclasses.dataclass
class Schedule:
    """Fully resolved rounds (every key of :data:`ROUND_KEYS` set) and the shuffling seed."""

    rounds: list
    seed: int = 0

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise SparsenetError("a pruning schedule must be a JSON/TOML object with a 'rounds' list")
        unknown = set(d) - {"seed", "retrain", "rounds"}
        if unknown:
            raise SparsenetError(f"unknown schedule keys: {', '.join(sorted(unknown))}")
        base = dict(RETRAIN_DEFAULTS)
        retrain = d.get("retrain", {})
        if not isinstance(retrain, dict) or set(retrain) - set(RETRAIN_DEFAULTS):
            bad = sorted(set(retrain) - set(RETRAIN_DEFAULTS)) if isinstance(retrain, dict) else retrain
            raise SparsenetError(f"unknown retraining settings in schedule: {bad}")
        base.update(retrain)
        rounds = d.get("rounds")
        if not isinstance(rounds, list) or not rounds:
            raise SparsenetError("a pruning schedule needs a non-empty 'rounds' list")
        out = []
        for i, r in enumerate(rounds, 1):
            if not isinstance(r, dict):
                raise SparsenetError(f"round {i} of the schedule is not an object")
            if set(r) - ROUND_KEYS:
                raise SparsenetError(f"round {i}: unknown keys {', '.join(sorted(set(r) - ROUND_KEYS))}")
            out.append(_check_round({"criterion": "quality", "amount": 1.0, **base, **r}, i))
        seed = d.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise SparsenetError(f"schedule seed must be an integer, got {seed!r}")
        return cls(out, seed)

    def to_dict(self):
        return {"seed": self.seed, "rounds": self.rounds}


def _check_round(r, i):
    if r["criterion"] not in pruning.CRITERIA:
        raise SparsenetError(f"round {i}: unknown criterion {r['criterion']!r} (choose from {', '.join(pruning.CRITERIA)})")
    if r["lr_policy"] not in POLICIES:
        raise SparsenetError(f"round {i}: unknown lr_policy {r['lr_policy']!r} (choose from {', '.join(POLICIES)})")
    for key in ("epochs", "batch_size", "step_size"):
        if not isinstance(r[key], int) or isinstance(r[key], bool) or r[key] < (0 if key == "epochs" else 1):
            raise SparsenetError(f"round {i}: {key} must be a whole number >= {0 if key == 'epochs' else 1}, got {r[key]!r}")
    for key in ("lr", "momentum", "weight_decay", "l1", "power"):
        if isinstance(r[key], bool) or not isinstance(r[key], (int, float)) or not r[key] >= 0:
            raise SparsenetError(f"round {i}: {key} must be a number >= 0, got {r[key]!r}")
    if not isinstance(r["freeze"], list) or not all(isinstance(n, str) for n in r["freeze"]):
        raise SparsenetError(f"round {i}: freeze must be a list of layer names")
    if not isinstance(r["remove_neurons"], bool):
        raise SparsenetError(f"round {i}: remove_neurons must be true or false")
    return r


def load_schedule(text_or_path):
    """A schedule from a .json/.toml file or from an inline JSON object."""
    s = str(text_or_path).strip()
    if s.startswith("{"):
        try:
            return Schedule.from_dict(json.loads(s))
        except ValueError as e:
            raise SparsenetError(f"inline schedule is not valid JSON: {e}") from None
    path = Path(s)
    if not path.is_file():
        raise SparsenetError(f"{path}: no such schedule file")
    try:
        if path.suffix == ".toml":
            import tomllib

            d = tomllib.loads(path.read_text())
        else:
            d = json.loads(path.read_text())
    except ValueError as e:  # json and tomllib errors are ValueErrors
        raise SparsenetError(f"{path}: cannot parse schedule: {e}") from None
    return Schedule.from_dict(d)


def uniform_schedule(criterion="quality", amount=1.0, rounds=1, seed=0, **retrain):
    """``rounds`` rounds reaching ``amount`` step by step.

    quality: the same q every round (each round re-thresholds the survivors).
    percentile/global: the kept fraction shrinks geometrically, round r of R keeping
    ``(1 − amount)^(r/R)`` — equal ratios per round, the final round hitting the target.
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise SparsenetError(f"rounds must be >= 1, got {rounds}")

    def at(r, a):
        if criterion == "quality" or not isinstance(a, (int, float)) or not 0 <= a <= 1:
            return a  # invalid values are reported by the pruning code with the layer name
        return 1.0 - (1.0 - a) ** (r / rounds)

    plan = []
    for r in range(1, rounds + 1):
        a = {k: at(r, v) for k, v in amount.items()} if isinstance(amount, dict) else at(r, amount)
        plan.append({"criterion": criterion, "amount": a})
    return Schedule.from_dict({"seed": seed, "retrain": retrain, "rounds": plan})


# ----------------------------------------------------------------------------- the run
def _layer_table(net):
    return {k: round(v, 6) for k, v in pruning.densities(net).items()}


def _totals(net):
    params = sum(o["params"] for o in net.origin.values())
    weights = sum(o["weights"] for o in net.origin.values())
    nz = net.count_nonzero()
    nz_w = sum(l.params["W"].nonzero() for l in net.layers if "W" in l.params)
    return {"params": params, "nonzero_params": nz, "compression": round(params / max(nz, 1), 3),
            "weights_left": round(nz_w / weights, 6)}


def _optimizer(net, r):
    gamma = DEFAULT_GAMMA[r["lr_policy"]] if r["gamma"] is None else r["gamma"]
    return SGD(net.params(), lr=r["lr"], momentum=r["momentum"], weight_decay=r["weight_decay"], l1=r["l1"],
               policy=r["lr_policy"], gamma=gamma, power=r["power"], step_size=r["step_size"])


def prune_run(source, run_dir, schedule=None, resume=False, data_dir=None, device=None, progress=True):
    """Run (or resume) an iterative prune/retrain schedule; returns the log records.

    ``source`` is a trained checkpoint (ignored on resume: the run's own checkpoint
    holds everything). The training data (dataset, subset) follow the source's config.
    """
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.h5"
    xp = array_module(device)
    reuse_heap_memory()
    if resume:
        ck = load_checkpoint(ckpt_path, xp)
        state = ck.config.get("prune")
        if not isinstance(state, dict):
            raise SparsenetError(f"{ckpt_path}: not a pruning run (no 'prune' state in its config)")
        schedule = Schedule.from_dict(state["schedule"])
        log = _read_log(run_dir / "log.jsonl")[:state["log_length"]]
        rng = numpy.random.default_rng()
        rng.bit_generator.state = ck.rng_state
    else:
        if ckpt_path.exists():
            raise SparsenetError(f"{run_dir} already holds a pruning run; continue it with --resume or choose another --out")
        ck = load_checkpoint(source, xp)
        schedule = schedule or uniform_schedule()
        state = {"round": 0, "stage": "prune", "epoch": 0, "iteration": 0, "source": str(source),
                 "schedule": schedule.to_dict(), "log_length": 0}
        rng = numpy.random.default_rng(schedule.seed)
        log = []
    net, velocity = ck.net, ck.velocity or {}
    base_config = {k: v for k, v in ck.config.items() if k != "prune"}
    for i, r in enumerate(schedule.rounds, 1):  # check layer names now, not at round 5
        if r["criterion"] != "global":
            pruning.layer_amounts(net, r["amount"])
        net.freeze(r["freeze"])
    net.freeze(())
    splits = load_split(base_config.get("dataset", "mnist"), net.input_shape, xp, data_dir,
                        base_config.get("train_subset", 0))
    (x, t), (xt, tt) = splits["train"], splits["test"]

    def record(rec):
        log.append(rec)
        if progress:
            print(_describe(rec), file=sys.stderr)

    def save(opt):
        state["log_length"] = len(log)
        save_checkpoint(ckpt_path, net, opt, rng, state["epoch"], {**base_config, "prune": state})
        write_text_atomic(run_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in log))

    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "schedule.json", json.dumps(schedule.to_dict(), indent=2) + "\n")
        record({"event": "start", "source": str(source), "test_error": net.error(xt, tt),
                "density": _layer_table(net), **_totals(net)})
    while state["round"] < len(schedule.rounds):
        k, r = state["round"], schedule.rounds[state["round"]]
        opt = _optimizer(net, r)  # momentum carries over from the previous round (or training)
        opt.iteration = state["iteration"]
        opt.velocity.update({n: v for n, v in velocity.items() if n in opt.velocity})
        velocity = opt.velocity
        if state["stage"] == "prune":
            t0 = time.perf_counter()
            pruning.prune(net, r["criterion"], r["amount"], velocity)
            rates = pruning.adjust_dropout(net)
            record({"event": "prune", "round": k + 1, "criterion": r["criterion"], "amount": r["amount"],
                    "density": _layer_table(net), **_totals(net), "dropout": rates,
                    "test_error": net.error(xt, tt), "seconds": round(time.perf_counter() - t0, 3)})
            state.update(stage="retrain", epoch=0, iteration=0)
            save(opt)
        net.freeze(r["freeze"])
        n_batches = -(-len(x) // r["batch_size"])
        while state["epoch"] < r["epochs"]:
            e, t0 = state["epoch"], time.perf_counter()
            bar = _progress_bar(n_batches, f"round {k + 1}/{len(schedule.rounds)} epoch {e + 1}/{r['epochs']}", progress)
            try:
                loss, train_err = train_epoch(net, opt, x, t, r["batch_size"], rng, bar)
            finally:
                if bar is not None:
                    bar.close()
            if not numpy.isfinite(loss):
                raise SparsenetError(f"retraining diverged in round {k + 1} (loss {loss}); lower the retraining lr")
            record({"event": "epoch", "round": k + 1, "epoch": e + 1, "lr": opt.current_lr(), "loss": loss,
                    "train_error": train_err, "test_error": net.error(xt, tt),
                    "seconds": round(time.perf_counter() - t0, 3)})
            state.update(epoch=e + 1, iteration=opt.iteration)
            save(opt)
        net.freeze(())
        removed = pruning.remove_dead_neurons(net, velocity) if r["remove_neurons"] else {}
        seconds = sum(rec.get("seconds", 0) for rec in log if rec.get("round") == k + 1)
        record({"event": "round", "round": k + 1, "density": _layer_table(net), **_totals(net),
                "removed_neurons": removed, "shapes": {n: list(p.data.shape) for n, p in net.params().items()},
                "test_error": net.error(xt, tt), "seconds": round(seconds, 3)})
        state.update(round=k + 1, stage="prune", epoch=0, iteration=0)
        save(opt)
    return log


def _describe(rec):
    ev = rec["event"]
    err = f"test err {100 * rec['test_error']:.2f}%"
    if ev == "epoch":
        return (f"round {rec['round']} epoch {rec['epoch']}: loss {rec['loss']:.4f}  {err}  {rec['seconds']:.1f}s")
    dens = "  ".join(f"{k} {100 * v:.1f}%" for k, v in rec["density"].items())
    head = {"start": "start", "prune": f"round {rec.get('round')} pruned", "round": f"round {rec.get('round')} done"}[ev]
    return f"{head}: {err}  weights left: {dens}  ({rec['compression']:.1f}x)"
