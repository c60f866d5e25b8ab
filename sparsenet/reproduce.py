"""The paper's LeNet experiments end to end: ``sparsenet reproduce lenet-300-100``.

An experiment is a JSON file in ``reproduce/`` (the repository's folder, or any path)::

    {"experiment": "lenet-300-100",           # names the results folder
     "train": {...TrainConfig fields...},      # the dense baseline
     "prune": {...schedule...},                # sparsenet.iterative (§3.4)
     "sensitivity": {"ratios": [...]},         # Fig. 6 on the dense net (optional)
     "tradeoff": {...},                        # Fig. 5 curves (optional, see tradeoff())
     "bounds": {"max_test_error": 0.0164, "min_compression": 12}}

It runs: dense training → iterative pruning with retraining and dead-neuron removal →
the per-layer report (Tables 2/3) → figures, and writes ``reproduce/results/<experiment>/``:
``metrics.json``, ``report.md`` (our rows beside the paper's), ``fig4_pattern.png``,
``fig5_tradeoff.png``, ``fig6_sensitivity.png``. The runs themselves (checkpoints, logs)
go to ``<results>/work/``; every step resumes where a killed run stopped.
"""
import dataclasses
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy

from . import __version__
from .backend import resolve_device
from .checkpoint import load_checkpoint
from .iterative import Schedule, prune_run
from .report import PAPER, format_markdown, plot_sensitivity, report_checkpoint, sensitivity_checkpoint
from .train import TrainConfig, train
from .util import SparsenetError, atomic_path, write_text_atomic

REPRO_DIR = Path(__file__).resolve().parent.parent / "reproduce"

# Table 1 of the paper (top-1 test error, params incl. biases).
PAPER_TABLE1 = {
    "lenet-300-100": {"error_before": 0.0164, "error_after": 0.0159, "params_before": 267_000,
                      "params_after": 22_000, "compression": 12},
    "lenet-5": {"error_before": 0.0080, "error_after": 0.0077, "params_before": 431_000,
                "params_after": 36_000, "compression": 12},
}
CONFIG_KEYS = {"experiment", "description", "train", "prune", "sensitivity", "tradeoff", "bounds"}


def find_config(name):
    """A config path from an experiment name (``reproduce/<name>.json``) or a path."""
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        return path
    path = REPRO_DIR / f"{name}.json"
    if path.is_file():
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
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        # uncommitted changes to code or configs count; results being rewritten do not
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(top,exclude)reproduce/results"], cwd=Path(__file__).parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() + ("+uncommitted changes" if dirty else "")) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _say(progress, msg):
    if progress:
        print(f"[reproduce] {msg}", file=sys.stderr, flush=True)


def _prune(source, run_dir, schedule, data_dir, device, progress=False):
    """prune_run that resumes when ``run_dir`` already holds (part of) the same run."""
    _same_run(Path(run_dir) / "schedule.json", schedule.to_dict())
    resume = (Path(run_dir) / "checkpoint.h5").exists()
    return prune_run(source, run_dir, None if resume else schedule, resume=resume, data_dir=data_dir,
                     device=device, progress=progress)


def _same_run(stored, wanted):
    """A resumed step must be the run the config asks for: an edited config does not
    silently continue (or reuse) a run made with other settings."""
    have = _read_json(stored)
    if have is not None and have != json.loads(json.dumps(wanted)):
        raise SparsenetError(f"{stored.parent} was started with other settings than the config now gives; "
                             f"delete {stored.parent} (or use --out) to run the experiment again")


def _read_json(path):
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


# ----------------------------------------------------------------------------- Fig. 5
def tradeoff(dense_ckpt, work, cfg, data_dir=None, device=None, progress=True):
    """The paper's Fig. 5 on this network: accuracy loss against the fraction of weights
    pruned, for

    * L2 / L1 regularisation, without retraining (prune and evaluate),
    * L2 / L1 regularisation, with retraining (``epochs`` epochs after one prune),
    * L2, iterative (rounds of prune + retrain through the same ratios).

    ``cfg``: ``ratios`` (fractions of every layer's weights pruned, per-layer
    percentile), ``epochs``, ``retrain`` (optimiser settings), ``l1`` (L1 strength) and
    ``l1_epochs`` (fine-tuning the dense net with L1 first — the "L1 network" of the
    paper was trained with L1). Every run lives in ``work/``; done runs are reused.
    """
    ratios, epochs = list(cfg["ratios"]), int(cfg.get("epochs", 2))
    retrain = dict(cfg.get("retrain", {}), remove_neurons=False)
    l1 = float(cfg.get("l1", 1e-4))
    reg = {"L2": {}, "L1": {"l1": l1, "weight_decay": 0.0}}
    base = {"L2": dense_ckpt}
    _say(progress, f"Fig. 5: fine-tuning with L1 ({l1}) for {cfg.get('l1_epochs', 2)} epochs")
    _prune(dense_ckpt, work / "l1-base", Schedule.from_dict({"retrain": {**retrain, **reg["L1"]}, "rounds": [
        {"criterion": "percentile", "amount": 0.0, "epochs": int(cfg.get("l1_epochs", 2))}]}), data_dir, device)
    base["L1"] = work / "l1-base" / "checkpoint.h5"
    dense_error = load_json_log(work.parent / "dense")["test_error"]
    curves = {}
    for name in ("L2", "L1"):
        before, after, pruned = [], [], []
        for r in ratios:
            _say(progress, f"Fig. 5: {name}, {100 * r:.0f}% pruned")
            log = _prune(base[name], work / f"{name.lower()}-{r:.2f}", Schedule.from_dict({
                "retrain": {**retrain, **reg[name]}, "rounds": [{"criterion": "percentile", "amount": r,
                                                                "epochs": epochs}]}), data_dir, device)
            p = next(x for x in log if x["event"] == "prune")
            before.append(p["test_error"] - dense_error)
            after.append(log[-1]["test_error"] - dense_error)
            pruned.append(1 - log[-1]["weights_left"])
        curves[f"{name} w/o retrain"] = {"pruned": pruned, "loss": before}
        curves[f"{name} w/ retrain"] = {"pruned": pruned, "loss": after}
    _say(progress, "Fig. 5: L2, iterative")
    log = _prune(dense_ckpt, work / "l2-iterative", Schedule.from_dict({"retrain": retrain, "rounds": [
        {"criterion": "percentile", "amount": r, "epochs": epochs} for r in ratios]}), data_dir, device)
    rounds = [x for x in log if x["event"] == "round"]
    curves["L2 iterative prune + retrain"] = {"pruned": [1 - x["weights_left"] for x in rounds],
                                              "loss": [x["test_error"] - dense_error for x in rounds]}
    return {"dense_error": dense_error, "ratios": ratios, "epochs": epochs, "l1": l1, "curves": curves}


def load_json_log(run_dir):
    """Last record of a run's log.jsonl."""
    lines = (Path(run_dir) / "log.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def plot_tradeoff(result, path):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(6.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = {"L2 w/o retrain": ("tab:blue", "--"), "L1 w/o retrain": ("tab:orange", "--"),
              "L1 w/ retrain": ("tab:orange", "-"), "L2 w/ retrain": ("tab:blue", "-"),
              "L2 iterative prune + retrain": ("tab:red", "-")}
    for name, c in result["curves"].items():
        color, ls = styles.get(name, (None, "-"))
        ax.plot([100 * v for v in c["pruned"]], [-100 * v for v in c["loss"]], ls, color=color, marker="o", ms=3,
                label=name)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("weights pruned away (%)")
    ax.set_ylabel("accuracy change (points)")
    ax.set_ylim(bottom=max(ax.get_ylim()[0], -4.0))
    ax.set_title(f"Trade-off (dense test error {100 * result['dense_error']:.2f}%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return True


# ----------------------------------------------------------------------------- Fig. 4
def plot_pattern(net, path):
    """Fig. 4: the sparsity pattern of the first FC layer (kept connections in black)
    and, when that layer reads the image, how many connections each input pixel keeps."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    from .backend import asnumpy

    fc = next(l for l in net.layers if l.kind == "linear")
    M = asnumpy(fc.params["W"].mask)
    image = fc is net.layers[0] and len(net.input_shape) == 1 and int(numpy.sqrt(M.shape[1])) ** 2 == M.shape[1]
    fig = Figure(figsize=(10, 3.6) if image else (7, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if image else 1, 1)
    ax.imshow(M, cmap="gray_r", aspect="auto", interpolation="nearest")
    ax.set_title(f"{fc.name}: {M.shape[0]} units × {M.shape[1]} inputs, {100 * M.mean():.1f}% kept")
    ax.set_xlabel("input index")
    ax.set_ylabel("unit")
    if image:
        side = int(numpy.sqrt(M.shape[1]))
        ax2 = fig.add_subplot(1, 2, 2)
        im = ax2.imshow(M.sum(axis=0).reshape(side, side), cmap="viridis")
        ax2.set_title("connections kept per input pixel")
        ax2.axis("off")
        fig.colorbar(im, ax=ax2, fraction=0.046)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return True


# ----------------------------------------------------------------------------- the run
def reproduce(name, out=None, data_dir=None, device=None, progress=True):
    """Run (or resume) an experiment; returns its metrics (also in ``metrics.json``)."""
    cfg, cfg_path = load_config(name)
    out = Path(out) if out is not None else REPRO_DIR / "results" / cfg["experiment"]
    work = out / "work"
    t_start = time.time()
    commit = _git_commit()  # the code that runs this call (a resumed run may span several)
    # a resumed run adds to the time and commits of its earlier calls; a fresh run (no
    # work/, e.g. a clone holding only committed results) starts from nothing
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
    final_ck = pruned_dir / "checkpoint.h5"
    out.mkdir(parents=True, exist_ok=True)
    dense_rep = step("report", lambda: report_checkpoint(dense_ck, work / "dense-report", data_dir, device))
    rep = step("report", lambda: report_checkpoint(final_ck, work / "pruned-report", data_dir, device))
    figures = {}
    if plot_pattern(load_checkpoint(final_ck).net, out / "fig4_pattern.png"):
        figures["fig4"] = "fig4_pattern.png"
    sens = None
    if cfg.get("sensitivity"):
        _say(progress, "Fig. 6: sensitivity of each layer (dense network, no retraining)")
        ratios = cfg["sensitivity"].get("ratios", [round(0.1 * i, 1) for i in range(10)])
        sens = step("sensitivity", lambda: sensitivity_checkpoint(dense_ck, work / "sensitivity", ratios,
                                                                  data_dir=data_dir, device=device))
        if plot_sensitivity(sens, out / "fig6_sensitivity.png"):
            figures["fig6"] = "fig6_sensitivity.png"
    trade = None
    if cfg.get("tradeoff"):
        trade = step("tradeoff", lambda: tradeoff(dense_ck, work / "tradeoff", cfg["tradeoff"], data_dir, device,
                                                  progress))
        if plot_tradeoff(trade, out / "fig5_tradeoff.png"):
            figures["fig5"] = "fig5_tradeoff.png"
    model = tcfg.model
    metrics = {
        "experiment": cfg["experiment"], "config": str(cfg_path), "results": str(out), "model": model, "dataset": tcfg.dataset,
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
        "tradeoff": trade, "figures": figures, "paper": PAPER_TABLE1.get(model),
        "checks": _checks(cfg.get("bounds", {}), rep),
        "provenance": {"seed": tcfg.seed, "prune_seed": cfg["prune"].get("seed", 0), "sparsenet": __version__,
                       "commit": commit, "commits": sorted(set(timing.get("provenance", {}).get("commits", [])) | {commit}),
                       "python": platform.python_version(), "numpy": numpy.__version__,
                       "device": resolve_device(device), "machine": f"{platform.machine()}, {_cpus()} CPUs",
                       "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
        "seconds": {**seconds, "total": round(sum(seconds.values()), 1)},
    }
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_text_atomic(out / "report.md", format_report(metrics, rep))
    _say(progress, f"wrote {out / 'report.md'} ({time.time() - t_start:.0f} s this call)")
    return metrics


def _cpus():
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _checks(bounds, rep):
    out = {}
    if "max_test_error" in bounds:
        out["max_test_error"] = {"bound": bounds["max_test_error"], "value": rep["error"],
                                 "ok": rep["error"] <= bounds["max_test_error"]}
    if "min_compression" in bounds:
        out["min_compression"] = {"bound": bounds["min_compression"], "value": rep["compression"],
                                  "ok": rep["compression"] >= bounds["min_compression"]}
    return out


def _pct(v, d=2):
    return "–" if v is None else f"{100 * v:.{d}f}%"


def format_report(m, rep):
    """report.md: Table 1 row, per-layer table beside the paper's, figures, provenance."""
    p = m["paper"] or {}
    pr = m["pruned"]
    lines = [f"# Reproduction: {m['experiment']} ({m['model']} on {m['dataset']})", "",
             "## Table 1: error and parameters", "",
             "| | error before | error after | params before | params after | compression |",
             "|---|---|---|---|---|---|",
             f"| **sparsenet** | {_pct(m['dense']['test_error'])} | {_pct(pr['test_error'])} | {pr['params']:,} | "
             f"{pr['nonzero_params']:,} | {pr['compression']:.1f}× |"]
    if p:
        lines.append(f"| paper | {_pct(p['error_before'])} | {_pct(p['error_after'])} | {p['params_before'] // 1000}K | "
                     f"{p['params_after'] // 1000}K | {p['compression']}× |")
    lines += ["", "Params include biases (as in the paper); \"params after\" counts the surviving ones. "
              "Dead-neuron removal left these shapes: " + ", ".join(
                  f"{k} {'×'.join(map(str, v))}" for k, v in pr["shapes"].items() if k.endswith(".W")) + ".", ""]
    if m["checks"]:
        lines += ["**Checks:** " + "; ".join(
            f"{k.replace('_', ' ')} {c['bound']} → {c['value']:.4g} {'✓' if c['ok'] else '✗ NOT MET'}"
            for k, c in m["checks"].items()), ""]
    lines += ["## Per-layer table (the paper's Table 2/3)", "",
              "\n".join(format_markdown(rep, PAPER.get(m["model"])).splitlines()[2:]), "",
              "## Rounds of pruning (§3.4)", "", "| round | test error | compression | weights left per layer |",
              "|---|---|---|---|"]
    for r in m["rounds"]:
        dens = ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["density"].items())
        lines.append(f"| {r['round']} | {_pct(r['test_error'])} | {r['compression']:.1f}× | {dens} |")
    lines.append("")
    captions = {"fig4": "Fig. 4 — sparsity pattern of the first FC layer",
                "fig5": "Fig. 5 — accuracy against weights pruned: L1/L2, with/without retraining, iterative",
                "fig6": "Fig. 6 — sensitivity: one layer pruned at a time, no retraining (dense network)"}
    if m["figures"]:
        lines += ["## Figures", ""]
        for k in ("fig4", "fig5", "fig6"):
            if k in m["figures"]:
                lines += [f"**{captions[k]}**", "", f"![{k}]({m['figures'][k]})", ""]
    if m["sensitivity"]:
        s = m["sensitivity"]
        lines += ["Sensitivity (test error, one layer pruned):", "",
                  "| pruned | " + " | ".join(s["layers"]) + " |", "|---|" + "---|" * len(s["layers"])]
        for k, r in enumerate(s["ratios"]):
            lines.append(f"| {100 * r:.0f}% | " + " | ".join(_pct(v[k]) for v in s["layers"].values()) + " |")
        lines.append("")
    if m["tradeoff"]:
        t = m["tradeoff"]
        lines += ["Trade-off (accuracy change in points vs the dense net; Fig. 5):", "",
                  "| curve | " + " | ".join("pruned / Δacc" for _ in t["ratios"]) + " |",
                  "|---|" + "---|" * len(t["ratios"])]
        for name, c in t["curves"].items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * x:.1f}% / {-100 * y:+.2f}"
                                                     for x, y in zip(c["pruned"], c["loss"])) + " |")
        lines.append("")
    pv = m["provenance"]
    lines += ["## Provenance", "",
              f"Config `{Path(m['config']).name}`; dense seed {pv['seed']}, pruning seed {pv['prune_seed']}; "
              f"sparsenet {pv['sparsenet']} at commit `{pv['commit']}`; Python {pv['python']}, NumPy {pv['numpy']}; "
              f"device {pv['device']} ({pv['machine']}); finished {pv['finished']}.", "",
              "Wall time (s): " + ", ".join(f"{k} {v}" for k, v in m["seconds"].items()) + ".", ""]
    return "\n".join(lines)
