"""The paper's LeNet experiments end to end (``sparsenet reproduce lenet-300-100``), from a JSON file in ``reproduce/``
(or any path): ``experiment`` (its name), ``train`` (TrainConfig fields), ``prune`` (a prune_run schedule, §3.4),
optional ``sensitivity`` (Fig. 6), ``tradeoff`` (Fig. 5), ``bounds``. Results (metrics.json with repository-relative
paths, report.md, figures) go to ``--out``, the runs to its ``work/``; a killed run resumes."""
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy

from . import __version__
from .backend import array_module, blas_info, cpu_model, resolve_device
from .checkpoint import load_checkpoint
from .data import test_arrays
from .engine import Schedule, TrainConfig, prune_run, train
from .model import build_model
from .figures import plot_bits, plot_curves, plot_pattern, plot_sensitivity, plot_tradeoff
from .paper import DEEP_COMPRESSION, LAYERS, TABLE1
from .report import format_markdown, layer_report, md_table, pct, sensitivity, sensitivity_table
from . import pruning
from .pruning import prunable_layers
from .util import SparsenetError, eta, whole, write_text_atomic

PRETRAINED = ("alexnet", "vgg-16")  # experiments that start from imported ImageNet weights
REPO_ROOT = Path(__file__).resolve().parent.parent
REPRO_DIR = REPO_ROOT / "reproduce"
CONFIG_KEYS = {"experiment", "description", "train", "pretrained", "prune", "quantise", "sensitivity", "tradeoff",
               "bounds"}


def find_config(name):
    """A config path from an experiment name (``reproduce/<name>.json``) or a path."""
    for path in (Path(name), REPRO_DIR / f"{name}.json"):
        if path.suffix == ".json" and path.is_file():
            return path
    known = sorted(p.stem for p in REPRO_DIR.glob("*.json")) if REPRO_DIR.is_dir() else []
    raise SparsenetError(f"no experiment {name!r}: give a config .json or one of {', '.join(known) or '(none found)'}")


def load_config(name):
    path = find_config(name)
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise SparsenetError(f"{path}: not valid JSON ({e})") from None
    if (not isinstance(cfg, dict) or set(cfg) - CONFIG_KEYS or not {"experiment", "prune"} <= set(cfg)
            or ("train" in cfg) == ("pretrained" in cfg)):
        raise SparsenetError(f"{path}: an experiment needs 'experiment', 'prune' and either 'train' or 'pretrained' "
                             f"(allowed keys: {', '.join(sorted(CONFIG_KEYS))})")
    if "train" in cfg:  # a description file or data set path is relative to the config's folder
        cfg["train"] = dataclasses.asdict(TrainConfig.from_dict(cfg["train"], base=path.parent))
    else:
        pre = cfg["pretrained"]
        if not isinstance(pre, dict) or pre.get("model") not in PRETRAINED or set(pre) - {"model", "data"} or set(
                pre.get("data", {})) - {"train_subset", "test_subset"}:
            raise SparsenetError(f"{path}: 'pretrained' needs a model ({', '.join(PRETRAINED)}) and optionally "
                                 "data: train_subset, test_subset")
        for k, v in pre.get("data", {}).items():
            whole(v, f"{path}: {k}", 0)
    Schedule.from_dict(cfg["prune"])
    try:
        _check_sections(cfg)
    except SparsenetError as e:
        raise SparsenetError(f"{path}: {e}") from None
    return cfg, path


BOUNDS = ("max_test_error", "min_compression", "max_error_increase", "max_compressed_error", "min_file_ratio")
MAX_SEEDS = 10_000  # more seeds than any study needs: a typo (10**15) is refused, not planned


def _section(cfg, key, allowed):
    d = cfg.get(key)
    if d is None:
        return {}
    if not isinstance(d, dict) or set(d) - set(allowed):
        bad = sorted(set(d) - set(allowed)) if isinstance(d, dict) else d
        raise SparsenetError(f"'{key}' must be an object with keys among {', '.join(allowed)} (got {bad!r})")
    return d


def _fractions(v, what, high_open=False):
    ok = isinstance(v, list) and v and all(not isinstance(r, bool) and isinstance(r, (int, float)) and 0 <= r <= 1
                                           and not (high_open and r == 1) for r in v)
    if not ok:
        raise SparsenetError(f"{what} must be a non-empty list of fractions in [0, {1 if not high_open else '1)'}"
                             f"{']' if not high_open else ''}, got {v!r}")


def _number(v, what):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise SparsenetError(f"{what} must be a finite number >= 0, got {v!r}")


def _check_sections(cfg):
    """The optional sections of an experiment config, whole: experiment and description strings,
    ``sensitivity`` (ratios), ``tradeoff`` (ratios, epochs, l1, l1_epochs, retrain, seed), ``quantise``
    (bits, retrain, sweep: layer, bits, epochs) and ``bounds`` (numbers)."""
    if not isinstance(cfg["experiment"], str) or not cfg["experiment"] or not isinstance(
            cfg.get("description", ""), str):
        raise SparsenetError("'experiment' (a name) and 'description' must be strings")
    sens = _section(cfg, "sensitivity", ("ratios",))
    if "ratios" in sens:
        _fractions(sens["ratios"], "sensitivity.ratios")
    trade = _section(cfg, "tradeoff", ("ratios", "epochs", "l1", "l1_epochs", "retrain", "seed"))
    if cfg.get("tradeoff") is not None:
        _fractions(trade.get("ratios"), "tradeoff.ratios", high_open=True)
        for k in ("epochs", "l1_epochs", "seed"):
            if k in trade:
                whole(trade[k], f"tradeoff.{k}", 0)
        if "l1" in trade:
            _number(trade["l1"], "tradeoff.l1")
        Schedule.from_dict({"retrain": trade.get("retrain", {}), "rounds": [{"criterion": "percentile", "amount": 0}]})
    q = _section(cfg, "quantise", ("bits", "retrain", "sweep"))
    if cfg.get("quantise") is not None:
        if "bits" not in q:
            raise SparsenetError("quantise.bits is missing")
        Schedule.from_dict({"retrain": q.get("retrain", {}), "rounds": [{"quantise": q["bits"]}]})
        from .quantise import check_bits

        net = build_model(cfg["train"]["model"]) if "train" in cfg else build_model(cfg["pretrained"]["model"])
        check_bits(net, q["bits"])  # the shape of the bits against the network (nothing trained)
        sw = _section(q, "sweep", ("layer", "bits", "epochs"))
        if q.get("sweep") is not None:
            if sw.get("layer") not in prunable_layers(net):
                raise SparsenetError(f"quantise.sweep.layer must name a layer of {net.name} "
                                     f"({', '.join(prunable_layers(net))}), got {sw.get('layer')!r}")
            bits = sw.get("bits", [2])
            if not isinstance(bits, list) or not bits or not all(isinstance(b, int) and not isinstance(b, bool) and
                                                                  1 <= b <= 16 for b in bits):
                raise SparsenetError(f"quantise.sweep.bits must be a list of widths 1..16, got {bits!r}")
            whole(sw.get("epochs", 1), "quantise.sweep.epochs", 0)
    for k, v in _section(cfg, "bounds", BOUNDS).items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SparsenetError(f"bounds.{k} must be a number, got {v!r}")


def _git_commit():
    def git(*args):
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    try:
        out = git("rev-parse", "HEAD")
        # uncommitted changes to code or configs count; results being rewritten do not
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":/",
                    ":(top,exclude)reproduce/results").stdout.strip()
        return (out.stdout.strip() + ("+uncommitted changes" if dirty else "")) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _stage(progress, title, items, seconds=None, key=None):
    """Run ``items`` (label, weight, fn[, run folder, TrainConfig/Schedule]), saying "title: k of n, label, ~t left"
    (time per weight so far) before each, or that a finished run is reused; the time adds to ``seconds[key]``."""
    spent, worked, start, todo, out = 0.0, 0.0, time.perf_counter(), sum(it[1] for it in items), []
    for k, (label, w, fn, *run) in enumerate(items, 1):
        log = _read(run[0] / "log.jsonl", True) if run else []
        done, total, unit = (0, 1, "") if not run else (len(log), run[1].epochs, "epochs") if isinstance(
            run[1], TrainConfig) else (sum(r["event"] == "round" for r in log), len(run[1].rounds), "rounds")
        say = f"reused {run[0]} (done earlier)" if done >= total else label + (
            f", resuming ({done} of {total} {unit} done earlier)" if done else "") + (
            f", {eta(spent / worked * todo)} left" if worked else "")
        if progress:
            print(f"[reproduce] {title}: " + f"{k} of {len(items)}, " * (len(items) > 1) + say, file=sys.stderr)
        t0 = time.perf_counter()
        out.append(fn())
        todo -= w
        if done < total:
            spent, worked = spent + time.perf_counter() - t0, worked + w * (total - done) / total
    if key:
        seconds[key] = round(seconds.get(key, 0.0) + time.perf_counter() - start, 1)
    return out


def _resumed(go, run_dir, first, **kw):
    """``go(run_dir, first)`` (a TrainConfig or Schedule: a new run), or resuming the run there, which must be the
    one ``first`` asks for (its config.json or schedule.json)."""
    stored, want = (run_dir / "schedule.json", first.to_dict()) if isinstance(first, Schedule) else (
        run_dir / "config.json", dataclasses.asdict(first))
    if _read(stored) not in (None, json.loads(json.dumps(want))):
        raise SparsenetError(f"{run_dir} was started with other settings than the config now gives; "
                             f"delete {run_dir} (or use --out) to run the experiment again")
    resume = (run_dir / "checkpoint.h5").exists()
    return go(run_dir, None if resume else first, resume=resume, **kw)


def _read(path, lines=False):
    """A JSON file (None when missing) or, with ``lines``, a JSON-lines file's records ([] when missing)."""
    text = Path(path).read_text() if Path(path).is_file() else None
    return [json.loads(x) for x in (text or "").splitlines()] if lines else text and json.loads(text)


# ----------------------------------------------------------------------------- Fig. 5
def tradeoff(dense_ckpt, work, cfg, data_dir=None, device=None, progress=True, seconds=None):
    """Fig. 5 on this network: accuracy loss against weights pruned, L2 / L1 without and with retraining and L2
    iterative. ``cfg``: ``ratios``, ``epochs``, ``retrain`` (optimiser settings), ``l1`` and ``l1_epochs`` (L1
    fine-tuning of the dense net first). Runs live in ``work/``; done ones are reused; the time adds to ``seconds``."""
    ratios, epochs, l1_epochs = list(cfg["ratios"]), int(cfg.get("epochs", 2)), int(cfg.get("l1_epochs", 2))
    seed = whole(cfg.get("seed", 0), "tradeoff.seed", 0)  # the data order of its retraining
    retrain, l1 = dict(cfg.get("retrain", {}), remove_neurons=False), float(cfg.get("l1", 1e-4))
    reg = {"L2": retrain, "L1": {**retrain, "l1": l1, "weight_decay": 0.0}}
    kw = dict(data_dir=data_dir, device=device, progress=progress)
    base = {"L2": dense_ckpt, "L1": work / "l1-base" / "checkpoint.h5"}

    def run(name, source, amounts, what, n=epochs):
        sched = Schedule.from_dict({"seed": seed, "retrain": reg[name[:2].upper()], "rounds": [
            {"criterion": "percentile", "amount": a, "epochs": n} for a in amounts]})
        return (f"{what} in {work / name}", len(amounts) * n + 1,
                lambda: _resumed(partial(prune_run, source), work / name, sched, **kw), work / name, sched)

    points = [(name, r) for name in ("L2", "L1") for r in ratios]
    logs = _stage(progress, "Fig. 5", [run("l1-base", dense_ckpt, [0.0], f"L1 ({l1}) fine-tuning", l1_epochs), *(
        run(f"{n.lower()}-{r:.2f}", base[n], [r], f"{n}, {100 * r:.0f}% pruned") for n, r in points),
        run("l2-iterative", dense_ckpt, ratios, "L2, iterative")], seconds, "tradeoff")
    at = {}  # curve: [(record giving weights left, test error)]
    for (name, r), log in zip(points, logs[1:]):
        at.setdefault(f"{name} w/o retrain", []).append((log[-1], next(x for x in log if x["event"] == "prune")))
        at.setdefault(f"{name} w/ retrain", []).append((log[-1], log[-1]))
    at["L2 iterative prune + retrain"] = [(x, x) for x in logs[-1] if x["event"] == "round"]
    dense_error = _read(work.parent / "dense" / "log.jsonl", True)[-1]["test_error"]
    curves = {k: {"pruned": [1 - a["weights_left"] for a, _ in v], "loss": [b["test_error"] - dense_error
                                                                           for _, b in v]} for k, v in at.items()}
    return {"dense_error": dense_error, "ratios": ratios, "epochs": epochs, "l1": l1, "curves": curves}


# ----------------------------------------------------------------------------- the run
def with_seed(cfg, seed):
    """The config with every seed set to ``seed``: the dense network's initial weights and data order
    (``train.seed``), the pruning rounds' data order (``prune.seed``) and Fig. 5's runs (``tradeoff.seed``)."""
    seed = whole(seed, "seed", 0)
    if "pretrained" in cfg:
        raise SparsenetError(f"{cfg['experiment']} starts from one set of trained weights: seeds are for the "
                             "experiments that train their network (the LeNets)")
    cfg = json.loads(json.dumps(cfg))
    cfg["train"]["seed"] = cfg["prune"]["seed"] = seed
    if cfg.get("tradeoff"):
        cfg["tradeoff"]["seed"] = seed
    return cfg


def reproduce(name, out=None, data_dir=None, device=None, progress=True, weights=None, prune_only=False, seed=None):
    """Run (or resume) an experiment; returns its metrics (as in ``metrics.json``, plus ``results_dir``).
    ImageNet experiments (``pretrained``) start from ``weights`` (:func:`reproduce_pretrained`). ``seed``
    replaces every seed of the config (:func:`with_seed`); :func:`reproduce_seeds` runs several."""
    cfg, cfg_path = load_config(name)
    if seed is not None:
        cfg = with_seed(cfg, seed)
    return _reproduce(cfg, cfg_path, out, data_dir, device, progress, weights, prune_only)


def _reproduce(cfg, cfg_path, out=None, data_dir=None, device=None, progress=True, weights=None, prune_only=False):
    """:func:`reproduce` of a loaded config (``cfg_path`` only names it in the results)."""
    out = Path(out) if out is not None else Path("runs") / cfg["experiment"]  # never the committed results
    if "pretrained" in cfg:
        return reproduce_pretrained(cfg, cfg_path, out, weights, data_dir, device, progress, prune_only)
    if weights is not None or prune_only:
        raise SparsenetError(f"{cfg['experiment']} trains its network itself: --weights and --prune-only are for "
                             f"the ImageNet experiments ({', '.join(PRETRAINED)})")
    work = out / "work"
    t_start, commit = time.time(), _git_commit()  # the code that runs this call (a resumed run may span several)
    timing = (_read(out / "metrics.json") if work.is_dir() else None) or {}  # a resumed run adds to its time, commits
    seconds = {k: v for k, v in timing.get("seconds", {}).items() if k != "total"}  # the total is recomputed
    tcfg, sched, kw = TrainConfig.from_dict(cfg["train"]), Schedule.from_dict(cfg["prune"]), dict(
        data_dir=data_dir, device=device, progress=progress)
    dense_dir, pruned_dir, dense_ck = work / "dense", work / "pruned", work / "dense" / "checkpoint.h5"
    dense_log, = _stage(progress, "dense training", [(f"{tcfg.epochs} epochs in {dense_dir}", 1, lambda: _resumed(
        train, dense_dir, tcfg, **kw), dense_dir, tcfg)], seconds, "dense")
    log, = _stage(progress, "iterative pruning", [(f"{len(sched.rounds)} rounds in {pruned_dir}", 1, lambda: _resumed(
        partial(prune_run, dense_ck), pruned_dir, sched, **kw), pruned_dir, sched)], seconds, "prune")
    xp = array_module(device)
    dense, pruned = (load_checkpoint(d / "checkpoint.h5", xp).net for d in (dense_dir, pruned_dir))
    x, t = test_arrays(dataclasses.asdict(tcfg), dense, xp, data_dir)
    dense_rep, rep = _stage(progress, "report", [(f"per-layer table of the {k} network", 1, lambda n=n: layer_report(
        n, x, t=t)) for k, n in (("dense", dense), ("pruned", pruned))], seconds, "report")
    sens = trade = None
    if cfg.get("sensitivity"):
        ratios = cfg["sensitivity"].get("ratios", [round(0.1 * i, 1) for i in range(10)])
        parts = _stage(progress, "Fig. 6: sensitivity (dense network, no retraining)", [(f"layer {n}", 1, lambda n=n: (
            sensitivity(dense, x, t, ratios, [n]))) for n in prunable_layers(dense)], seconds, "sensitivity")
        sens = {**parts[0], "layers": {k: v for p in parts for k, v in p["layers"].items()}}
    if cfg.get("tradeoff"):
        trade = tradeoff(dense_ck, work / "tradeoff", cfg["tradeoff"], **kw, seconds=seconds)
    dc = deep_compression(cfg, work, dense, x, t, out, kw, seconds) if cfg.get("quantise") else None
    figures = {k: f for k, plot, arg, f in (
        ("fig4", plot_pattern, pruned, "fig4_pattern.png"), ("fig6", plot_sensitivity, sens, "fig6_sensitivity.png"),
        ("fig5", plot_tradeoff, trade, "fig5_tradeoff.png"),
        ("curves", plot_curves, {"dense training": dense_log, "iterative pruning": log}, "curves.png"),
        ("bits", plot_bits, dc and dc["sweep"], "bits_sweep.png"))
        if arg is not None and plot(arg, out / f)}
    model, cpus = dense.name, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    metrics = {
        "experiment": cfg["experiment"], "config": repo_path(cfg_path), "results": repo_path(out), "model": model,
        "dataset": tcfg.dataset, "dense": {"test_error": dense_rep["error"], "params": dense_rep["params"]},
        "pruned": {"test_error": rep["error"], **{k: rep[k] for k in ("params", "nonzero_params", "compression")},
                   "weights_left": {r["name"]: r["weights_left"] for r in rep["layers"]},
                   "shapes": next(x for x in reversed(log) if x["event"] == "round")["shapes"]},
        **{key: {k: r[k] for k in ("layers", "total")} for key, r in (("report", rep), ("dense_report", dense_rep))},
        "rounds": [{k: x[k] for k in ("round", "test_error", "compression", "density")}
                   for x in log if x["event"] == "round"],
        "sensitivity": sens and {k: sens[k] for k in ("ratios", "layers", "baseline")},
        "tradeoff": trade, "figures": figures, "paper": TABLE1.get(model),
        "deep_compression": dc, "checks": _checks(cfg.get("bounds", {}), rep, dc=dc),
        "committed": _committed(cfg["experiment"], out),
        "provenance": {"seed": tcfg.seed, "prune_seed": cfg["prune"].get("seed", 0), "sparsenet": __version__,
                       "commit": commit, "commits": sorted({*timing.get("provenance", {}).get("commits", []), commit}),
                       "python": platform.python_version(), "numpy": numpy.__version__,
                       "device": resolve_device(device), "machine": f"{platform.machine()}, {cpus} CPUs",
                       "cpu": cpu_model(), "blas": blas_info(),
                       "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
        "seconds": {**seconds, "total": round(sum(seconds.values()), 1)},
    }
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_text_atomic(out / "report.md", format_report(metrics, rep))
    if progress:
        print(f"[reproduce] wrote {out / 'report.md'} ({time.time() - t_start:.0f} s this call)", file=sys.stderr)
    return {**metrics, "results_dir": str(out)}  # usable from the current directory; not in metrics.json


# ----------------------------------------------------------------------------- over seeds
def reproduce_seeds(name, seeds, out=None, *, scheduler=None, serial=False, workers=None, data_dir=None, device=None,
                    progress=True, timeout=10.0):
    """An experiment rerun over seeds on the sweep engine (:mod:`sparsenet.sweeps`): one task per seed, each an
    ordinary :func:`reproduce` run (every seed of the config replaced, :func:`with_seed`) in ``OUT/seed-<s>/``
    with one BLAS thread, on an embedded Dask cluster (default), an existing one (``scheduler``,
    ``$SPARSENET_SCHEDULER``) or in this process (``serial``): the same numbers wherever a seed ran. A rerun
    skips finished seeds (their ``result.json``) and resumes interrupted ones.

    Parameters
    ----------
    seeds : int or list of int
        N (seeds 0 … N−1) or the seeds themselves.

    Returns
    -------
    dict
        What ``OUT/seeds.json`` holds (:func:`summarise_seeds`: the headline dense and pruned errors as
        mean ± sd with 95% intervals, the paired change, per-layer densities, Fig. 5 and Fig. 6 with bands),
        plus ``results_dir``. ``OUT/report.md`` and the band figures are written beside it.
    """
    from . import sweeps

    cfg, cfg_path = load_config(name)
    seeds = _seed_list(seeds)
    fingerprints = {s: json.dumps(with_seed(cfg, s), sort_keys=True) for s in seeds}  # refuses ImageNet ones
    scheduler = sweeps.engine_options(scheduler, serial, workers)
    out = Path(os.path.abspath(out if out is not None else Path("runs") / f"{cfg['experiment']}-seeds"))
    _check_seeds_out(out, cfg)
    data_dir = None if data_dir is None else str(Path(data_dir).expanduser().absolute())
    jobs = [{"task": f"seed-{s}", "seed": s, "deps": [], "weight": 1, "dir": str(out / f"seed-{s}"),
             "cfg": with_seed(cfg, s), "config": str(cfg_path.absolute()), "fingerprint": fingerprints[s],
             "data_dir": data_dir, "device": device, "threads": 1} for s in seeds]
    records = {job["task"]: rec for job in jobs if _valid_seed_record(rec := _stored(job), job)}
    todo = [job for job in jobs if job["task"] not in records]
    say, t0 = sweeps._say("reproduce", progress), time.perf_counter()
    with sweeps.task_engine(scheduler, serial, workers, len(todo), timeout, say) as (client, where):
        sweeps.make_folder(out)
        write_text_atomic(out / "study.json", json.dumps({"experiment": cfg["experiment"], "config": cfg},
                                                         indent=2) + "\n")
        say(f"{cfg['experiment']} over {len(seeds)} seeds: {len(records)} done earlier, {len(todo)} to run"
            + (" in this process" if client is None and todo else ""))
        sweeps.execute(client, todo, records, seed_task,
                       sweeps.Progress(todo, len(jobs), len(records), progress, "reproduce"))
    result = summarise_seeds(cfg, [records[j["task"]] for j in jobs])
    result.update(config=repo_path(cfg_path), where=where, seconds=round(time.perf_counter() - t0, 1),
                  provenance=sweeps._provenance())
    result["figures"] = {k: f for k, plot, arg, f in (
        ("fig5", plot_tradeoff, result["tradeoff"], "fig5_tradeoff_bands.png"),
        ("fig6", plot_sensitivity, result["sensitivity"], "fig6_sensitivity_bands.png")) if arg and plot(arg, out / f)}
    write_text_atomic(out / "seeds.json", json.dumps(result, indent=1) + "\n")
    write_text_atomic(out / "report.md", format_seeds_report(result))
    failed = sum(r["status"] != "ok" for r in result["tasks"])
    say(f"wrote {out / 'report.md'}" + (f"; {failed} seeds failed (see the report)" if failed else ""))
    return {**result, "results_dir": str(out)}


def _stored(job):
    """The ``result.json`` of a seed's folder, or None (missing or damaged)."""
    try:
        return json.loads((Path(job["dir"]) / "result.json").read_text())
    except (OSError, ValueError):
        return None


def _valid_seed_record(rec, job):
    """``rec`` is the ``ok`` record of this seed run with this config, with the numbers the statistics read."""
    if not isinstance(rec, dict) or rec.get("status") != "ok" or rec.get("seed") != job["seed"] or rec.get(
            "fingerprint") != job["fingerprint"] or not isinstance(rec.get("weights_left"), dict):
        return False
    return all(not isinstance(rec.get(k), bool) and isinstance(rec.get(k), (int, float)) and math.isfinite(rec[k])
               for k in ("dense_error", "pruned_error", "compression", "nonzero_params"))


def _seed_list(seeds):
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if whole(seeds, "seeds", 1) > MAX_SEEDS:
            raise SparsenetError(f"seeds: {seeds} runs are more than {MAX_SEEDS:,}; give fewer")
        return list(range(seeds))
    if not isinstance(seeds, (list, tuple)) or not seeds or len(seeds) > MAX_SEEDS:
        raise SparsenetError(f"seeds must be a count N >= 1 or a non-empty list of seeds (at most {MAX_SEEDS:,}), "
                             f"got {seeds if not isinstance(seeds, (list, tuple)) else f'{len(seeds)} seeds'!r}")
    seeds = [whole(s, "a seed", 0) for s in seeds]
    if len(set(seeds)) < len(seeds):
        raise SparsenetError(f"seeds: a seed is repeated in {seeds}")
    return seeds


def _check_seeds_out(out, cfg):
    """``out`` is new, empty, or holds this experiment over seeds with the same config (read only)."""
    from .sweeps import stored_study

    old = stored_study(out, "study.json", "folder of an experiment over seeds")
    if old is not None and old.get("config") != json.loads(json.dumps(cfg)):
        raise SparsenetError(f"{out} holds {old.get('experiment', 'a study')} over seeds with another config; only "
                             "the seeds may change in a rerun: use another --out")


def seed_task(job):
    """One seed of :func:`reproduce_seeds`, a task of the sweep engine: the experiment run (or resumed, or found
    finished) in ``job["dir"]`` with one BLAS thread; returns its record (:func:`seed_record`), also written to
    ``result.json``, or a failed one with its reason (it never raises)."""
    from threadpoolctl import threadpool_limits

    from .sweeps import failed_record, one_line

    try:
        with threadpool_limits(job["threads"], user_api="blas"):
            m = _reproduce(job["cfg"], Path(job["config"]), Path(job["dir"]), job["data_dir"], job["device"],
                           progress=False)
        rec = {"task": job["task"], "seed": job["seed"], "status": "ok", "fingerprint": job["fingerprint"],
               **seed_record(m)}
    except Exception as e:  # recorded with its reason; the other seeds go on
        return failed_record(job, one_line(e))
    write_text_atomic(Path(job["dir"]) / "result.json", json.dumps(rec, indent=1) + "\n")
    return rec


def seed_record(m):
    """The numbers of one seed's ``metrics.json`` that :func:`summarise_seeds` gathers."""
    pr, dc, tr = m["pruned"], m.get("deep_compression"), m.get("tradeoff")
    return {"model": m["model"], "dense_error": m["dense"]["test_error"], "pruned_error": pr["test_error"],
            **{k: pr[k] for k in ("compression", "nonzero_params", "params", "weights_left")},
            "sensitivity": m.get("sensitivity"),
            "tradeoff": tr and {k: tr[k] for k in ("dense_error", "ratios", "curves")},
            "deep_compression": dc and {k: dc[k] for k in ("test_error", "file_ratio")},
            "seconds": m["seconds"]["total"], "blas": m["provenance"].get("blas")}


def summarise_seeds(cfg, records):
    """Statistics over the seeds that finished (:func:`sparsenet.stats.describe`: mean, sd, 95% t-interval):
    the headline dense and pruned errors and compression; the change pruned − dense paired by seed
    (:func:`~sparsenet.stats.paired`); per-layer weights left; Fig. 6 (mean error per layer and ratio with its
    interval) and Fig. 5 (mean loss per curve and point with its interval) in the forms :func:`plot_sensitivity`
    and :func:`plot_tradeoff` draw with bands."""
    from .stats import describe, paired

    ok = [r for r in records if r["status"] == "ok"]

    def d(values):
        return describe(values)

    head = {k: d([r[k] for r in ok]) for k in ("dense_error", "pruned_error", "compression", "nonzero_params")}
    layers = {n: d([r["weights_left"][n] for r in ok]) for n in (ok[0]["weights_left"] if ok else {})}
    sens = trade = dc = None
    if ok and all(r["sensitivity"] for r in ok):
        s0 = ok[0]["sensitivity"]
        cells = {n: [d([r["sensitivity"]["layers"][n][i] for r in ok]) for i in range(len(s0["ratios"]))]
                 for n in s0["layers"]}
        base = d([r["sensitivity"]["baseline"] for r in ok])
        sens = {"model": ok[0]["model"], "seeds": len(ok), "ratios": s0["ratios"], "baseline": base["mean"],
                "layers": {n: [c["mean"] for c in v] for n, v in cells.items()},
                "ci": {**{n: [c["ci"] for c in v] for n, v in cells.items()}, "baseline": base["ci"]}}
    if ok and all(r["tradeoff"] for r in ok):
        t0, curves = ok[0]["tradeoff"], {}
        for name, c in t0["curves"].items():
            if any(len(r["tradeoff"]["curves"][name]["loss"]) != len(c["loss"]) for r in ok):
                continue
            pts = [d([r["tradeoff"]["curves"][name]["loss"][i] for r in ok]) for i in range(len(c["loss"]))]
            curves[name] = {"pruned": [d([r["tradeoff"]["curves"][name]["pruned"][i] for r in ok])["mean"]
                                       for i in range(len(c["loss"]))],
                            "loss": [p["mean"] for p in pts], "ci": [p["ci"] for p in pts],
                            "sd": [p["sd"] for p in pts]}
        trade = {"seeds": len(ok), "ratios": t0["ratios"], "curves": curves,
                 "dense_error": d([r["tradeoff"]["dense_error"] for r in ok])["mean"]}
    if ok and all(r["deep_compression"] for r in ok):
        dc = {k: d([r["deep_compression"][k] for r in ok]) for k in ("test_error", "file_ratio")}
    model = ok[0]["model"] if ok else None
    return {"experiment": cfg["experiment"], "model": model, "dataset": cfg["train"]["dataset"],
            "seeds": [r["seed"] for r in records], "tasks": records, **head,
            "change": paired([r["pruned_error"] for r in ok], [r["dense_error"] for r in ok]),
            "weights_left": layers, "sensitivity": sens, "tradeoff": trade, "deep_compression": dc,
            "paper": TABLE1.get(model)}


def _ms(s, digits=2, scale=100, unit="%"):
    """``mean ± sd`` of a :func:`~sparsenet.stats.describe` result (``-`` without values)."""
    if s["mean"] is None:
        return "-"
    return f"{scale * s['mean']:,.{digits}f}{unit}" + ("" if s["sd"] is None else f" ± {scale * s['sd']:,.{digits}f}")


def _iv(s, digits=2, scale=100, unit="%"):
    return "-" if s.get("ci") is None else f"[{scale * s['ci'][0]:,.{digits}f}, {scale * s['ci'][1]:,.{digits}f}]{unit}"


def format_seeds_report(r):
    """report.md of :func:`reproduce_seeds`: Table 1 over seeds beside the paper, the change pruned − dense,
    the paper's dense error, per-layer densities, each seed's numbers, the band figures, failures."""
    p, c, n = r["paper"] or {}, r["change"], r["pruned_error"]["n"]
    lines = [f"# Reproduction over seeds: {r['experiment']} ({r['model']} on {r['dataset']})", "",
             f"Config `{r['config']}` rerun with every seed replaced by each of {', '.join(map(str, r['seeds']))} "
             f"({n} finished); mean ± standard deviation over seeds and the 95% t-interval of the mean. Run: "
             f"{r['where']}, {r['seconds']:.0f} s this call.", "", "## Table 1 over seeds", "",
             md_table(["", "error before", "error after", "non-zero params after", "compression"], [
                 ["**sparsenet** (mean ± sd)", _ms(r["dense_error"]), _ms(r["pruned_error"]),
                  _ms(r["nonzero_params"], 0, 1, ""), _ms(r["compression"], 1, 1, "×")],
                 ["95% interval", _iv(r["dense_error"]), _iv(r["pruned_error"]), _iv(r["nonzero_params"], 0, 1, ""),
                  _iv(r["compression"], 1, 1, "×")]] + ([
                 ["paper", pct(p["error_before"], 2), pct(p["error_after"], 2), f"{p['params_after']:,}",
                  f"{p['compression']}×"]] if p else [])), ""]
    if c["mean_diff"] is not None:
        lines += [f"**Pruned − dense**, paired by seed: {100 * c['mean_diff']:+.2f} points" + (
            f" (95% interval [{100 * c['ci'][0]:+.2f}, {100 * c['ci'][1]:+.2f}], paired t-test p = "
            f"{c['p']:.2g})" if c["p"] is not None else "") + ".", ""]
    if p and r["pruned_error"]["mean"] is not None:
        above = sum(t["pruned_error"] > p["error_before"] for t in r["tasks"] if t["status"] == "ok")
        lines += [f"**Against the paper's dense error** ({pct(p['error_before'], 2)}): the mean pruned error is "
                  f"{'at or under' if r['pruned_error']['mean'] <= p['error_before'] else 'above'} it; {above} of "
                  f"{n} seeds are above it.", ""]
    if r["weights_left"]:
        lines += ["## Weights left per layer", "", md_table(["layer", "weights left (mean ± sd)", "95% interval"], [
            [k, _ms(v, 1), _iv(v, 1)] for k, v in r["weights_left"].items()]), ""]
    if r["deep_compression"]:
        dc = r["deep_compression"]
        lines += ["## Deep Compression over seeds", "", f"Compressed file's test error {_ms(dc['test_error'])} "
                  f"{_iv(dc['test_error'])}; file {_ms(dc['file_ratio'], 1, 1, '×')} smaller than the dense one.", ""]
    lines += ["## Each seed", "", md_table(["seed", "dense", "pruned", "compression", "seconds", "status"], [
        [t["seed"], pct(t.get("dense_error"), 2), pct(t.get("pruned_error"), 2),
         f"{t['compression']:.1f}×" if "compression" in t else "-", t.get("seconds", "-"),
         "ok" if t["status"] == "ok" else "failed: " + t["reason"].replace("|", "\\|")] for t in r["tasks"]]), ""]
    figs = r.get("figures", {})
    lines += [x for k, cap in (("fig5", CAPTIONS["fig5"]), ("fig6", CAPTIONS["fig6"])) if k in figs
              for x in (f"**{cap}** (mean over seeds, 95% bands)", "", f"![{k}]({figs[k]})", "")]
    if r["sensitivity"]:
        s = r["sensitivity"]
        lines += ["Sensitivity over seeds (mean test error, one layer pruned):", "",
                  md_table(*sensitivity_table(s)), ""]
    if r["tradeoff"]:
        t = r["tradeoff"]
        lines += ["Trade-off over seeds (mean accuracy change in points vs each seed's dense net ± sd; Fig. 5):", "",
                  md_table(["curve", *("pruned / Δacc" for _ in t["ratios"])], [
                      [name, *(f"{100 * x:.1f}% / {-100 * y:+.2f}" + ("" if sd is None else f" ± {100 * sd:.2f}")
                               for x, y, sd in zip(c["pruned"], c["loss"], c["sd"]))]
                      for name, c in t["curves"].items()]), ""]
    pv = r["provenance"]
    lines += ["## Provenance", "", f"sparsenet {pv['sparsenet']}, Python {pv['python']}, {pv['machine']}; finished "
              f"{pv['finished']}. Each seed's own report, figures and runs: `seed-<s>/`.", ""]
    return "\n".join(lines)


def _committed(experiment, out):
    """The committed result of the experiment (``reproduce/results/``) when this run writes elsewhere."""
    m, res = _read(REPRO_DIR / "results" / experiment / "metrics.json"), REPRO_DIR / "results" / experiment
    return None if m is None or res.resolve() == out.resolve() else {
        "results": repo_path(res), "dense_error": m["dense"]["test_error"], "test_error": m["pruned"]["test_error"],
        **{k: m["pruned"][k] for k in ("nonzero_params", "compression")}, "blas": m["provenance"].get("blas")}


def repo_path(path):
    """``path`` relative to the repository root (``reproduce/lenet-5.json``; outside it, with ``..``)."""
    return Path(os.path.relpath(Path(path).resolve(), REPO_ROOT)).as_posix()


def _checks(bounds, rep, dense_error=None, dc=None):
    """``bounds`` against the pruned net: max_test_error ≥ its error, min_compression ≤ its compression,
    max_error_increase ≥ its error less the dense one's; with Deep Compression (``dc``) max_compressed_error
    and min_file_ratio (dense float32 file of the unpruned net over the compressed file)."""
    values = {"max_test_error": rep["error"], "min_compression": rep["compression"],
              "max_error_increase": None if dense_error is None or rep["error"] is None else rep["error"] - dense_error,
              "max_compressed_error": dc and dc["test_error"], "min_file_ratio": dc and dc["file_ratio"]}
    return {k: {"bound": b, "value": values[k], "ok": bool(values[k] <= b if k.startswith("max") else values[k] >= b)}
            for k, b in bounds.items() if values.get(k) is not None}


def format_check(key, c):
    """One check of report.md as value against bound: "test error 1.56% (bound ≤ 1.64%) ✓"."""
    text = {"max_test_error": f"test error {pct(c['value'], 2)} (bound ≤ {pct(c['bound'], 2)})",
            "max_compressed_error": f"compressed file's error {pct(c['value'], 2)} (bound ≤ {pct(c['bound'], 2)})",
            "min_file_ratio": f"file {c['value']:.1f}× smaller (bound ≥ {c['bound']:g}×)",
            "max_error_increase": f"error change {100 * c['value']:+.2f} points (bound ≤ {100 * c['bound']:+.2f})",
            "min_compression": f"compression {c['value']:.1f}× (bound ≥ {c['bound']:g}×)"}[key]
    return text + (" ✓" if c["ok"] else " ✗ NOT MET")


CAPTIONS = {"fig4": "Fig. 4 — sparsity pattern of the first FC layer",
            "fig5": "Fig. 5 — accuracy against weights pruned: L1/L2, with/without retraining, iterative",
            "fig6": "Fig. 6 — sensitivity: one layer pruned at a time, no retraining (dense network)",
            "curves": "Training curves — loss and test error per epoch, dense training and pruning rounds",
            "bits": "Deep Compression — one layer weight-shared at 2-8 bits, before and after codebook fine-tuning"}


def format_report(m, rep):
    """report.md: Table 1 row, per-layer table beside the paper's, figures, provenance."""
    p, pr, d2, layers = m["paper"] or {}, m["pruned"], lambda v: pct(v, 2), LAYERS.get(m["model"])
    table1 = [["**sparsenet**", d2(m["dense"]["test_error"]), d2(pr["test_error"]), f"{pr['params']:,}",
               f"{pr['nonzero_params']:,}", f"{pr['compression']:.1f}×"]] + [[
        "paper", d2(p["error_before"]), d2(p["error_after"]), f"{p['params_before'] // 1000}K",
        f"{p['params_after'] // 1000}K", f"{p['compression']}×"]] * bool(p)
    lines = [f"# Reproduction: {m['experiment']} ({m['model']} on {m['dataset']})", "",
             "## Table 1: error and parameters", "",
             md_table(["", "error before", "error after", "params before", "params after", "compression"], table1),
             "", "Params include biases (as in the paper); \"params after\" counts the surviving ones. "
             "Dead-neuron removal left these shapes: " + ", ".join(
                 f"{k} {'×'.join(map(str, v))}" for k, v in pr["shapes"].items() if k.endswith(".W")) + ".", ""]
    if m["checks"]:
        lines += ["**Checks:** " + "; ".join(format_check(k, c) for k, c in m["checks"].items()) + ".", ""]
    if m.get("committed"):
        c, same = m["committed"], m["committed"]["nonzero_params"] == pr["nonzero_params"]
        lines += [f"**Committed result** (`{c['results']}`, BLAS: {c['blas']}): {d2(c['dense_error'])} → "
                  f"{d2(c['test_error'])} with {c['nonzero_params']:,} parameters ({c['compression']:.1f}×); this run "
                  + ("matches it." if same and c["test_error"] == pr["test_error"] else
                     "differs (results depend on the BLAS build and thread count)."), ""]
    lines += [f"## Per-layer table (the paper's Table {layers['table'] if layers else '2/3'})", "",
              "\n".join(format_markdown(rep, layers).splitlines()[2:]), "",
              "## Rounds of pruning (§3.4)", "",
              md_table(["round", "test error", "compression", "weights left per layer"],
                       [[r["round"], d2(r["test_error"]), f"{r['compression']:.1f}×",
                         ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["density"].items())] for r in m["rounds"]]), ""]
    if m.get("deep_compression"):
        lines += format_deep_compression(m["deep_compression"])
    s, t, pv = m["sensitivity"], m["tradeoff"], m["provenance"]
    lines += ["## Figures", ""] * bool(m["figures"] or s or t) + [
        f"The paper's Figs. 5 and 6 are measured on AlexNet (ImageNet); ours are on {m['model']} ({m['dataset']}), "
        "so compare the shapes of the curves, not their values.", ""] * bool(s or t)
    lines += [x for k in CAPTIONS if k in m["figures"]
              for x in (f"**{CAPTIONS[k]}**", "", f"![{k}]({m['figures'][k]})", "")]
    if s:
        lines += ["Sensitivity (test error, one layer pruned):", "", md_table(*sensitivity_table(s)), ""]
    if t:
        lines += ["Trade-off (accuracy change in points vs the dense net; Fig. 5):", "",
                  md_table(["curve", *("pruned / Δacc" for _ in t["ratios"])],
                           [[name, *(f"{100 * x:.1f}% / {-100 * y:+.2f}" for x, y in zip(c["pruned"], c["loss"]))]
                            for name, c in t["curves"].items()]), ""]
    lines += ["## Provenance", "",
              f"Config `{m['config']}`; dense seed {pv['seed']}, pruning seed {pv['prune_seed']}; "
              f"sparsenet {pv['sparsenet']} at commit `{pv['commit']}`; Python {pv['python']}, NumPy {pv['numpy']}; "
              f"device {pv['device']} ({pv['machine']}; {pv.get('cpu')}; BLAS: {pv.get('blas')}); "
              f"finished {pv['finished']}.", "",
              "Wall time (s): " + ", ".join(f"{k} {v}" for k, v in m["seconds"].items()) + ".", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the ImageNet experiments
def apply_plan(net, schedule):
    """A schedule's pruning alone, no data and no retraining: each round's prune, §3.2's dropout
    rates and §3.5's dead neurons (the parameter counts of a plan, before ImageNet is at hand)."""
    for r in schedule.rounds:
        pruning.prune(net, r["criterion"], r["amount"])
        pruning.adjust_dropout(net)
        if r["remove_neurons"]:
            pruning.remove_dead_neurons(net)
    return net


def reproduce_pretrained(cfg, cfg_path, out, weights, data_dir=None, device=None, progress=True, prune_only=False):
    """AlexNet / VGG-16: import trained ``weights`` (:mod:`sparsenet.pretrained`), measure top-1/top-5 on the
    ImageNet validation set, run the paper's plan (``prune``: FC and conv layers pruned and retrained in turn,
    the other part frozen), then the per-layer table beside the paper's and the sparse file sizes. With
    ``prune_only`` the plan's pruning is applied without data or retraining (counts and sizes only)."""
    from .engine import evaluate
    from .checkpoint import save_checkpoint
    from .modelfile import export_model, export_sizes
    from .pretrained import file_sha256, import_weights
    from .quantise import share_weights

    model, work, t_start, commit = cfg["pretrained"]["model"], out / "work", time.time(), _git_commit()
    sched, xp, kw = Schedule.from_dict(cfg["prune"]), array_module(device), dict(data_dir=data_dir, device=device,
                                                                                 progress=progress)
    dense_dir, pruned_dir = work / "dense", work / ("plan" if prune_only else "pruned")
    dense_ck, seconds = dense_dir / "checkpoint.h5", {}
    if prune_only:  # nothing kept: the trained weights, or without them Caffe's initial ones (counts are the same)
        t0 = time.perf_counter()
        net = apply_plan(import_weights(weights, model)[0] if weights else build_model(model, xp=xp), sched)
        dense_rep = rep = {"error": None, "top5_error": None}
        seconds["plan"] = round(time.perf_counter() - t0, 1)
    elif not dense_ck.exists():
        if weights is None:
            raise SparsenetError(f"{cfg['experiment']} starts from trained weights: give --weights FILE (the ONNX model "
                                 "zoo's bvlcalexnet/vgg16 .onnx, or torchvision/timm VGG-16 .safetensors)")
        net, info = import_weights(weights, model)
        save_checkpoint(dense_ck, net, config={"model": model, "dataset": "imagenet", "preprocess": info["preprocess"],
                                               "imported": info, **cfg["pretrained"].get("data", {})})
    elif weights is not None and load_checkpoint(dense_ck).config.get("imported", {}).get("sha256") != file_sha256(
            weights):
        raise SparsenetError(f"{dense_ck} was imported from other weights than {weights}; delete {out} "
                             "(or use --out) to start again")
    if not prune_only:
        dense_eval = _read(dense_dir / "eval.json")
        if dense_eval is None:
            dense_eval, = _stage(progress, "dense network", [("top-1/top-5 on the validation set", 1, lambda: evaluate(
                dense_ck, data_dir, device))], seconds, "dense")
            write_text_atomic(dense_dir / "eval.json", json.dumps(dense_eval) + "\n")
        log, = _stage(progress, "iterative pruning", [(f"{len(sched.rounds)} rounds in {pruned_dir}", 1, lambda: _resumed(
            partial(prune_run, dense_ck), pruned_dir, sched, **kw), pruned_dir, sched)], seconds, "prune")
        net = load_checkpoint(pruned_dir / "checkpoint.h5", xp).net
        dense_rep = {"error": dense_eval["test_error"], "top5_error": dense_eval.get("top5_error")}
        rep = {"error": log[-1]["test_error"], "top5_error": log[-1].get("top5_error")}
    x = None if prune_only else test_arrays(load_checkpoint(dense_ck).config, net, xp, data_dir, 256)[0]
    rep = {**layer_report(net, x if x is not None else xp.zeros((1, *net.input_shape), dtype="float32")), **rep}
    t0 = time.perf_counter()
    sizes = export_sizes(net)
    share_weights(net, "auto")  # the size after Deep Compression's sharing (no fine-tuning: that needs ImageNet)
    with tempfile.TemporaryDirectory() as d:
        export_model(net, Path(d) / "c.h5", "compressed")
        sizes["compressed"] = (Path(d) / "c.h5").stat().st_size
    seconds["export"] = round(time.perf_counter() - t0, 1)
    paper = TABLE1[model]
    metrics = {
        "experiment": cfg["experiment"], "config": repo_path(cfg_path), "results": repo_path(out), "model": model,
        "dataset": "imagenet", "prune_only": prune_only, "dense": dense_rep,
        "pruned": {"test_error": rep["error"], "top5_error": rep["top5_error"],
                   **{k: rep[k] for k in ("params", "nonzero_params", "compression")},
                   "weights_left": {r["name"]: r["weights_left"] for r in rep["layers"]}},
        "report": {k: rep[k] for k in ("layers", "total")}, "file_bytes": sizes,
        "dense_over_relative": round(sizes["dense"] / sizes["relative"], 2), "paper": paper,
        "checks": _checks(cfg.get("bounds", {}), rep, dense_rep["error"]),
        "provenance": {"sparsenet": __version__, "commit": commit, "weights": str(weights) if weights else "none (Caffe's initial fill, seed 0)",
                       "python": platform.python_version(), "numpy": numpy.__version__,
                       "device": resolve_device(device), "cpu": cpu_model(), "blas": blas_info(),
                       "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
        "seconds": {**seconds, "total": round(sum(seconds.values()), 1)}}
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_text_atomic(out / "report.md", format_pretrained_report(metrics, rep, x is not None))
    if progress:
        print(f"[reproduce] wrote {out / 'report.md'} ({time.time() - t_start:.0f} s this call)", file=sys.stderr)
    return {**metrics, "results_dir": str(out)}


def format_pretrained_report(m, rep, measured):
    """report.md of an ImageNet experiment: Table 1 row (top-1/top-5), per-layer table beside the paper's, sizes."""
    p, pr, d2 = m["paper"], m["pruned"], lambda v: pct(v, 2)
    ours = [f"{d2(m['dense']['error'])} / {d2(m['dense']['top5_error'])}", f"{d2(pr['test_error'])} / "
            f"{d2(pr['top5_error'])}"] if measured else ["-", "-"]
    lines = [f"# Reproduction: {m['experiment']} ({m['model']} on ImageNet)", "",
             "Pruning plan applied without data or retraining (--prune-only): counts and sizes only." * m["prune_only"],
             "", "## Table 1: error (top-1 / top-5) and parameters", "",
             md_table(["", "error before", "error after", "params before", "params after", "compression"], [
                 ["**sparsenet**", *ours, f"{pr['params']:,}", f"{pr['nonzero_params']:,}", f"{pr['compression']:.1f}×"],
                 ["paper", f"{d2(p['error_before'])} / {d2(p['top5_before'])}",
                  f"{d2(p['error_after'])} / {d2(p['top5_after'])}", f"{p['params_before'] / 1e6:g}M",
                  f"{p['params_after'] / 1e6:g}M", f"{p['compression']}×"]]), ""]
    if m["checks"]:
        lines += ["**Checks:** " + "; ".join(format_check(k, c) for k, c in m["checks"].items()) + ".", ""]
    layers = LAYERS[m["model"]]
    table = format_markdown(rep, layers).splitlines()[2:] if measured else [md_table(
        ["layer", "weights", "weights% left", "paper weights% left"],
        [[r["name"], f"{r['weights']:,}", pct(r["weights_left"]), pct(layers["rows"].get(r["name"], {}).get(
            "weights_left"))] for r in rep["layers"] + [rep["total"]]]), "",
        "(act% and FLOP% left need validation images: run without --prune-only.)"]
    lines += [f"## Per-layer table (the paper's Table {layers['table']})", "", *table, "", "## Storage", "", f"Model files of the pruned network: dense float32 (masks bit-packed) {m['file_bytes']['dense']:,} B, CSR "
              f"{m['file_bytes']['csr']:,} B, relative indices {m['file_bytes']['relative']:,} B: "
              f"**{m['dense_over_relative']:.1f}×** smaller than dense. Beyond the paper, Deep Compression's weight "
              f"sharing (8 bits for conv, 5 for FC layers, before any fine-tuning) and Huffman coding: "
              f"{m['file_bytes']['compressed']:,} B, **{m['file_bytes']['dense'] / m['file_bytes']['compressed']:.1f}×** "
              "smaller.", "", "## Provenance", "",
              f"Config `{m['config']}`; sparsenet {m['provenance']['sparsenet']} at commit `{m['provenance']['commit']}`; "
              f"weights `{m['provenance']['weights']}`; device {m['provenance']['device']}; "
              f"finished {m['provenance']['finished']}.", "",
              "Wall time (s): " + ", ".join(f"{k} {v}" for k, v in m["seconds"].items()) + ".", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- Deep Compression
def deep_compression(cfg, work, dense, x, t, out, kw, seconds):
    """Beyond the paper (Han, Mao & Dally 2016): the pruned network weight-shared and its codebooks fine-tuned
    (``quantise``: bits, retrain), written as ``model.h5`` in the compressed encoding, checked against the
    quantised checkpoint on every test image, its storage table; with ``quantise.sweep`` ({layer, bits,
    epochs}) the error of one layer shared at each width before and after fine-tuning."""
    from .compressed import storage_table
    from .modelfile import export_model, load_model

    q, qdir, progress = cfg["quantise"], work / "quantised", kw["progress"]
    sched = Schedule.from_dict({"seed": cfg["prune"].get("seed", 0), "retrain": q.get("retrain", {}),
                                "rounds": [{"quantise": q["bits"], "remove_neurons": False}]})
    _stage(progress, "Deep Compression", [(f"weight sharing and codebook fine-tuning in {qdir}", 1, lambda: _resumed(
        partial(prune_run, work / "pruned" / "checkpoint.h5"), qdir, sched, **kw), qdir, sched)], seconds, "quantise")
    net = load_checkpoint(qdir / "checkpoint.h5", dense.xp).net
    with tempfile.TemporaryDirectory() as d:
        export_model(dense, Path(d) / "dense.h5", "dense")
        dense_bytes = (Path(d) / "dense.h5").stat().st_size
    export_model(net, out / "model.h5", "compressed")
    back = load_model(out / "model.h5", dense.xp)
    predicted = back.predict(x)
    sweep = None
    if q.get("sweep"):
        sweep = _stage(progress, "bits sweep", [("one layer shared at 2-8 bits, before and after fine-tuning", 1,
                                                lambda: bits_sweep(work / "pruned" / "checkpoint.h5", q, x, t, kw))],
                       seconds, "sweep")[0]
    size = (out / "model.h5").stat().st_size
    return {"file": repo_path(out / "model.h5"), "file_bytes": size, "dense_file_bytes": dense_bytes,
            "file_ratio": dense_bytes / size, "test_error": float((predicted != t).mean()),
            "checkpoint_error": net.error(x, t), "predictions_equal": bool((predicted == net.predict(x)).all()),
            "shared": next(r["shared"] for r in _read(qdir / "log.jsonl", True) if r["event"] == "quantise"),
            "storage": storage_table(net), "sweep": sweep, "paper": DEEP_COMPRESSION.get(dense.name)}


def bits_sweep(pruned_ck, q, x, t, kw):
    """Deep Compression's bits-vs-accuracy figure on one layer: ``q["sweep"]["layer"]`` shared at each of
    ``bits`` widths (the other layers as pruned), test error before and after ``epochs`` of fine-tuning its
    codebook alone (the other layers frozen)."""
    from .data import open_splits
    from .engine import RETRAIN_DEFAULTS, train_epoch
    from .optim import SGD
    from .quantise import share_weights

    sw = q["sweep"]
    layer, out = sw["layer"], {"layer": sw["layer"], "bits": list(sw.get("bits", range(2, 9))), "before": [],
                               "after": [], "epochs": sw.get("epochs", 1)}
    xp = array_module(kw["device"])
    ck = load_checkpoint(pruned_ck, xp)
    train_split = open_splits(ck.config, ck.net, xp, kw["data_dir"], "train")["train"]
    for b in out["bits"]:
        net = load_checkpoint(pruned_ck, xp).net
        share_weights(net, {layer: b})
        out["before"].append(net.error(x, t))
        net.freeze([n for n in prunable_layers(net) if n != layer])
        opt = SGD.from_settings(net.params(), {**RETRAIN_DEFAULTS, **q.get("retrain", {})})
        rng = numpy.random.default_rng(0)
        for _ in range(out["epochs"]):
            train_epoch(net, opt, train_split, q.get("retrain", {}).get("batch_size", 64), rng)
        net.freeze(())
        out["after"].append(net.error(x, t))
    return out


def format_deep_compression(dc):
    """report.md's Deep Compression section: file sizes and error beside the published ones, the per-layer
    storage table beside Deep Compression's Table 2/3, and the bits sweep."""
    p, st, kb = dc["paper"] or {}, dc["storage"], lambda b: f"{b / 1000:,.1f} KB"
    lines = ["## Beyond the paper: Deep Compression (pruning + trained quantisation + Huffman coding)", "",
             md_table(["", "dense float32 file", "compressed file", "smaller by", "test error"], [
                 ["**sparsenet**", kb(dc["dense_file_bytes"]), kb(dc["file_bytes"]), f"**{dc['file_ratio']:.1f}×**",
                  pct(dc["test_error"], 2)]] + [["Deep Compression", kb(p["dense_bytes"]), kb(p["compressed_bytes"]),
                                                 f"{p['compression']}×", pct(p["error"], 2)]] * bool(p)), "",
             f"`{dc['file']}` (the whole network: codebooks, Huffman tables and streams, biases, HDF5 headers) "
             f"predicts {'exactly' if dc['predictions_equal'] else 'NOT'} as the quantised checkpoint on every test "
             f"image. Shared values per layer: " + ", ".join(f"{k.split('.')[0]} {v}" for k, v in dc["shared"].items())
             + ".", ""]
    rows = []
    for r in st["layers"] + [st["total"]]:
        q = (p.get("rows") or {}).get(r["layer"], {})
        rows.append([r["layer"], f"{r['weights']:,}", pct(r["density"]), f"{r.get('weight_bits', 0):.1f} / "
                     f"{r['weight_bits_coded']:.1f}", f"{r['index_bits']:.1f} / {r['index_bits_coded']:.1f}",
                     f"{r['dense_bytes']:,}", f"{r['pruned_bytes']:,}", f"{r['quantised_bytes']:,}",
                     f"{r['coded_bytes']:,}", pct(r["coded_bytes"] / r["dense_bytes"], 2),
                     *([pct(q.get("weights_left")), f"{q.get('weight_bits', '-')} / {q.get('weight_bits_coded', '-')}",
                        f"{q.get('index_bits', '-')} / {q.get('index_bits_coded', '-')}", pct(q.get("rate_coded"), 2)]
                       if p else [])])
    lines += ["Per layer (bits: fixed width / Huffman-coded, per connection; bytes with biases, before pruning → "
              "pruned (float32 values, relative indices) → quantised → coded)" + (
                  f", beside {p['source']}" if p else "") + ":", "",
              md_table(["layer", "weights", "left", "bits/weight", "bits/index", "dense B", "pruned B", "quantised B",
                        "coded B", "coded/dense", *(["paper left", "paper bits/weight", "paper bits/index",
                                                     "paper coded/dense"] if p else [])], rows), ""]
    if dc.get("sweep"):
        sw = dc["sweep"]
        lines += [f"Bits sweep on {sw['layer']} (the other layers as pruned; fine-tuning: {sw['epochs']} epoch(s) of "
                  f"its codebook alone):", "", md_table(["bits", *map(str, sw["bits"])], [
                      ["before fine-tuning", *(pct(e, 2) for e in sw["before"])],
                      ["after fine-tuning", *(pct(e, 2) for e in sw["after"])]]), ""]
    return lines
