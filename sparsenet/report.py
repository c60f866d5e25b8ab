"""Per-layer report (the paper's Tables 2 and 3) and layer sensitivity (its Fig. 6).

One row per parametric layer (linear, conv), beside :data:`sparsenet.paper.LAYERS` (see docs/paper.md):
``weights`` and ``FLOP = 2 · MACs`` per sample are those of the dense layer it was pruned from
(``net.origin``); ``weights% left`` = surviving (mask-one) weights / origin weights;

* ``act%``: non-zero share, over the test set, of the activation the layer hands on (after ReLU,
  max-pool, dropout, flatten; the logits for the last layer), removed units counting as zeros;
* ``FLOP% left``: multiplications whose weight survives *and* whose input is non-zero, summed over
  the test set, / ``origin MACs · N`` (the image dense, zero padding zero). With ``S`` the count of
  non-zero inputs per entry: linear ``Σ_i S[i] · Σ_o M[o, i]``, conv
  ``Σ_{i,j,c} Σ_{p,q} S_pad[s·p+i, s·q+j, c] · Σ_f M[f, i, j, c]``.

Units: ``macs`` and ``macs_left`` are per image (``macs_left`` the mean over the N test images, so
``flop_left = macs_left / macs``); ``act_nonzero`` and ``act_entries`` are counts over all N images.
(``metrics.json`` files written before this rule hold ``macs_left`` summed over the images.)

Totals: weights and FLOP summed, act% = all non-zero / all activations, compression = ``params /
nonzero_params`` (with biases). Sensitivity prunes one layer at a time, without retraining.
"""
import json
import math
import os
from pathlib import Path

import numpy

from . import layers as L
from .backend import array_module, get_array_module
from .checkpoint import load_checkpoint
from .data import test_arrays
from .figures import plot_sensitivity
from .model import inference_batch
from .paper import LAYERS
from .pruning import percentile_mask, prunable_layers
from .util import SparsenetError, whole, write_text_atomic

DEFAULT_RATIOS = tuple(round(0.05 * i, 2) for i in range(20))  # 0.0, 0.05, ..., 0.95


def macs_left(layer, S):
    """Multiplications of ``layer`` with a surviving weight and a non-zero input, summed over
    the samples; ``S`` (the layer's input shape): ``S[e]`` = samples whose entry ``e`` is non-zero."""
    S, M = S.astype(numpy.int64), layer.params["W"].mask != 0
    groups = getattr(layer, "groups", 1)  # group g's filters read input channels g·C/G … (g+1)·C/G − 1
    per_weight = get_array_module(M).concatenate([m.sum(axis=0, dtype=numpy.int64)  # Σ over units
                                                  for m in M.reshape(groups, -1, *M.shape[1:])], axis=-1)
    if isinstance(layer, L.Linear):
        return int((S * per_weight).sum())
    if isinstance(layer, L.Conv2d):
        _, kh, kw, _ = layer.params["W"].data.shape
        seen = L.im2col(S[None], kh, kw, layer.stride, layer.pad).sum(axis=(0, 1, 2))  # (kh, kw, C)
        return int((seen * per_weight).sum())
    raise SparsenetError(f"layer {layer.name!r} of kind {layer.kind!r} is not supported by the report")


def _nonzero_counts(net, x, t, batch_size):
    """One batched inference pass: per parametric layer ``(S_in, S_out)`` (per entry, the samples
    where its input / the activation it hands on is non-zero; the image as dense), and the errors."""
    xp = get_array_module(x)
    S, inputs, wrong = {}, {}, 0
    for start in range(0, len(x), batch_size):
        a, cur = x[start:start + batch_size], None
        for l in net.layers:
            if "W" in l.params:
                if cur is not None:
                    S[cur] = S.get(cur, 0) + (a != 0).sum(axis=0, dtype=numpy.int64)
                inputs.setdefault(l.name, (cur, a.shape[1:]))
                cur = l.name
            a = l.forward(a, train=False)
            l.cache = None
        S[cur] = S.get(cur, 0) + (a != 0).sum(axis=0, dtype=numpy.int64)
        if t is not None:
            wrong = wrong + (a.argmax(axis=1) != t[start:start + batch_size]).sum()
    counts = {name: (S[prev] if prev is not None else xp.full(shape, len(x), dtype=numpy.int64), S[name])
              for name, (prev, shape) in inputs.items()}
    return counts, int(wrong)


def _row(name, kind, weights, survivors, macs, left, nonzero, entries, n):
    """A table row; ``macs`` per image, ``left`` summed over the ``n`` images (stored per image)."""
    return {"name": name, "kind": kind, "weights": weights, "flop": 2 * macs,
            "act": nonzero / entries if entries else 0.0,
            "weights_left": survivors / weights if weights else 0.0,
            "flop_left": left / (macs * n) if macs and n else 0.0,
            "weights_nonzero": survivors, "macs": macs, "macs_left": left / n,
            "act_nonzero": nonzero, "act_entries": entries}


def layer_report(net, x, batch_size=None, *, t=None):
    """The paper's per-layer table for ``net`` (only read) on the test inputs ``x``; with labels ``t``
    also the top-1 ``error``. Rows (``layers``, ``total``) give fractions and the counts behind them (units: the
    module docstring; ``macs`` and ``macs_left`` per image)."""
    n = len(x)
    if n == 0:
        raise SparsenetError("cannot report on an empty data set")
    counts, wrong = _nonzero_counts(net, x, t, batch_size or inference_batch(net.input_shape))
    rows, lefts = [], []
    for l in net.layers:
        if "W" not in l.params:
            continue
        S_in, S_out = counts[l.name]
        o = net.origin[l.name]
        units_now = l.params["W"].data.shape[0]
        units_origin = o["params"] - o["weights"]  # one bias per unit
        entries = n * math.prod(S_out.shape) * units_origin // units_now  # removed units as zeros
        lefts.append(macs_left(l, S_in))
        rows.append(_row(l.name, l.kind, o["weights"], l.params["W"].nonzero(), o["macs"], lefts[-1],
                         int(S_out.sum()), entries, n))
    total = _row("total", "", *(sum(r[k] for r in rows) for k in ("weights", "weights_nonzero", "macs")), sum(lefts),
                 *(sum(r[k] for r in rows) for k in ("act_nonzero", "act_entries")), n)
    params = sum(o["params"] for o in net.origin.values())
    nonzero = net.count_nonzero()
    return {"model": net.name, "samples": n, "layers": rows, "total": total, "params": params,
            "nonzero_params": nonzero, "compression": params / nonzero if nonzero else None,
            "error": wrong / n if t is not None else None}


def _batched(layers, x, batch_size, fn):
    """``concatenate([fn(layers(x[s:s+b]), s) for each batch start s])`` at inference."""
    out = []
    for start in range(0, len(x), batch_size):
        a = x[start:start + batch_size]
        for l in layers:
            a = l.forward(a, train=False)
            l.cache = None
        out.append(fn(a, start))
    return get_array_module(x).concatenate(out)


def sensitivity(net, x, t, ratios=DEFAULT_RATIOS, layers=None, batch_size=None):
    """Test error with one layer pruned to each ratio, no retraining (the paper's Fig. 6): each layer
    alone gets ``percentile_mask(W, M, r)`` and is then restored bitwise. ``layers``: {name: [errors]}."""
    ratios, layers = _ratios(ratios), _layers(net, layers)
    if len(x) == 0:
        raise SparsenetError("cannot evaluate on an empty data set")
    batch_size = batch_size or inference_batch(net.input_shape)
    baseline = net.error(x, t, batch_size)
    result = {"model": net.name, "samples": len(x), "ratios": ratios, "baseline": baseline, "layers": {}}
    for name in layers:
        i = next(k for k, l in enumerate(net.layers) if l.name == name)
        h = _batched(net.layers[:i], x, batch_size, lambda a, s: a)  # the layer's input, once
        p = net.layers[i].params["W"]
        W0, n0, errors = p.data, p.nonzero(), []
        try:
            for r in ratios:
                M = percentile_mask(W0, p.mask, r)
                if int(get_array_module(M).count_nonzero(M)) == n0:
                    errors.append(baseline)  # nothing pruned: the network as it is
                    continue
                p.data = W0 * M
                wrong = _batched(net.layers[i:], h, batch_size,
                                 lambda a, s: (a.argmax(axis=1) != t[s:s + batch_size]).sum()[None])
                errors.append(int(wrong.sum()) / len(x))
        finally:
            p.data = W0
        result["layers"][name] = errors
    return result


def pct(v, digits=1):
    """A fraction as a percentage string (\"-\" for None)."""
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def count(n, noun):
    """``n`` and ``noun``, plural unless ``n`` is 1: ``count(1, "seed")`` -> \"1 seed\"."""
    return f"{n} {noun}{'' if n == 1 else 'es' if noun.endswith('s') else 's'}"


def kept(d):
    """A kept fraction as the percentage it was asked for: 0.0185 -> \"1.85%\", 0.2 -> \"20%\", 0.031 -> \"3.1%\"."""
    return "-" if d is None else f"{100 * d:.3g}%"


def text_table(header, rows):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*map(str, r)) for r in [header, *rows])


def md_table(header, rows):
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


_COLUMNS = ["layer", "weights", "FLOP", "act%", "weights% left", "FLOP% left"]


def _report_rows(report):
    return [[r["name"], f"{r['weights']:,}", f"{r['flop']:,}", pct(r["act"]), pct(r["weights_left"]),
             pct(r["flop_left"])] for r in [*report["layers"], report["total"]]]


def _summary_line(report):
    comp = report["compression"]
    line = (f"params (incl. biases) {report['params']:,} -> {report['nonzero_params']:,} non-zero"
            f" ({comp:.1f}x compression)" if comp else f"params {report['params']:,}, none left")
    if report.get("error") is not None:
        line += f"; test error {pct(report['error'], 2)}"
    return line + f" on {report['samples']:,} images"


def format_table(report):
    """Plain-text table of :func:`layer_report` for the terminal."""
    return text_table(_COLUMNS, _report_rows(report)) + "\n" + _summary_line(report)


def format_markdown(report, paper=None):
    """Markdown table of :func:`layer_report`; ``paper`` (an entry of :data:`sparsenet.paper.LAYERS`)
    adds the paper's act%, weights% left and FLOP% left beside ours, row by row."""
    header, rows = list(_COLUMNS), _report_rows(report)
    if paper:
        header += ["paper act%", "paper weights% left", "paper FLOP% left"]
        for r in rows:
            p = paper["rows"].get(r[0], {})
            r += [pct(p.get("act")), pct(p.get("weights_left")), pct(p.get("flop_left"))]
    title = f"# Per-layer report: {report.get('model') or 'network'}" + (
        f" (`{report['checkpoint']}`)" if report.get("checkpoint") else "")
    notes = [title, "", _summary_line(report) + ".", "", md_table(header, rows), ""]
    if paper:
        notes += [f"Columns \"paper …\": {paper['source']}, as published (their network, not this one).", ""]
    notes += [("act%: non-zero share of the activation each layer hands on (after ReLU/pooling), over the "
               "test set. FLOP% left: multiplications with a surviving weight and a non-zero input, the "
               "image counted as dense. Percentages are of the dense (origin) network."), ""]
    return "\n".join(notes)


def sensitivity_table(result):
    """Header and rows of :func:`sensitivity`'s table: one row per ratio, test error per layer."""
    return (["pruned", *result["layers"]],
            [[f"{r:.2f}", *(pct(e[k], 2) for e in result["layers"].values())] for k, r in enumerate(result["ratios"])])


def format_sensitivity(result, markdown=False):
    """Table of :func:`sensitivity` (:func:`sensitivity_table`) with its baseline."""
    header, rows = sensitivity_table(result)
    base = f"unpruned test error {pct(result['baseline'], 2)} on {result['samples']:,} images"
    if markdown:
        return (f"# Sensitivity: {result.get('model') or 'network'}, one layer pruned at a time, no retraining\n\n"
                f"{md_table(header, rows)}\n\n\"pruned\": fraction of the layer's weights pruned (counting "
                f"those pruned already); {base}.\n")
    return text_table(header, rows) + "\n" + base


def _on_checkpoint(checkpoint, out, data_dir, device, stem, compute, markdown):
    """``compute(net, x, t, out)`` on a checkpoint's test split, headed by the checkpoint and dataset,
    written as ``<stem>.json`` and ``<stem>.md`` (``markdown(record)``) into ``out`` (default: its folder)."""
    xp = array_module(device)
    ck = load_checkpoint(checkpoint, xp)
    dataset = ck.config.get("dataset", "mnist")
    x, t = test_arrays(ck.config, ck.net, xp, data_dir)
    out = Path(out) if out is not None else Path(checkpoint).parent
    record = {"checkpoint": str(checkpoint), "dataset": dataset, **compute(ck.net, x, t, out)}
    record["files"] = [str(out / f"{stem}.json"), str(out / f"{stem}.md"), *record.get("files", [])]
    write_text_atomic(out / f"{stem}.json", json.dumps(record, indent=2) + "\n")
    write_text_atomic(out / f"{stem}.md", markdown(record))
    return record


def report_checkpoint(checkpoint, out=None, data_dir=None, device=None):
    """:func:`layer_report` of a checkpoint on its dataset's test split; writes
    ``report.json`` and ``report.md`` into ``out`` (default: the checkpoint's folder)."""
    return _on_checkpoint(checkpoint, out, data_dir, device, "report", lambda net, x, t, _: layer_report(net, x, t=t),
                          lambda rep: format_markdown(rep, LAYERS.get(rep["model"])))


def sensitivity_checkpoint(checkpoint, out=None, ratios=DEFAULT_RATIOS, layers=None, data_dir=None, device=None, *,
                           scheduler=None, serial=None, workers=None, progress=False, timeout=10.0, threads=1):
    """:func:`sensitivity` of a checkpoint on its whole test split, one task per (layer, ratio) cell of the grid
    run by the sweep engine (:func:`sparsenet.sweeps.execute`): in this process by default, on an embedded Dask
    cluster with ``workers``, on an existing one with ``scheduler`` (or ``$SPARSENET_SCHEDULER``). Every cell
    runs with one BLAS thread, so the numbers are the same wherever it ran. Writes ``sensitivity.json``,
    ``sensitivity.md`` and, with matplotlib, ``sensitivity.png`` into ``out`` (default: the checkpoint's folder).

    Parameters
    ----------
    serial : bool, optional
        True: this process; None (default): this process unless ``scheduler``, ``workers`` or
        ``$SPARSENET_SCHEDULER`` ask for Dask.
    threads : int
        BLAS threads of every cell (default 1: the same numbers in this process and on any worker).
    """
    from . import sweeps

    if serial is None:
        serial = scheduler is None and workers is None and not os.environ.get("SPARSENET_SCHEDULER")
    scheduler = sweeps.engine_options(scheduler, serial, workers)
    checkpoint = Path(checkpoint).absolute()
    ck = load_checkpoint(checkpoint)  # checked here, before any task: its layers name the grid
    ratios = _ratios(ratios)
    layers = _layers(ck.net, layers)
    out = Path(out) if out is not None else checkpoint.parent
    where = dict(checkpoint=str(checkpoint), data_dir=None if data_dir is None else str(
        Path(data_dir).expanduser().absolute()), device=device, threads=whole(threads, "threads", 1), deps=[],
        weight=1)
    jobs = [{**where, "task": "baseline", "layer": None, "ratio": 0.0}] + [
        {**where, "task": f"{n}@{r!r}", "layer": n, "ratio": r} for n in layers for r in ratios]  # repr: unique
    records = {}
    with sweeps.task_engine(scheduler, serial, workers, len(jobs), timeout, sweeps._say("sensitivity", progress)) \
            as (client, ran):
        sweeps.execute(client, jobs, records, sensitivity_cell,
                       sweeps.Progress(jobs, len(jobs), 0, progress, "sensitivity"))
    if records["baseline"]["status"] != "ok":  # the checkpoint or its data: every cell fails alike
        raise SparsenetError(records["baseline"]["reason"])
    failed = [r for r in records.values() if r["status"] != "ok"]
    if failed:
        raise SparsenetError(f"sensitivity: {failed[0]['task']} failed: {failed[0]['reason']}" + (
            f" (and {len(failed) - 1} more cells)" if len(failed) > 1 else ""))
    base = records["baseline"]
    res = {"checkpoint": str(checkpoint), "dataset": ck.config.get("dataset", "mnist"), "model": ck.net.name,
           "samples": base["samples"], "ratios": ratios, "baseline": base["test_error"], "where": ran,
           "layers": {n: [base["test_error"] if records[f"{n}@{r!r}"]["test_error"] is None else
                          records[f"{n}@{r!r}"]["test_error"] for r in ratios] for n in layers}}
    png = out / "sensitivity.png"
    res["files"] = [str(out / "sensitivity.json"), str(out / "sensitivity.md")] + (
        [str(png)] if plot_sensitivity(res, png) else [])
    write_text_atomic(out / "sensitivity.json", json.dumps(res, indent=2) + "\n")
    write_text_atomic(out / "sensitivity.md", format_sensitivity(res, markdown=True))
    return res


_CELL_INPUTS = {}  # per process (a Dask worker): the last checkpoint's network and test split


def sensitivity_cell(job):
    """One cell of the sensitivity grid, a task of the sweep engine: the test error on the whole test split of
    ``job["checkpoint"]`` with layer ``job["layer"]`` pruned to ``job["ratio"]`` (``percentile_mask``, no
    retraining; restored after), or of the network as it is (layer None). ``test_error`` is None when the ratio
    prunes nothing more (the network as it is). The network and data are read once per process. Returns a
    record, never raises (a failure is recorded with its reason)."""
    from threadpoolctl import threadpool_limits

    from .imagenet import evaluate
    from .data import ArraySplit, open_splits
    from .sweeps import failed_record, one_line

    try:
        with threadpool_limits(job["threads"], user_api="blas"):
            path, xp = Path(job["checkpoint"]), array_module(job["device"])
            st = path.stat()
            key = (str(path), st.st_mtime_ns, st.st_size, job["data_dir"], job["device"])
            if key not in _CELL_INPUTS:
                _CELL_INPUTS.clear()
                ck = load_checkpoint(path, xp)
                _CELL_INPUTS[key] = ck.net, open_splits(ck.config, ck.net, xp, job["data_dir"], "test")["test"]
            net, split = _CELL_INPUTS[key]
            batch = inference_batch(net.input_shape)
            if len(split) == 0:
                raise SparsenetError("cannot evaluate on an empty data set")
            if job["layer"] is not None:
                p = next(l for l in net.layers if l.name == job["layer"]).params["W"]
                W0, M = p.data, percentile_mask(p.data, p.mask, job["ratio"])
                if int(get_array_module(M).count_nonzero(M)) == p.nonzero():
                    return {**_cell_id(job), "status": "ok", "test_error": None, "samples": len(split)}
                p.data = W0 * M
            try:
                error = net.error(split.x, split.t, batch) if isinstance(split, ArraySplit) else evaluate(
                    net, split, batch, xp)["top1"]
            finally:
                if job["layer"] is not None:
                    p.data = W0
        return {**_cell_id(job), "status": "ok", "test_error": error, "samples": len(split)}
    except Exception as e:  # recorded; the caller reports the first failure in one line
        return failed_record(job, one_line(e))


def _cell_id(job):
    return {k: job[k] for k in ("task", "layer", "ratio")}


def _ratios(ratios):
    try:
        ratios = [float(r) for r in ratios]
    except (TypeError, ValueError):
        raise SparsenetError(f"pruning ratios must be numbers in [0, 1], got {ratios!r}") from None
    if not ratios or not all(0.0 <= r <= 1.0 for r in ratios):
        raise SparsenetError(f"pruning ratios must be numbers in [0, 1], got {ratios}")
    return ratios


def _layers(net, layers):
    allowed = prunable_layers(net)
    layers = list(allowed if layers is None else layers)
    unknown = [n for n in layers if n not in allowed]
    if unknown:
        raise SparsenetError(f"no prunable layer named {', '.join(unknown)} (prunable: {', '.join(allowed)})")
    return layers
