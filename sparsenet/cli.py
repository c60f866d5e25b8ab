"""Command line: ``sparsenet {train,eval,summary}`` (also ``python -m sparsenet``).

Errors a user can act on are printed as one line ``sparsenet: error: …`` with exit
status 2; an interrupted training run says how to resume it.
"""
import argparse
import json
import sys

from .model import MODELS, build_model
from .util import SparsenetError


def _add_common(p):
    p.add_argument("--device", choices=("cpu", "gpu"), default=None,
                   help="array backend (default: $SPARSENET_DEVICE, else cpu)")
    p.add_argument("--data-dir", default=None,
                   help="directory holding mnist/ (and fashion-mnist/) (default: $SPARSENET_DATA, else ./data)")


def build_parser():
    from .train import TrainConfig

    d = TrainConfig()
    ap = argparse.ArgumentParser(prog="sparsenet", description=(
        "Learning both weights and connections (Han et al. 2015): train, prune, retrain."))
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a dense network (Caffe's MNIST solver by default)")
    p.add_argument("--model", choices=sorted(MODELS), default=d.model)
    p.add_argument("--out", required=True, help="run directory (config.json, log.jsonl, checkpoint.h5)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--dataset", default=d.dataset, help="mnist or fashion-mnist")
    p.add_argument("--epochs", type=int, default=None, help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help=f"base learning rate (default {d.lr})")
    p.add_argument("--lr-policy", choices=("fixed", "step", "inv"), default=d.lr_policy)
    p.add_argument("--gamma", type=float, default=None,
                   help="gamma of the step/inv policies (default: step 0.1, inv 1e-4)")
    p.add_argument("--power", type=float, default=d.power, help="power of the inv policy")
    p.add_argument("--step-size", type=int, default=d.step_size,
                   help=f"iterations per step of the step policy (default {d.step_size} = 7 epochs at batch 64)")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 strength")
    p.add_argument("--l1", type=float, default=d.l1, help="L1 strength")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--train-subset", type=int, default=0, help="use only the first N training images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    _add_common(p)

    p = sub.add_parser("eval", help="test error of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_common(p)

    p = sub.add_parser("summary", help="per-layer shapes and parameter counts")
    p.add_argument("checkpoint", nargs="?", help="a checkpoint (or use --model)")
    p.add_argument("--model", choices=sorted(MODELS))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_sparse_parsers(sub)
    return ap


def cmd_train(a):
    from .train import TrainConfig, train

    if a.resume:
        log = train(a.out, resume=True, data_dir=a.data_dir, device=a.device,
                    progress=not a.no_progress, epochs=a.epochs)
    else:
        cfg = TrainConfig(model=a.model, dataset=a.dataset, epochs=TrainConfig.epochs if a.epochs is None else a.epochs,
                          batch_size=a.batch_size, lr=a.lr, momentum=a.momentum, weight_decay=a.weight_decay,
                          l1=a.l1, lr_policy=a.lr_policy, gamma=a.gamma, power=a.power,
                          step_size=a.step_size, seed=a.seed, train_subset=a.train_subset)
        log = train(a.out, cfg, data_dir=a.data_dir, device=a.device, progress=not a.no_progress)
    if log:
        r = log[-1]
        print(f"{a.out}: epoch {r['epoch']}, test error {100 * r['test_error']:.2f}%")


def cmd_eval(a):
    from .train import evaluate

    r = evaluate(a.checkpoint, a.data_dir, a.device)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{r['checkpoint']}: {r['model']} epoch {r['epoch']}  test error {100 * r['test_error']:.2f}%  "
              f"params {r['params']:,} (non-zero {r['nonzero_params']:,})")


def cmd_summary(a):
    if (a.checkpoint is None) == (a.model is None):
        raise SparsenetError("summary needs either a CHECKPOINT or --model NAME (not both)")
    if a.model:
        net = build_model(a.model)
    else:
        from .checkpoint import load_checkpoint

        net = load_checkpoint(a.checkpoint).net
    rows = net.summary()
    total = {"params": net.count_params(), "nonzero_params": net.count_nonzero(),
             "macs": sum(r["macs"] for r in rows)}
    if a.json:
        print(json.dumps({"model": net.name, "input_shape": list(net.input_shape), "layers": rows, **total}))
        return
    fmt = "{:<8} {:<10} {:>14} {:>14} {:>12} {:>10} {:>12}"
    print(fmt.format("layer", "kind", "output", "weight", "params", "non-zero", "MACs/sample"))
    for r in rows:
        print(fmt.format(r["name"], r["kind"], "x".join(map(str, r["output_shape"])),
                         "x".join(map(str, r["weight_shape"] or [])) or "-",
                         f"{r['params']:,}", f"{r['nonzero_params']:,}", f"{r['macs']:,}"))
    print(fmt.format("total", "", "", "", f"{total['params']:,}", f"{total['nonzero_params']:,}", f"{total['macs']:,}"))


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "summary": cmd_summary}


# ----------------------------------------------------------------------------- export, predict
def _add_sparse_parsers(sub):
    from .sparse import ENCODINGS

    p = sub.add_parser("export", help="write a model file (dense, CSR or relative-index sparse) and its storage table")
    p.add_argument("checkpoint", help="a checkpoint (or a model file)")
    p.add_argument("out", nargs="?", help="model file to write (HDF5)")
    p.add_argument("--format", choices=ENCODINGS, default="relative", help="encoding of the weights (default relative)")
    p.add_argument("--report", action="store_true",
                   help="write nothing: print the storage table and the on-disk size of all three formats")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("predict", help="test error of a model file (or checkpoint), pruned layers run sparse")
    p.add_argument("model")
    p.add_argument("--mode", choices=("auto", "dense", "sparse"), default="auto",
                   help="per-layer choice by density and batch size (auto), or force one")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--dataset", default="mnist", help="mnist or fashion-mnist")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_common(p)


def cmd_export(a):
    from pathlib import Path

    from .sparse import export_model, export_sizes, load_model, storage_report

    if (a.out is None) != a.report:
        raise SparsenetError("export needs an output file OUT.h5, or --report (which writes nothing)")
    net = load_model(a.checkpoint)
    r = {"checkpoint": a.checkpoint, **storage_report(net)}
    if a.report:
        r["file_bytes"] = export_sizes(net)
    else:
        export_model(net, a.out, a.format)
        r.update(out=a.out, format=a.format, file_bytes={a.format: Path(a.out).stat().st_size})
    if a.json:
        print(json.dumps(r))
        return
    fmt = "{:<8} {:>9} {:>9} {:>7} {:>11} {:>11} {:>11} {:>8} {:>8} {:>7} {:>7}"
    print(fmt.format("layer", "weights", "non-zero", "density", "dense B", "CSR B", "relative B",
                     "CSR idx", "rel idx", "CSR x", "rel x"))
    for row in r["layers"] + [r["total"]]:
        print(fmt.format(row["layer"], f"{row['weights']:,}", f"{row['nonzero']:,}", f"{100 * row['density']:.1f}%",
                         f"{row['dense_bytes']:,}", f"{row['csr_bytes']:,}", f"{row['relative_bytes']:,}",
                         f"{row['csr_overhead_pct']:.1f}%", f"{row['relative_overhead_pct']:.1f}%",
                         f"{row['ratio_csr']:.1f}", f"{row['ratio_relative']:.1f}"))
    sizes = r["file_bytes"]
    print("on disk: " + ", ".join(f"{k} {v:,} B" for k, v in sizes.items())
          + (f"  (dense/relative {sizes['dense'] / sizes['relative']:.2f}x)" if len(sizes) == 3 else f"  -> {a.out}"))


def cmd_predict(a):
    import time

    from .backend import array_module
    from .sparse import SparseNetwork, load_model
    from .train import load_split

    if a.batch_size < 1:
        raise SparsenetError(f"--batch-size must be >= 1, got {a.batch_size}")
    xp = array_module(a.device)
    net = load_model(a.model, xp)
    x, t = load_split(a.dataset, net.input_shape, xp, a.data_dir, split="test")["test"]
    snet = SparseNetwork(net, a.mode)
    t0 = time.perf_counter()
    error = float((snet.predict(x, a.batch_size) != t).mean())
    r = {"model": a.model, "test_error": error, "n_test": len(t), "mode": a.mode,
         "layers": snet.plan(a.batch_size), "seconds": time.perf_counter() - t0}
    if a.json:
        print(json.dumps(r))
        return
    plan = "; ".join(f"{k} {', '.join(n for n, v in r['layers'].items() if v == k) or '-'}" for k in ("sparse", "dense"))
    print(f"{a.model}: test error {100 * error:.2f}% on {len(t):,} images ({plan}; {r['seconds']:.2f} s)")


COMMANDS.update(export=cmd_export, predict=cmd_predict)


def main(argv=None):
    a = build_parser().parse_args(argv)
    try:
        COMMANDS[a.command](a)
    except SparsenetError as e:
        print(f"sparsenet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        msg = "sparsenet: interrupted"
        if a.command == "train":
            msg += f"; the last finished epoch is saved, continue with: sparsenet train --out {a.out} --resume"
        print(msg, file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
