"""Studies over seeds: ``sparsenet sweep SPEC`` runs pruning methods × target densities × seeds on Dask.

A SPEC (JSON or TOML; docs/sweeps.md) names a base experiment and the axes of the study::

    name = "lenet-300-100-seeds"
    seeds = 5                                    # 0..4, or a list [0, 3, 7]
    methods = ["han", "one-shot", "global", "random"]   # sparsenet.methods.METHODS
    densities = [0.5, 0.2, 0.1, 0.05, 0.02]      # kept fractions of the prunable weights
    rounds = 3                                   # pruning rounds of the iterative methods
    epochs = 2                                   # retraining epochs per round
    [train]                                      # the dense runs: TrainConfig's fields but seed
    model = "lenet-300-100"                      # or a description file; or an axis: models = [...]
    dataset = "mnist"                            # or npz:FILE, folder:DIR; or an axis: datasets = [...]
    epochs = 20
    [retrain]                                    # optimiser settings of every retraining round
    lr = 0.02

It is validated whole before anything runs or is written (:func:`load_spec`), then becomes a task graph
(:func:`plan`): one dense training per (network, dataset, seed), and each (method, density) of that seed
from the checkpoint its method starts from (:attr:`sparsenet.methods.Method.start`). Every task is an
ordinary resumable run folder, ``OUT/tasks/<network>-<dataset>/seed-<s>/<method>-<density>`` (and
``…/dense``, ``…/l1-base``), and writes ``result.json`` there when it is done: a rerun skips finished
tasks, resumes interrupted ones from their checkpoints and retries failed ones.

Tasks run on Dask (:func:`sweep`): an embedded ``distributed.LocalCluster`` (one single-threaded worker
process per core), an existing cluster (``scheduler``, ``$SPARSENET_SCHEDULER``), or in this process
(``serial``). Every task runs with one BLAS thread and its own seeds, so its results are bit-identical
whichever way it ran (on the same kind of CPU and BLAS). A task that raises or diverges is recorded as
failed with its one-line reason; the tasks that need it are recorded as not run; the others go on.

Results: ``OUT/sweep.json`` (every task's record, and per (method, density) the mean, standard deviation
and 95% interval over seeds, paired comparisons, the paper's claims; :mod:`sparsenet.stats`),
``OUT/report.md`` and a figure per network and dataset (error against kept fraction with 95% bands).
"""
import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import os
import platform
import re
import sys
import time
import uuid
from pathlib import Path

from . import methods as M
from .backend import blas_info
from .data import parse_dataset
from .engine import RETRAIN_DEFAULTS, Schedule, TrainConfig
from .model import MODELS, check_spec, model_spec
from .optim import SETTINGS
from .pruning import densities as layer_densities
from .report import count, kept, md_table, pct
from .stats import ALPHA, describe, paired, verdict
from .util import SparsenetError, atomic_path, eta, progress_bar, whole, write_text_atomic

AXES = ("models", "datasets", "seeds", "methods", "densities")
SETTINGS_KEYS = ("train", "retrain", "rounds", "epochs", "quality", "l1", "l1_epochs")  # a rerun must keep them
SPEC_KEYS = {"name", "description", *SETTINGS_KEYS, *AXES}
RETRAIN_KEYS = (*SETTINGS, "batch_size")
MAX_SEEDS, MAX_ROUNDS, MAX_EPOCHS = 10_000, 1_000, 100_000  # typos (10**15) refused before anything is planned
IDENTITY = ("task", "method", "model", "dataset", "seed", "density")  # a task's record names its task
RECORD_KEYS = ("task", "method", "model", "dataset", "seed", "density", "layer", "ratio")  # a record's identity
DEFAULTS = {"rounds": 3, "epochs": RETRAIN_DEFAULTS["epochs"], "quality": {}, "l1": 5e-5}
HIGH_COMPRESSION = 0.1  # "high compression": kept fractions at or below this (else the smallest in the spec)
# The paper's claims, each "a beats b" (lower test error), and two comparisons beyond it.
CLAIMS = [
    ("iterative pruning beats one-shot pruning at high compression", "han", "one-shot", "high", True),
    ("L2 + retraining beats L1 + retraining", "l2-retrain", "l1-retrain", "all", True),
    ("L1 beats L2 without retraining", "l1-noretrain", "l2-noretrain", "all", True),
    ("keeping the trained weights beats re-initialising the survivors", "han", "reinit", "all", True),
    ("pruning by magnitude beats random pruning", "han", "random", "all", True),
    ("per-layer thresholds beat one global threshold", "han", "global", "all", False),
    ("keeping the trained weights beats rewinding them to their initial values", "han", "rewind", "all", False),
]


# ----------------------------------------------------------------------------- the spec
def load_spec(spec, base=None):
    """The spec checked whole and normalised: every key set, ``seeds`` a list, description files and data
    set paths absolute (relative ones against the spec file's folder, or ``base``).

    Parameters
    ----------
    spec : str, Path or dict
        A ``.json``/``.toml`` file, or the spec itself.

    Returns
    -------
    dict
        ``name``, ``description``, ``train`` (TrainConfig fields but model, dataset, seed), ``retrain``,
        ``rounds``, ``epochs``, ``quality``, ``l1``, ``l1_epochs``, ``models``, ``datasets``, ``seeds``,
        ``methods``, ``densities``. Raises :class:`SparsenetError` (one line) at the first problem.
    """
    where, name = "sweep spec", None
    if not isinstance(spec, dict):
        path = Path(spec)
        where, name, base = str(path), path.stem, path.parent
        if path.suffix.lower() not in (".json", ".toml"):
            raise SparsenetError(f"{path}: a sweep spec must be a .json or .toml file")
        if not path.is_file():
            raise SparsenetError(f"{path}: no such sweep spec")
        try:
            text = path.read_text()
            if path.suffix.lower() == ".toml":
                import tomllib

                spec = tomllib.loads(text)
            else:
                spec = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise SparsenetError(f"{path}: cannot parse the sweep spec: {e}") from None
        if not isinstance(spec, dict):
            raise SparsenetError(f"{path}: a sweep spec must be an object")
    try:
        return _normalise(dict(spec), name, base)
    except SparsenetError as e:
        raise SparsenetError(f"{where}: {e}") from None


def _normalise(s, name, base):
    unknown = set(s) - SPEC_KEYS
    if unknown:
        raise SparsenetError(f"unknown keys {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(SPEC_KEYS))})")
    for key in ("seeds", "methods", "densities"):
        if key not in s:
            raise SparsenetError(f"'{key}' is missing (the axes seeds, methods and densities are required)")
    out = {"name": s.get("name", name), "description": s.get("description", "")}
    if not isinstance(out["name"], str) or not re.fullmatch(r"[A-Za-z0-9._-]*[A-Za-z0-9_-][A-Za-z0-9._-]*",
                                                             out["name"] or ""):
        raise SparsenetError(f"name must be letters, digits, '.', '_' or '-' (not dots alone), got {out['name']!r}")
    if not isinstance(out["description"], str):
        raise SparsenetError(f"description must be a string, got {out['description']!r}")
    train = s.get("train", {})
    if not isinstance(train, dict):
        raise SparsenetError("'train' must be an object of training settings")
    if "seed" in train:
        raise SparsenetError("train.seed: the seeds are an axis of the sweep: give 'seeds'")
    for one, axis, default in (("model", "models", "lenet-300-100"), ("dataset", "datasets", "mnist")):
        if one in train and axis in s:
            raise SparsenetError(f"give the {one} once: train.{one} or '{axis}'")
        out[axis] = _axis(s, axis, [train.get(one, default)], lambda v: isinstance(v, str) and v)
    train = {k: v for k, v in train.items() if k not in ("model", "dataset")}
    configs = {}
    for model, dataset in itertools.product(out["models"], out["datasets"]):
        cfg = TrainConfig.from_dict({**train, "model": model, "dataset": dataset}, base=base)
        configs[cfg.model, cfg.dataset] = cfg
    out["models"] = list(dict.fromkeys(m for m, _ in configs))
    out["datasets"] = list(dict.fromkeys(d for _, d in configs))
    out["train"] = {k: v for k, v in dataclasses.asdict(next(iter(configs.values()))).items()
                    if k not in ("model", "dataset", "seed")}
    retrain = s.get("retrain", {})
    if not isinstance(retrain, dict) or set(retrain) - set(RETRAIN_KEYS):
        bad = sorted(set(retrain) - set(RETRAIN_KEYS)) if isinstance(retrain, dict) else retrain
        raise SparsenetError(f"retrain: unknown settings {bad} (allowed: {', '.join(RETRAIN_KEYS)}; the epochs of "
                             "a round are 'epochs')")
    Schedule.from_dict({"retrain": retrain, "rounds": [{"criterion": "percentile", "amount": 0.5}]})
    out["retrain"] = dict(retrain)
    out["rounds"] = whole(s.get("rounds", DEFAULTS["rounds"]), "rounds", 1)
    out["epochs"] = whole(s.get("epochs", DEFAULTS["epochs"]), "epochs", 0)
    if out["rounds"] > MAX_ROUNDS or out["epochs"] > MAX_EPOCHS:
        raise SparsenetError(f"rounds (at most {MAX_ROUNDS}) or epochs (at most {MAX_EPOCHS:,}) out of range: "
                             f"{out['rounds']}, {out['epochs']}")
    out["l1"] = _number(s.get("l1", DEFAULTS["l1"]), "l1")
    out["l1_epochs"] = whole(s.get("l1_epochs", out["epochs"]), "l1_epochs", 0)
    quality = s.get("quality", DEFAULTS["quality"])
    if not isinstance(quality, dict):
        raise SparsenetError("quality must be an object {layer: q} (and 'default')")
    for k, v in quality.items():
        if _number(v, f"quality.{k}") <= 0:
            raise SparsenetError(f"quality.{k} must be > 0, got {v!r}")
    out["quality"] = dict(quality)
    if isinstance(s["seeds"], int) and not isinstance(s["seeds"], bool) and whole(s["seeds"], "seeds", 1) > MAX_SEEDS:
        raise SparsenetError(f"seeds: {s['seeds']} seeds are more than {MAX_SEEDS:,}; give fewer")
    out["seeds"] = list(range(s["seeds"])) if isinstance(s["seeds"], int) and not isinstance(
        s["seeds"], bool) else _axis(s, "seeds", None, lambda v: whole(v, "a seed", 0) is v)
    out["methods"] = _axis(s, "methods", None, lambda v: isinstance(v, str) and v in M.METHODS,
                           f"choose from {', '.join(M.METHODS)}")
    out["densities"] = _axis(s, "densities", None, lambda v: not isinstance(v, bool) and isinstance(
        v, (int, float)) and 0 < v < 1, "kept fractions in (0, 1)")
    if len({f"{d:g}" for d in out["densities"]}) < len(out["densities"]):
        raise SparsenetError(f"densities: two of {out['densities']} share a folder name (6 significant digits)")
    for model in out["models"]:
        _check_feasible(model, out)
    labels = [_label(m, d) for m, d in configs]
    if len(set(labels)) < len(labels):
        raise SparsenetError(f"two networks or datasets share a folder name ({', '.join(labels)}); rename a file")
    return out


def _axis(s, key, default, ok, hint=""):
    """A non-empty list of distinct values passing ``ok``."""
    v = s.get(key, default)
    if not isinstance(v, list) or not v:
        raise SparsenetError(f"'{key}' must be a non-empty list")
    for x in v:
        if not ok(x):
            raise SparsenetError(f"{key}: {x!r} is not allowed" + (f" ({hint})" if hint else ""))
    if len(set(map(json.dumps, v))) < len(v):
        raise SparsenetError(f"{key}: a value is repeated")
    return list(v)


def _number(v, what):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise SparsenetError(f"{what} must be a finite number >= 0, got {v!r}")
    return float(v)


def _check_feasible(model, s):
    """Every density keeps a weight where the methods asked for prune: in every layer (the per-layer methods),
    overall (global); q names only prunable layers."""
    sizes = {k[:-2]: math.prod(v) for k, v in check_spec(model_spec(model)).items() if k.endswith(".W")}
    unknown = set(s["quality"]) - set(sizes) - {"default"}
    if unknown:
        raise SparsenetError(f"quality: {model} has no prunable layer {', '.join(sorted(unknown))} "
                             f"(prunable: {', '.join(sizes)})")
    low, uniform = min(s["densities"]), {"l1-noretrain", "l1-retrain", "l2-noretrain", "l2-retrain", "l2-iterative"}
    layer, n = min(sizes.items(), key=lambda kv: kv[1])
    if uniform & set(s["methods"]) and round(low * n) < 1:
        raise SparsenetError(f"density {low:g} keeps no weight of {model}'s layer {layer} ({n:,} weights) in "
                             f"{', '.join(sorted(uniform & set(s['methods'])))}; the smallest that keeps one is "
                             f"about {1 / n:.3g}")
    if "global" in s["methods"] and round(low * sum(sizes.values())) < 1:
        raise SparsenetError(f"density {low:g} keeps no weight of {model}")


def _label(model, dataset):
    """A folder name for a network and a data set: ``lenet-300-100-mnist``, ``net-digits`` (file stems)."""
    kind, path = parse_dataset(dataset)
    d = kind if path is None else f"{kind}-{path.stem or path.name}"
    m = model if model in MODELS else Path(model).stem
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{m}-{d}")


# ----------------------------------------------------------------------------- the task graph
def plan(spec):
    """The tasks of a normalised spec, each after the tasks it needs: dicts with ``task`` (its id, also its
    folder under ``tasks/``), ``method`` (``dense``, ``l1-base`` or a method), ``model``, ``dataset``,
    ``seed``, ``density`` (None for dense and l1-base), ``deps`` (ids) and ``weight`` (epochs + 1, for the
    time-left estimate). ``reinit``/``rewind`` add ``han`` at their densities, the L1 arms ``l1-base``."""
    wanted = list(spec["methods"])
    if {"reinit", "rewind"} & set(wanted) and "han" not in wanted:
        wanted.insert(0, "han")
    order = sorted(wanted, key=lambda m: M.METHODS[m].start != "dense")  # han before what starts from it
    t, R, E = spec["train"]["epochs"], spec["rounds"], spec["epochs"]
    weight = {"dense": t, "l1-base": spec["l1_epochs"], "reinit": t, "rewind": t, "l1-noretrain": 0,
              "l2-noretrain": 0}
    jobs = []
    for model, dataset, seed in itertools.product(spec["models"], spec["datasets"], spec["seeds"]):
        at = f"{_label(model, dataset)}/seed-{seed}"
        job = dict(model=model, dataset=dataset, seed=seed, density=None)
        jobs.append({**job, "task": f"{at}/dense", "method": "dense", "deps": [], "weight": t + 1})
        if any(M.METHODS[m].start == "l1-base" for m in order):
            jobs.append({**job, "task": f"{at}/l1-base", "method": "l1-base", "deps": [f"{at}/dense"],
                         "weight": weight["l1-base"] + 1})
        for d, m in itertools.product(spec["densities"], order):
            start = M.METHODS[m].start
            jobs.append({**job, "task": f"{at}/{m}-{d:g}", "method": m, "density": d,
                         "deps": [f"{at}/{start}" + (f"-{d:g}" if start == "han" else "")],
                         "weight": weight.get(m, R * E) + 1})
    return jobs


# ----------------------------------------------------------------------------- one task
def run_task(job, *deps):
    """Run (or resume, or find finished) one task of a sweep: in a Dask worker, or in this process.

    Parameters
    ----------
    job : dict
        A task of :func:`plan` with ``dir`` (its run folder, absolute), ``sources`` (the run folders of the
        tasks it needs), ``study`` (the spec's settings), ``data_dir``, ``device`` and ``threads`` (BLAS
        threads while it runs: 1).
    *deps : dict
        The records of the tasks it needs (:func:`plan`'s ``deps``).

    Returns
    -------
    dict
        The task's record: ``status`` ``"ok"`` with test_error, weights_left, layers (kept fraction per
        layer), compression, nonzero_params, params, epochs (its own), total_epochs (with the tasks it
        needed), seconds, resumed, blas, and for a pruned network ``dead_removed`` (:func:`_dead_removed`);
        or ``"failed"`` with a one-line ``reason``. It never raises (but KeyboardInterrupt); an ``ok`` record
        is also written to ``result.json`` in its run folder.
    """
    from threadpoolctl import threadpool_limits

    rec = {k: job[k] for k in ("task", "method", "model", "dataset", "seed", "density")}
    failed = [d["task"] for d in deps if d.get("status") != "ok"]
    if failed:
        return failed_record(job, f"not run: {failed[0]} failed")
    try:
        with threadpool_limits(job["threads"], user_api="blas"):
            rec.update(_run(job, deps), blas=blas_info())
    except Exception as e:  # a task that raises is recorded with its reason; the sweep goes on
        return failed_record(job, one_line(e))
    write_text_atomic(Path(job["dir"]) / "result.json", json.dumps(rec, indent=1) + "\n")
    return rec


def one_line(e):
    """An exception as one line: the message of a :class:`SparsenetError`, else ``Type: message``."""
    text = str(e).strip().splitlines()
    text = text[0] if text else ""
    return text if isinstance(e, SparsenetError) else f"{type(e).__name__}: {text}".rstrip(": ")


def _run(job, deps):
    """The engine run of ``job`` (new, resumed or finished) and its results."""
    from . import engine
    from .backend import array_module
    from .checkpoint import load_checkpoint

    d, kw = Path(job["dir"]), dict(data_dir=job["data_dir"], device=job["device"], progress=False)
    resumed = (d / "checkpoint.h5").exists()
    st = job["study"]
    study = M.Study(TrainConfig(**st["train"], model=job["model"], dataset=job["dataset"], seed=job["seed"]),
                    st["retrain"], st["rounds"], st["epochs"], st["quality"], st["l1"], st["l1_epochs"])
    source = str(Path(job["sources"][0]) / "checkpoint.h5") if deps else None
    t0 = time.perf_counter()
    if job["method"] == "dense":
        plan_ = M.Train(None, study.train)
    elif job["method"] == "l1-base":
        plan_ = M.l1_base(study, source)
    else:
        plan_ = M.METHODS[job["method"]].plan(study, source, job["density"], array_module(job["device"]))
    if isinstance(plan_, M.Prune):
        _same_settings(d / "schedule.json", plan_.schedule.to_dict())
        log = engine.prune_run(plan_.source, d, None if resumed else plan_.schedule, resume=resumed, expect="prune",
                               **kw)
    elif resumed:
        _same_settings(d / "config.json", dataclasses.asdict(plan_.config))
        log = engine.train(d, resume=True, **kw)
    elif plan_.net is None:
        log = engine.train(d, plan_.config, **kw)
    else:
        log = engine.run(d, plan_.config.schedule(), source=plan_.net, base_config=dataclasses.asdict(plan_.config),
                         **kw)
    ck = load_checkpoint(d / "checkpoint.h5", array_module(job["device"]))
    net = ck.net
    origin, nonzero = net.origin.values(), net.count_nonzero()
    params = sum(o["params"] for o in origin)
    epochs = sum(1 for r in log if r.get("event", "epoch") == "epoch" and "loss" in r)
    return {"status": "ok", "test_error": next(r["test_error"] for r in reversed(log) if "test_error" in r),
            "weights_left": round(sum(p.nonzero() for p in net.params().values() if p.prunable) /
                                  sum(o["weights"] for o in origin), 6),
            "layers": {k: round(v, 6) for k, v in layer_densities(net).items()},
            "compression": round(params / nonzero, 3),
            "nonzero_params": nonzero, "params": params, "epochs": epochs,
            "total_epochs": epochs + sum(x["total_epochs"] for x in deps),
            "seconds": round(sum(r.get("seconds", 0) for r in log if r.get("event") != "round"), 3),
            "run_seconds": round(time.perf_counter() - t0, 3), "resumed": resumed,
            **({} if job["density"] is None else {"dead_removed": _dead_removed(ck, job["data_dir"], params)})}


def _dead_removed(ck, data_dir, params):
    """§3.5 on the task's final network (loaded checkpoint ``ck``, changed in place): the methods keep dead
    neurons, a deployed network drops them (as ``sparsenet prune`` does), which changes no output. Returns
    ``{"units", "nonzero_params", "compression", "test_error"}``, the error measured again on the shrunk
    network."""
    from .data import open_splits
    from .engine import test_errors
    from .pruning import remove_dead_neurons

    units = remove_dead_neurons(ck.net)
    test = open_splits(ck.config, ck.net, ck.net.xp, data_dir, split="test")["test"]
    nonzero = ck.net.count_nonzero()
    return {"units": units, "nonzero_params": nonzero, "compression": round(params / nonzero, 3),
            "test_error": test_errors(ck.net, test)["test_error"]}


def _same_settings(path, want):
    """Refuse to resume a run folder started with other settings than the task's now (its config.json or
    schedule.json)."""
    if path.is_file() and json.loads(path.read_text()) != json.loads(json.dumps(want)):
        raise SparsenetError(f"{path.parent} was started with other settings than the spec now gives; delete it "
                             "to run the task again")


# ----------------------------------------------------------------------------- the sweep
def sweep(spec, out=None, *, scheduler=None, serial=False, workers=None, data_dir=None, device=None, progress=True,
          timeout=10.0):
    """Run (or resume) a study over seeds; returns what ``OUT/sweep.json`` holds, with ``out``.

    Parameters
    ----------
    spec : str, Path or dict
        The SPEC (:func:`load_spec`; docs/sweeps.md).
    out : str or Path, optional
        The sweep folder (default ``runs/<name>``). A rerun continues it; the settings (all but the axes)
        must be the ones it started with.
    scheduler : str or distributed.Client, optional
        A Dask scheduler's address (default ``$SPARSENET_SCHEDULER``), or a connected client: run there.
        Without one, an embedded ``LocalCluster`` of ``workers`` single-threaded processes (default: one per
        core, at most one per task) runs the tasks.
    serial : bool
        Run the tasks one after the other in this process (no Dask), with the same numbers.
    data_dir, device : optional
        As for :func:`sparsenet.engine.train`. Without ``data_dir`` a worker finds the data through its
        own ``$SPARSENET_DATA``.
    timeout : float
        Seconds to wait for the scheduler to answer.

    Nothing is written before the spec is valid and the cluster is reached.
    """
    spec = load_spec(spec)
    scheduler = engine_options(scheduler, serial, workers)
    out = Path(os.path.abspath(out if out is not None else Path("runs") / spec["name"]))  # "a/.." collapsed
    _check_out(out, spec)
    jobs = plan(spec)
    for job in jobs:
        job.update(dir=str(out / "tasks" / job["task"]), sources=[str(out / "tasks" / d) for d in job["deps"]],
                   study={k: spec[k] for k in SETTINGS_KEYS},
                   data_dir=None if data_dir is None else str(Path(data_dir).expanduser().absolute()),
                   device=device, threads=1)
    records = _finished(jobs)
    todo = [job for job in jobs if job["task"] not in records]
    t0 = time.perf_counter()
    say = _say("sweep", progress)
    with task_engine(scheduler, serial, workers, len(todo), timeout, say) as (client, where):
        make_folder(out)
        write_text_atomic(out / "spec.json", json.dumps(spec, indent=2) + "\n")
        say(f"{len(jobs)} tasks, {len(records)} done earlier, {len(todo)} to run"
            + (" in this process" if client is None and todo else ""))
        execute(client, todo, records, run_task, Progress(todo, len(jobs), len(records), progress))
    result = summarise(spec, [records[j["task"]] for j in jobs])
    result.update(out=str(out), seconds=round(time.perf_counter() - t0, 1), where=where, provenance=_provenance())
    figures = [f for f in (_plot(result, g, out / f"errors-{g['label']}.png") for g in result["groups"]) if f]
    result["figures"] = [Path(f).name for f in figures]  # beside sweep.json: the folder can move
    write_text_atomic(out / "sweep.json", json.dumps({k: v for k, v in result.items() if k != "out"}, indent=1)
                      + "\n")
    write_text_atomic(out / "report.md", format_report(result))
    failed = sum(r["status"] != "ok" for r in result["tasks"])
    say(f"wrote {out / 'report.md'}" + (f"; {failed} tasks failed (see the report)" if failed else ""))
    return result


def _check_out(out, spec):
    """``out`` is new, empty, or a sweep folder started with the same settings (read only; writes nothing)."""
    old = stored_study(out, "spec.json", "sweep folder")
    if old is not None:
        changed = [k for k in SETTINGS_KEYS if old.get(k) != json.loads(json.dumps(spec[k]))]
        if changed:
            raise SparsenetError(f"{out} holds a sweep with other settings ({', '.join(changed)}); only the axes "
                                 f"({', '.join(AXES)}) may change in a rerun: use another --out")


def stored_study(out, marker, what):
    """The JSON object in ``out/marker`` left by a study started there (None when ``out`` is new or empty); one
    line when ``out`` is a file, the marker is damaged, or ``out`` holds other things and no marker. Reads only."""
    if out.exists() and not out.is_dir():
        raise SparsenetError(f"{out}: not a folder")
    stored = out / marker
    if stored.is_file():
        try:
            old = json.loads(stored.read_text())
        except ValueError:
            old = None
        if not isinstance(old, dict):
            raise SparsenetError(f"{stored}: damaged (not a {what}'s {marker}); use another --out")
        return old
    if out.is_dir() and any(out.iterdir()):
        raise SparsenetError(f"{out} exists and is not a {what} (no {marker}); use another --out")
    return None


def _finished(jobs):
    """``{task: record}`` of the tasks finished earlier: an ``ok`` ``result.json`` in the task's folder. A
    finished task whose checkpoint is gone (a study committed with its results but not its run folders)
    counts as finished unless a task still to run starts from it: then it runs again, bit-identically, so a
    study can be finished in pieces."""
    records = {}
    for job in jobs:
        try:
            rec = json.loads((Path(job["dir"]) / "result.json").read_text())
        except (OSError, ValueError):
            continue
        if _valid_record(rec, job):
            records[job["task"]] = rec
    by_task = {job["task"]: job for job in jobs}
    while True:  # the sources of unfinished tasks need their checkpoints (a source of a source too)
        needed = {d for job in jobs if job["task"] not in records for d in job["deps"]}
        gone = [t for t in needed if t in records and not (Path(by_task[t]["dir"]) / "checkpoint.h5").is_file()]
        if not gone:
            return records
        for t in gone:
            del records[t]


def _valid_record(rec, job):
    """``rec`` (a ``result.json`` read back) is an ``ok`` record of exactly ``job`` (its identity: task,
    method, network, data set, seed, density) with every number the statistics read, finite."""
    if not isinstance(rec, dict) or rec.get("status") != "ok" or any(rec.get(k) != job[k] for k in IDENTITY):
        return False
    def finite(r, keys):
        return all(not isinstance(r.get(k), bool) and isinstance(r.get(k), (int, float)) and math.isfinite(r[k])
                   for k in keys)

    gone = rec.get("dead_removed", {})  # absent in the records of older versions
    return (finite(rec, ("test_error", "weights_left", "compression", "epochs", "total_epochs"))
            and isinstance(rec.get("layers"), dict) and isinstance(gone, dict)
            and (not gone or finite(gone, ("test_error", "compression"))))


def _connect(scheduler, workers, n_tasks, timeout, say):
    """A Dask client: the given one, one connected to ``scheduler`` (an address), or one of an embedded
    LocalCluster. Returns ``(client, cluster or None, where it runs in words)``; an unreachable scheduler
    is one line."""
    import logging
    import socket
    from importlib.util import find_spec

    from distributed import Client, LocalCluster

    cluster = None
    if isinstance(scheduler, Client):
        return scheduler, None, f"Dask, scheduler {scheduler.scheduler.address}"
    if scheduler is not None:
        try:  # asked who it is first: a Client that fails to start leaves noise behind at exit
            who = asyncio.run(_identity(str(scheduler), timeout))
        except Exception as e:  # OSError, TimeoutError, ValueError (address); anything from a non-Dask server
            raise SparsenetError(f"cannot reach the Dask scheduler at {scheduler} ({one_line(e)}); start one with "
                                 "`dask scheduler`, or run without --scheduler") from None
        if not isinstance(who, dict) or who.get("type") != "Scheduler":
            raise SparsenetError(f"{scheduler} is not a Dask scheduler (it answered {str(who)[:60]!r})")
        client = Client(scheduler, timeout=timeout, set_as_default=False)
        n = len(client.scheduler_info().get("workers", {}))
        say(f"connected to {scheduler} ({n} workers{'; tasks wait until one joins' if not n else ''})")
        where = f"Dask, scheduler {scheduler}"
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        n = workers or max(1, min(cores, n_tasks))
        with socket.socket() as s:  # the usual dashboard port when it is free, else any
            port = 8787 if s.connect_ex(("127.0.0.1", 8787)) else 0
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=f":{port}",
                               silence_logs=logging.CRITICAL)
        client = Client(cluster, set_as_default=False)
        where = f"Dask LocalCluster, {count(n, 'worker process')}"
        say(f"{where}, 1 thread each")
    if "dashboard" in client.scheduler_info().get("services", {}):
        say(f"dashboard: {client.dashboard_link}" + ("" if scheduler is not None or find_spec("bokeh") else
                                                     " (install bokeh>=3.1 to see it)"))
    return client, cluster, where


async def _identity(address, timeout):
    """What the Dask server at ``address`` says it is (``{"type": "Scheduler", …}``), within ``timeout`` s."""
    from distributed.comm import connect

    comm = await connect(address, timeout=timeout)
    try:
        await comm.write({"op": "identity", "reply": True})
        return await asyncio.wait_for(comm.read(), timeout)
    finally:
        comm.abort()


# ----------------------------------------------------------------------------- the engine (any task graph)
def engine_options(scheduler=None, serial=False, workers=None):
    """The scheduler to use (``scheduler``, else ``$SPARSENET_SCHEDULER`` unless ``serial``; None: the embedded
    cluster or this process), after checking the three options agree. Raises a one-line SparsenetError."""
    scheduler = scheduler if scheduler is not None or serial else os.environ.get("SPARSENET_SCHEDULER") or None
    if serial and scheduler is not None:
        raise SparsenetError("--serial runs in this process: give no --scheduler")
    if workers is not None and (serial or scheduler is not None):
        raise SparsenetError("--workers sizes the embedded cluster: not with --serial or --scheduler")
    if workers is not None:
        whole(workers, "workers", 1)
    return scheduler


@contextlib.contextmanager
def task_engine(scheduler, serial, workers, n_tasks, timeout=10.0, say=lambda text: None):
    """Where :func:`execute` runs tasks: ``(client, where)``, the client None for this process (``serial``, or
    nothing to run). A Dask client is connected (:func:`_connect`) before the body runs, so an unreachable
    scheduler is one line before anything is written, and closed (with an embedded cluster) after it."""
    if serial or not n_tasks:
        yield None, "serial" if n_tasks else "nothing to run"
        return
    client, cluster, where = _connect(scheduler, workers, n_tasks, timeout, say)
    try:
        yield client, where
    finally:
        if client is not None and scheduler is not client:
            client.close()
        if cluster is not None:
            cluster.close()


def execute(client, todo, records, fn, bar):
    """Run the tasks ``todo`` (dicts with ``task``, ``deps``, ``weight``; each after the tasks it needs) as
    ``fn(job, *records of its deps)``, in this process (``client`` None) or on Dask; each record goes into
    ``records[task]`` as it comes back. ``fn`` must return a record (never raise); a task Dask could not run
    (a worker lost too often) gets a failed record with its reason."""
    if client is None:
        for job in todo:
            records[job["task"]] = bar.done(job, fn(job, *(records[d] for d in job["deps"])))
    else:
        _on_dask(client, todo, records, fn, bar)
    bar.close()


def failed_record(job, reason):
    """A failed task's record: its identifying fields (those of :data:`RECORD_KEYS` it has) and ``reason``."""
    return {**{k: job[k] for k in RECORD_KEYS if k in job}, "status": "failed", "reason": reason}


def make_folder(out):
    """``out`` and its parents, or a one-line error."""
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SparsenetError(f"{out}: cannot write there ({e.strerror or e})") from None


def _say(name, progress):
    return (lambda text: print(f"{name}: {text}", file=sys.stderr)) if progress else (lambda text: None)


def _on_dask(client, todo, records, fn, bar):
    """Submit ``todo`` (each after the tasks it needs) and collect the records as tasks finish."""
    from distributed import as_completed

    futures, jobs = {}, {}
    for job in todo:
        deps = [futures.get(d, records.get(d)) for d in job["deps"]]
        f = client.submit(fn, job, *deps, key=f"{job.get('method', 'task')}-{uuid.uuid4().hex[:8]}-{job['task']}",
                          pure=False)
        futures[job["task"]], jobs[f.key] = f, job
    try:
        for f in as_completed(list(futures.values()), loop=client.loop):
            job = jobs[f.key]
            try:
                rec = f.result()
            except Exception as e:  # a worker lost too often (KilledWorker), or the task could not start there
                failed = [d for d in job["deps"] if records.get(d, {}).get("status", "ok") != "ok"]
                rec = failed_record(job, f"not run: {failed[0]} failed" if failed else one_line(e))
            records[job["task"]] = bar.done(job, rec)
    except BaseException:
        client.cancel(list(futures.values()))
        raise


class Progress:
    """One progress line for the tasks on stderr: tasks done of all, failures, time left (from the weights
    (epochs) of the tasks done so far); a bar on a terminal."""

    def __init__(self, todo, total, done_before, enabled, name="sweep"):
        self.total, self.n, self.failed, self.enabled, self.name = total, done_before, 0, enabled, name
        self.left, self.worked, self.t0 = sum(j["weight"] for j in todo), 0, time.perf_counter()
        self.bar = progress_bar(len(todo), name, unit="task", enabled=enabled)

    def done(self, job, rec):
        self.n, self.failed = self.n + 1, self.failed + (rec["status"] != "ok")
        self.worked += job["weight"]
        left = (time.perf_counter() - self.t0) / self.worked * (self.left - self.worked)
        status = "ok" if rec["status"] == "ok" else f"failed: {rec['reason']}"
        text = f"{self.n}/{self.total} tasks done" + (f", {self.failed} failed" if self.failed else "") + (
            f", {eta(left)} left" if self.worked < self.left else "")
        if self.bar is not None:
            self.bar.set_postfix_str(text.split(", ", 1)[1] if ", " in text else "", refresh=False)
            self.bar.update(1)
        elif self.enabled:
            print(f"{self.name}: {text} ({job['task']}: {status})", file=sys.stderr)
        return rec

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _provenance():
    from . import __version__

    return {"sparsenet": __version__, "python": platform.python_version(), "machine": platform.machine(),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


# ----------------------------------------------------------------------------- statistics
def summarise(spec, records):
    """Statistics of a sweep's task ``records`` (:func:`run_task`), per network and data set ("group"):
    the dense error over seeds, per (method, density) the test error's :func:`~sparsenet.stats.describe`
    over the seeds that finished, the mean epochs and kept fraction, paired comparisons between every two
    methods at each density (by seed, :func:`~sparsenet.stats.paired`), the claims and the frontier.
    Returns ``{"name", "spec", "tasks", "groups"}``."""
    from .paper import TABLE1

    groups = []
    for model, dataset in itertools.product(spec["models"], spec["datasets"]):
        mine = [r for r in records if r["model"] == model and r["dataset"] == dataset]
        ok = [r for r in mine if r["status"] == "ok"]
        dense = {r["seed"]: r for r in ok if r["method"] == "dense"}
        methods = list(dict.fromkeys(r["method"] for r in mine if r["density"] is not None))
        err = {(r["method"], r["density"]): {} for r in mine if r["density"] is not None}
        for r in ok:
            if r["density"] is not None:
                err[r["method"], r["density"]][r["seed"]] = r
        rows = []
        for (m, d), by_seed in err.items():
            rs = list(by_seed.values())
            gone = [r.get("dead_removed") for r in rs]  # §3.5 (tasks of older versions lack it)
            after = {} if not rs or None in gone else {"dead_removed": {
                **describe([g["test_error"] for g in gone]), "compression": _mean([g["compression"] for g in gone])}}
            rows.append({"method": m, "density": d, **describe([r["test_error"] for r in rs]), **after,
                         "failed": sum(r["status"] != "ok" for r in mine if (r["method"], r["density"]) == (m, d)),
                         **{k: _mean([r[k] for r in rs]) for k in ("weights_left", "compression", "epochs",
                                                                    "total_epochs")}})
        pairs = []
        for d in spec["densities"]:
            for a, b in itertools.combinations(methods, 2):
                seeds = sorted(set(err.get((a, d), {})) & set(err.get((b, d), {})))
                if seeds:
                    pairs.append({"density": d, "a": a, "b": b, "seeds": seeds, **paired(
                        [err[a, d][s]["test_error"] for s in seeds], [err[b, d][s]["test_error"] for s in seeds])})
        dense_stats = {**describe([r["test_error"] for r in dense.values()]),
                       "epochs": _mean([r["epochs"] for r in dense.values()]),
                       "failed": sum(1 for r in mine if r["method"] == "dense" and r["status"] != "ok")}
        paper = TABLE1.get(model, {})
        baselines = {"sweep's dense mean": dense_stats["mean"]}
        if paper.get("dataset") == dataset:
            baselines["paper's dense error"] = paper["error_before"]
        groups.append({"label": _label(model, dataset), "model": model, "dataset": dataset, "dense": dense_stats,
                       "rows": rows, "paired": pairs, "claims": claims(pairs, spec["densities"]),
                       "frontier": frontier(rows, baselines)})
    return {"name": spec["name"], "spec": spec, "tasks": records, "groups": groups}


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def claims(pairs, densities):
    """One sentence per claim of :data:`CLAIMS`: whether "a beats b" holds over the densities it is about
    (``high``: kept fractions ≤ :data:`HIGH_COMPRESSION`, else the smallest), from the paired comparisons."""
    high = [d for d in densities if d <= HIGH_COMPRESSION] or [min(densities)]
    out = []
    for text, a, b, which, in_paper in CLAIMS:
        ds, head = high if which == "high" else densities, text[0].upper() + text[1:]
        cs = [c for c in pairs if c["density"] in ds and {c["a"], c["b"]} == {a, b}]
        cs = [c if c["a"] == a else {**c, "a": a, "b": b, "mean_diff": -c["mean_diff"], "t": c["t"] and -c["t"],
                                     "ci": c["ci"] and [-c["ci"][1], -c["ci"][0]]} for c in cs]
        if not cs:
            out.append({"claim": text, "a": a, "b": b, "paper": in_paper, "verdict": "not tested by this sweep",
                        "sentence": f"{head} — not tested by this sweep (it needs {a} and {b})."})
            continue
        v = verdict(cs)
        detail = "; ".join(f"{kept(c['density'])} kept: {a} − {b} = "
                           f"{100 * c['mean_diff']:+.2f} points" + (
                               f" [{100 * c['ci'][0]:+.2f}, {100 * c['ci'][1]:+.2f}], p = {_p(c['p'])}"
                               if c["p"] is not None else "") + f", {c['n']} seeds" for c in cs)
        out.append({"claim": text, "a": a, "b": b, "paper": in_paper, "verdict": v, "comparisons": cs,
                    "sentence": f"{head} — here: {v}; {detail}."})
    return out


def _p(p):
    return f"{p:.2g}" if p >= 0.001 else "< 0.001"


def frontier(rows, baselines):
    """Per method and baseline (name → error), the highest mean compression among the densities whose
    mean test error over seeds is at or under the baseline (None when none is); then the same after §3.5
    (method ``"<m>, dead neurons removed"``, from the rows' ``dead_removed``) where every row has it."""
    out = []
    for m in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == m]
        variants = [(m, mine)]
        if all("dead_removed" in r for r in mine):
            variants.append((f"{m}, dead neurons removed", [{**r["dead_removed"], "density": r["density"]}
                                                            for r in mine]))
        for label, rs in variants:
            for name, base in baselines.items():
                good = [r for r in rs if r["mean"] is not None and base is not None and r["mean"] <= base]
                best = max(good, key=lambda r: r["compression"], default=None)
                out.append({"method": label, "baseline": name, "error": base, "density": best and best["density"],
                            "compression": best and best["compression"], "mean": best and best["mean"]})
    return out


# ----------------------------------------------------------------------------- report and figure
def _mean_sd(s):
    return "-" if s["mean"] is None else pct(s["mean"], 2) + ("" if s["sd"] is None else f" ± {100 * s['sd']:.2f}")


def _after(r):
    """A row's compression and mean error once the dead neurons are removed (§3.5), or "-"."""
    a = r.get("dead_removed")
    return "-" if not a or a["mean"] is None else f"{a['compression']:.1f}× ({pct(a['mean'], 2)})"


def _ci(s):
    return "-" if s["ci"] is None else f"[{100 * s['ci'][0]:.2f}, {100 * s['ci'][1]:.2f}]%"


def format_report(result):
    """``report.md``: per network and data set the dense error, a table per (method, kept fraction), the
    claims, the comparisons with han, the frontier and the failed tasks."""
    s = result["spec"]
    work = sum(r.get("run_seconds", 0) for r in result["tasks"] if r["status"] == "ok")
    lines = [f"# Sweep {result['name']}", "", *([s["description"], ""] if s["description"] else []),
             f"{count(len(s['seeds']), 'seed')} ({', '.join(map(str, s['seeds']))}) × "
             f"{count(len(s['methods']), 'method')} × {count(len(s['densities']), 'kept fraction')}; iterative "
             f"methods: {count(s['rounds'], 'round')} × {count(s['epochs'], 'retraining epoch')}; dense training: {s['train']['epochs']} epochs. Test errors over seeds: mean ± "
             f"standard deviation and the 95% t-interval of the mean; comparisons paired by seed (paired t-test; "
             f"significant when p < {ALPHA}). {len(result['tasks'])} tasks, {eta(work)} of worker time in all (the "
             f"tasks' own times, whichever call ran them); this call: {result.get('where', '-')}, "
             f"{result.get('seconds', 0):.0f} s.", ""]
    for g in result["groups"]:
        d = g["dense"]
        lines += [f"## {g['label']}", "", f"Dense: test error {_mean_sd(d)} (95% CI {_ci(d)}, {d['n']} seeds, "
                  f"{d['epochs'] or 0:.0f} epochs).", ""]
        rows = [[r["method"], kept(r["density"]), r["n"], _mean_sd(r), _ci(r), pct(r["weights_left"], 2),
                 "-" if r["compression"] is None else f"{r['compression']:.1f}×", _after(r),
                 "-" if r["epochs"] is None else f"{r['epochs']:.0f} / {r['total_epochs']:.0f}",
                 r["failed"] or ""] for r in sorted(g["rows"], key=lambda r: (-r["density"], r["method"]))]
        lines += [md_table(["method", "kept (target)", "seeds", "test error", "95% CI", "weights left",
                            "compression", "dead neurons removed (§3.5)", "epochs (own / with its sources)",
                            "failed"], rows), ""]
        lines += ["### The paper's claims", ""] + [f"- {c['sentence']}" for c in g["claims"] if c["paper"]]
        lines += ["", "### Beyond the paper", ""] + [f"- {c['sentence']}" for c in g["claims"] if not c["paper"]]
        vs = [c for c in g["paired"] if "han" in (c["a"], c["b"]) and c["p"] is not None]
        if vs:
            rows = [[kept(c["density"]), c["b"] if c["a"] == "han" else c["a"],
                     f"{sign * 100 * c['mean_diff']:+.2f}", f"[{sign * 100 * c['ci'][lo]:+.2f}, "
                     f"{sign * 100 * c['ci'][1 - lo]:+.2f}]", _p(c["p"]), c["n"]]
                    for c in vs for sign, lo in [(1, 0) if c["b"] == "han" else (-1, 1)]]
            lines += ["", "### Paired with han (method − han, points of test error)", "",
                      md_table(["kept", "method", "difference", "95% CI", "p", "seeds"], rows)]
        bases = list(dict.fromkeys((f["baseline"], f["error"]) for f in g["frontier"]))
        cell = {(f["method"], f["baseline"]): "-" if f["density"] is None else
                f"{f['compression']:.1f}× ({kept(f['density'])} kept, {pct(f['mean'], 2)})" for f in g["frontier"]}
        lines += ["", "### Frontier: the highest compression whose mean error stays at or under", "",
                  md_table(["method", *(f"{b} ({pct(e, 2)})" for b, e in bases)],
                           [[m, *(cell[m, b] for b, _ in bases)] for m in dict.fromkeys(f["method"] for f in
                                                                                        g["frontier"])]), ""]
        lines += [f"![test error against kept fraction]({Path(f).name})" for f in result.get("figures", [])
                  if Path(f).name == f"errors-{g['label']}.png"] + [""]
    failed = [r for r in result["tasks"] if r["status"] != "ok"]
    if failed:
        lines += ["## Failed tasks", "", md_table(["task", "reason"], [[r["task"], r["reason"].replace("|", "\\|")]
                                                                       for r in failed]), ""]
    return "\n".join(lines)


def minor_label(v, low, high):
    """The label of a minor tick at ``v`` on a log axis from ``low`` to ``high``: every tick when the range is
    narrow (under 4×), else those whose leading digit is 2, 3 or 5 (0.2, 3, 50, …)."""
    return f"{v:g}" if f"{v:.0e}"[0] in ("123456789" if high / low < 4 else "235") else ""


def _plot(result, g, path):
    """Test error against kept fraction, per method: the mean over seeds with its 95% band, the dense error's
    band beside it (PNG; None without matplotlib)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    if all(r["mean"] is None for r in g["rows"]) and g["dense"]["mean"] is None:
        return None

    def draw(fig):
        ax = fig.add_subplot()
        for i, m in enumerate(dict.fromkeys(r["method"] for r in g["rows"])):
            rs = sorted((r for r in g["rows"] if r["method"] == m and r["mean"] is not None),
                        key=lambda r: r["density"])
            if not rs:
                continue
            x = [r["density"] for r in rs]
            line, = ax.plot(x, [100 * r["mean"] for r in rs], marker="o", ms=3, ls="-" if i < 10 else "--", label=m)
            band = [r for r in rs if r["ci"] is not None]
            if band:
                ax.fill_between([r["density"] for r in band], [max(100 * r["ci"][0], 1e-3) for r in band],
                                [100 * r["ci"][1] for r in band], color=line.get_color(), alpha=0.2, lw=0)
        d = g["dense"]
        if d["mean"] is not None:
            ax.axhline(100 * d["mean"], color="gray", ls="--", lw=1, label="dense")
            if d["ci"] is not None:
                ax.axhspan(100 * d["ci"][0], 100 * d["ci"][1], color="gray", alpha=0.15, lw=0)
        ax.set_xscale("log")
        ticks = sorted({r["density"] for r in g["rows"]})
        ax.set_xticks(ticks, [f"{100 * t:g}%" for t in ticks], minor=False)
        ax.set_xticks([], minor=True)
        ax.invert_xaxis()
        means = [100 * r["mean"] for r in g["rows"] if r["mean"]] + ([100 * d["mean"]] if d["mean"] else [])
        if means:  # log scale: errors near the dense one and collapsed ones (tens of %) both readable
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log")
            low, high = 0.8 * min(means), min(100, 1.5 * max(means))  # bands of few seeds can be wide
            ax.set_ylim(low, high)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: minor_label(v, low, high)))
        ax.set(xlabel="kept fraction of the prunable weights (log scale)", ylabel="test error (%, log scale)",
               title=f"{g['label']}: mean over {len(result['spec']['seeds'])} seeds, 95% bands")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))

    fig = Figure(figsize=(7.5, 4.5))
    draw(fig)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return str(path)
