"""The paper's LeNet experiments end to end: ``sparsenet reproduce lenet-300-100``.

An experiment is a JSON file in ``reproduce/`` (or any path): ``experiment`` (the results folder's
name), ``train`` (TrainConfig fields), ``prune`` (a prune_run schedule, §3.4), optional ``sensitivity``
(Fig. 6), ``tradeoff`` (Fig. 5) and ``bounds``. Results go to ``reproduce/results/<experiment>/``
(``metrics.json`` with repository-relative paths, ``report.md``, figures), the runs to its ``work/``;
a killed run resumes.
"""
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy

from . import __version__
from .backend import array_module, blas_info, cpu_model, resolve_device
from .checkpoint import load_checkpoint
from .data import load_split
from .engine import Schedule, TrainConfig, prune_run, train
from .figures import plot_pattern, plot_sensitivity, plot_tradeoff
from .paper import LAYERS, TABLE1
from .report import format_markdown, layer_report, md_table, pct, sensitivity, sensitivity_table
from .util import SparsenetError, write_text_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent
REPRO_DIR = REPO_ROOT / "reproduce"
CONFIG_KEYS = {"experiment", "description", "train", "prune", "sensitivity", "tradeoff", "bounds"}


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
    if not isinstance(cfg, dict) or set(cfg) - CONFIG_KEYS or not {"experiment", "train", "prune"} <= set(cfg):
        raise SparsenetError(f"{path}: an experiment needs 'experiment', 'train' and 'prune' "
                             f"(allowed keys: {', '.join(sorted(CONFIG_KEYS))})")
    TrainConfig.from_dict(cfg["train"])
    Schedule.from_dict(cfg["prune"])
    return cfg, path


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


def _say(progress, msg):
    if progress:
        print(f"[reproduce] {msg}", file=sys.stderr, flush=True)


def _prune(source, run_dir, schedule, data_dir, device, progress=False):
    """prune_run, resumed when ``run_dir`` already holds (part of) the same run."""
    _same_run(Path(run_dir) / "schedule.json", schedule.to_dict())
    resume = (Path(run_dir) / "checkpoint.h5").exists()
    return prune_run(source, run_dir, None if resume else schedule, resume=resume, data_dir=data_dir,
                     device=device, progress=progress)


def _same_run(stored, wanted):
    """A resumed step must be the run the config asks for, not one made with other settings."""
    have = _read_json(stored)
    if have is not None and have != json.loads(json.dumps(wanted)):
        raise SparsenetError(f"{stored.parent} was started with other settings than the config now gives; "
                             f"delete {stored.parent} (or use --out) to run the experiment again")


def _read_json(path):
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


# ----------------------------------------------------------------------------- Fig. 5
def tradeoff(dense_ckpt, work, cfg, data_dir=None, device=None, progress=True):
    """The paper's Fig. 5 on this network: accuracy loss against weights pruned, L2 / L1 without and with
    retraining and L2 iterative. ``cfg``: ``ratios``, ``epochs``, ``retrain`` (optimiser settings), ``l1``
    and ``l1_epochs`` (L1 fine-tuning of the dense net first). Runs live in ``work/``; done ones are reused."""
    ratios, epochs, l1_epochs = list(cfg["ratios"]), int(cfg.get("epochs", 2)), int(cfg.get("l1_epochs", 2))
    retrain = dict(cfg.get("retrain", {}), remove_neurons=False)
    l1 = float(cfg.get("l1", 1e-4))
    reg = {"L2": retrain, "L1": {**retrain, "l1": l1, "weight_decay": 0.0}}

    def run(source, name, amounts, rounds_epochs=epochs):
        return _prune(source, work / name, Schedule.from_dict({"retrain": reg[name[:2].upper()], "rounds": [
            {"criterion": "percentile", "amount": a, "epochs": rounds_epochs} for a in amounts]}), data_dir, device)

    _say(progress, f"Fig. 5: fine-tuning with L1 ({l1}) for {l1_epochs} epochs")
    run(dense_ckpt, "l1-base", [0.0], l1_epochs)
    base = {"L2": dense_ckpt, "L1": work / "l1-base" / "checkpoint.h5"}
    dense_error = json.loads((work.parent / "dense" / "log.jsonl").read_text().splitlines()[-1])["test_error"]
    curves = {}
    for name in ("L2", "L1"):
        before, after, pruned = [], [], []
        for r in ratios:
            _say(progress, f"Fig. 5: {name}, {100 * r:.0f}% pruned")
            log = run(base[name], f"{name.lower()}-{r:.2f}", [r])
            p = next(x for x in log if x["event"] == "prune")
            before.append(p["test_error"] - dense_error)
            after.append(log[-1]["test_error"] - dense_error)
            pruned.append(1 - log[-1]["weights_left"])
        curves[f"{name} w/o retrain"] = {"pruned": pruned, "loss": before}
        curves[f"{name} w/ retrain"] = {"pruned": pruned, "loss": after}
    _say(progress, "Fig. 5: L2, iterative")
    rounds = [x for x in run(dense_ckpt, "l2-iterative", ratios) if x["event"] == "round"]
    curves["L2 iterative prune + retrain"] = {"pruned": [1 - x["weights_left"] for x in rounds],
                                              "loss": [x["test_error"] - dense_error for x in rounds]}
    return {"dense_error": dense_error, "ratios": ratios, "epochs": epochs, "l1": l1, "curves": curves}


# ----------------------------------------------------------------------------- the run
def reproduce(name, out=None, data_dir=None, device=None, progress=True):
    """Run (or resume) an experiment; returns its metrics (as in ``metrics.json``, plus ``results_dir``)."""
    cfg, cfg_path = load_config(name)
    out = Path(out) if out is not None else Path("runs") / cfg["experiment"]  # never the committed results
    work = out / "work"
    t_start = time.time()
    commit = _git_commit()  # the code that runs this call (a resumed run may span several)
    # a resumed run adds to its earlier calls' time and commits; a fresh one (no work/) starts from nothing
    timing = (_read_json(out / "metrics.json") if work.is_dir() else None) or {}
    seconds = dict(timing.get("seconds", {}))

    def step(key, fn):
        t0 = time.perf_counter()
        r = fn()
        seconds[key] = round(seconds.get(key, 0.0) + time.perf_counter() - t0, 1)
        return r

    dense_dir, pruned_dir = work / "dense", work / "pruned"
    tcfg = TrainConfig.from_dict(cfg["train"])
    _same_run(dense_dir / "config.json", dataclasses.asdict(tcfg))
    _say(progress, f"{cfg['experiment']}: dense training ({tcfg.epochs} epochs) in {dense_dir}")
    resume = (dense_dir / "checkpoint.h5").exists()
    step("dense", lambda: train(dense_dir, None if resume else tcfg, resume=resume, data_dir=data_dir,
                                device=device, progress=progress))
    dense_ck = dense_dir / "checkpoint.h5"
    _say(progress, f"{cfg['experiment']}: iterative pruning ({len(cfg['prune']['rounds'])} rounds) in {pruned_dir}")
    log = step("prune", lambda: _prune(dense_ck, pruned_dir, Schedule.from_dict(cfg["prune"]), data_dir, device,
                                       progress))
    out.mkdir(parents=True, exist_ok=True)
    xp = array_module(device)
    dense, pruned = (load_checkpoint(d / "checkpoint.h5", xp).net for d in (dense_dir, pruned_dir))
    x, t = load_split(tcfg.dataset, dense.input_shape, xp, data_dir, split="test")["test"]
    dense_rep = step("report", lambda: layer_report(dense, x, t=t))
    rep = step("report", lambda: layer_report(pruned, x, t=t))
    sens = trade = None
    if cfg.get("sensitivity"):
        _say(progress, "Fig. 6: sensitivity of each layer (dense network, no retraining)")
        ratios = cfg["sensitivity"].get("ratios", [round(0.1 * i, 1) for i in range(10)])
        sens = step("sensitivity", lambda: sensitivity(dense, x, t, ratios))
    if cfg.get("tradeoff"):
        trade = step("tradeoff", lambda: tradeoff(dense_ck, work / "tradeoff", cfg["tradeoff"], data_dir, device,
                                                  progress))
    figures = {k: f for k, plot, arg, f in (("fig4", plot_pattern, pruned, "fig4_pattern.png"),
                                            ("fig6", plot_sensitivity, sens, "fig6_sensitivity.png"),
                                            ("fig5", plot_tradeoff, trade, "fig5_tradeoff.png"))
               if arg is not None and plot(arg, out / f)}
    model, cpus = tcfg.model, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    metrics = {
        "experiment": cfg["experiment"], "config": repo_path(cfg_path), "results": repo_path(out), "model": model,
        "dataset": tcfg.dataset,
        "dense": {"test_error": dense_rep["error"], "params": dense_rep["params"]},
        "pruned": {"test_error": rep["error"], "params": rep["params"], "nonzero_params": rep["nonzero_params"],
                   "compression": rep["compression"],
                   "weights_left": {r["name"]: r["weights_left"] for r in rep["layers"]},
                   "shapes": next(x for x in reversed(log) if x["event"] == "round")["shapes"]},
        "report": {k: rep[k] for k in ("layers", "total")},
        "dense_report": {k: dense_rep[k] for k in ("layers", "total")},
        "rounds": [{k: x[k] for k in ("round", "test_error", "compression", "density")}
                   for x in log if x["event"] == "round"],
        "sensitivity": sens and {k: sens[k] for k in ("ratios", "layers", "baseline")},
        "tradeoff": trade, "figures": figures, "paper": TABLE1.get(model),
        "checks": _checks(cfg.get("bounds", {}), rep), "committed": _committed(cfg["experiment"], out),
        "provenance": {"seed": tcfg.seed, "prune_seed": cfg["prune"].get("seed", 0), "sparsenet": __version__,
                       "commit": commit,
                       "commits": sorted(set(timing.get("provenance", {}).get("commits", [])) | {commit}),
                       "python": platform.python_version(), "numpy": numpy.__version__,
                       "device": resolve_device(device), "machine": f"{platform.machine()}, {cpus} CPUs",
                       "cpu": cpu_model(), "blas": blas_info(),
                       "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
        "seconds": {**seconds, "total": round(sum(seconds.values()), 1)},
    }
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_text_atomic(out / "report.md", format_report(metrics, rep))
    _say(progress, f"wrote {out / 'report.md'} ({time.time() - t_start:.0f} s this call)")
    return {**metrics, "results_dir": str(out)}  # usable from the current directory; not in metrics.json


def _committed(experiment, out):
    """The committed result of the experiment (``reproduce/results/``) when this run writes elsewhere."""
    m = _read_json(REPRO_DIR / "results" / experiment / "metrics.json")
    if m is None or (REPRO_DIR / "results" / experiment).resolve() == out.resolve():
        return None
    return {"results": repo_path(REPRO_DIR / "results" / experiment), "dense_error": m["dense"]["test_error"],
            **{k: m["pruned"][k] for k in ("test_error", "nonzero_params", "compression")},
            "blas": m["provenance"].get("blas")}


def repo_path(path):
    """``path`` relative to the repository root (``reproduce/lenet-5.json``; outside it, with ``..``)."""
    return Path(os.path.relpath(Path(path).resolve(), REPO_ROOT)).as_posix()


def _checks(bounds, rep):
    """``bounds`` against the pruned net: max_test_error ≥ its error, min_compression ≤ its compression."""
    values = {"max_test_error": rep["error"], "min_compression": rep["compression"]}
    return {k: {"bound": b, "value": values[k], "ok": values[k] <= b if k.startswith("max") else values[k] >= b}
            for k, b in bounds.items() if k in values}


def format_check(key, c):
    """One check of report.md as value against bound: "test error 1.56% (bound ≤ 1.64%) ✓"."""
    text = (f"test error {pct(c['value'], 2)} (bound ≤ {pct(c['bound'], 2)})" if key == "max_test_error"
            else f"compression {c['value']:.1f}× (bound ≥ {c['bound']:g}×)")
    return text + (" ✓" if c["ok"] else " ✗ NOT MET")


CAPTIONS = {"fig4": "Fig. 4 — sparsity pattern of the first FC layer",
            "fig5": "Fig. 5 — accuracy against weights pruned: L1/L2, with/without retraining, iterative",
            "fig6": "Fig. 6 — sensitivity: one layer pruned at a time, no retraining (dense network)"}


def format_report(m, rep):
    """report.md: Table 1 row, per-layer table beside the paper's, figures, provenance."""
    p, pr, d2 = m["paper"] or {}, m["pruned"], lambda v: pct(v, 2)
    table1 = [["**sparsenet**", d2(m["dense"]["test_error"]), d2(pr["test_error"]), f"{pr['params']:,}",
               f"{pr['nonzero_params']:,}", f"{pr['compression']:.1f}×"]]
    if p:
        table1.append(["paper", d2(p["error_before"]), d2(p["error_after"]), f"{p['params_before'] // 1000}K",
                       f"{p['params_after'] // 1000}K", f"{p['compression']}×"])
    layers = LAYERS.get(m["model"])
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
                         ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["density"].items())] for r in m["rounds"]]),
              ""]
    s, t = m["sensitivity"], m["tradeoff"]
    if m["figures"] or s or t:
        lines += ["## Figures", ""]
    if s or t:
        lines += [f"The paper's Figs. 5 and 6 are measured on AlexNet (ImageNet); ours are on {m['model']} "
                  f"({m['dataset']}), so compare the shapes of the curves, not their values.", ""]
    for k in ("fig4", "fig5", "fig6"):
        if k in m["figures"]:
            lines += [f"**{CAPTIONS[k]}**", "", f"![{k}]({m['figures'][k]})", ""]
    if s:
        lines += ["Sensitivity (test error, one layer pruned):", "", md_table(*sensitivity_table(s)), ""]
    if t:
        lines += ["Trade-off (accuracy change in points vs the dense net; Fig. 5):", "",
                  md_table(["curve", *("pruned / Δacc" for _ in t["ratios"])],
                           [[name, *(f"{100 * x:.1f}% / {-100 * y:+.2f}" for x, y in zip(c["pruned"], c["loss"]))]
                            for name, c in t["curves"].items()]), ""]
    pv = m["provenance"]
    lines += ["## Provenance", "",
              f"Config `{m['config']}`; dense seed {pv['seed']}, pruning seed {pv['prune_seed']}; "
              f"sparsenet {pv['sparsenet']} at commit `{pv['commit']}`; Python {pv['python']}, NumPy {pv['numpy']}; "
              f"device {pv['device']} ({pv['machine']}; {pv.get('cpu')}; BLAS: {pv.get('blas')}); "
              f"finished {pv['finished']}.", "",
              "Wall time (s): " + ", ".join(f"{k} {v}" for k, v in m["seconds"].items()) + ".", ""]
    return "\n".join(lines)
