"""Command line: ``sparsenet {train,prune,eval,summary,…}`` (also ``python -m sparsenet``).

Errors a user can act on are printed as one line ``sparsenet: error: …`` with exit
status 2; an interrupted training run says how to resume it.
"""
import argparse
import json
import sys
from pathlib import Path

from .backend import DEVICES, set_threads
from .model import MODELS, build_model
from .optim import POLICIES, SETTINGS
from .util import SparsenetError

MODEL_FORMS = f"{', '.join(MODELS)}, or a network description FILE.json|FILE.toml (docs/networks.md)"


def _add_engine(p, default):
    """Where the tasks of a sweep, a sensitivity grid or the seeds of a reproduction run (docs/sweeps.md)."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--scheduler", help="address of a running Dask scheduler, e.g. tcp://10.0.0.5:8786 "
                                           f"(default: $SPARSENET_SCHEDULER, else {default})")
    where.add_argument("--serial", action="store_true", help="run the tasks one by one in this process")
    p.add_argument("--workers", type=int, help="worker processes of an embedded Dask cluster (default: one per core)")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for --scheduler (default 10)")


def _add_common(p, json=True, data=True):
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="array backend (default: $SPARSENET_DEVICE, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="BLAS threads (default: $SPARSENET_THREADS, else 1)")
    if data:
        p.add_argument("--data-dir", default=None,
                       help="directory holding mnist/ (and fashion-mnist/) (default: $SPARSENET_DATA, else ./data)")
    if json:
        p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_optim(p, d):
    """The optimiser settings (one vocabulary: :data:`sparsenet.optim.SETTINGS`) with defaults ``d``."""
    p.add_argument("--lr", type=float, default=d["lr"], help=f"base learning rate (default {d['lr']})")
    p.add_argument("--lr-policy", choices=POLICIES, default=d["lr_policy"], help=f"default {d['lr_policy']}")
    p.add_argument("--gamma", type=float, default=None,
                   help="gamma of the step/inv policies (default: step 0.1, inv 1e-4)")
    p.add_argument("--power", type=float, default=d["power"], help="power of the inv policy")
    step = p.add_mutually_exclusive_group()
    step.add_argument("--step-epochs", type=float, default=d["step_epochs"],
                      help=f"epochs per step of the step policy (default {d['step_epochs']:g})")
    step.add_argument("--step-size", type=int, default=None, action=_StepSize,
                      help="iterations per step of the step policy, instead of --step-epochs")
    p.add_argument("--momentum", type=float, default=d["momentum"])
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="L2 strength (§3.1)")
    p.add_argument("--l1", type=float, default=d["l1"], help="L1 strength (§3.1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    _add_common(p, json=False)


class _StepSize(argparse.Action):
    """``--step-size N``: the step policy's length in iterations, which replaces the default ``--step-epochs``."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.step_size = values
        if hasattr(namespace, "step_epochs"):  # not there when only explicit options are read (_given)
            namespace.step_epochs = None


class _Parser(argparse.ArgumentParser):
    """argparse with the package's one-line errors (``sparsenet: error: …``, exit 2)."""

    def error(self, message):
        self.exit(2, f"sparsenet: error: {message} (see: {self.prog} --help)\n")


def build_parser():
    import dataclasses

    from . import __version__
    from .data import DATASET_FORMS
    from .engine import QUANTISE_DEFAULTS, RETRAIN_DEFAULTS, TrainConfig
    from .modelfile import ENCODINGS
    from .pruning import CRITERIA

    ap = _Parser(prog="sparsenet", description=(
        "Learning both weights and connections (Han et al. 2015): train, prune, retrain."))
    ap.add_argument("--version", action="version", version=f"sparsenet {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = dataclasses.asdict(TrainConfig())
    p = sub.add_parser("train", help="train a dense network (sparsenet's defaults; Caffe's solver with "
                                     "--lr 0.01 --lr-policy inv --epochs 11)")
    p.add_argument("--model", default=d["model"], help=f"{MODEL_FORMS} (default {d['model']})")
    p.add_argument("--out", required=True, help="run directory (config.json, log.jsonl, checkpoint.h5)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--dataset", default=d["dataset"], help=f"{DATASET_FORMS} (docs/data.md; default {d['dataset']})")
    p.add_argument("--preprocess", help="image folders: KEY=VALUE,... or JSON, keys mode (unit|caffe|torch), size, "
                                        "resize, grayscale, mirror (docs/data.md)")
    p.add_argument("--epochs", type=int, default=None, help=f"default {d['epochs']}")
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--train-subset", type=int, default=0, help="use only the first N training images")
    _add_optim(p, d)

    p = sub.add_parser("prune", help="iterative pruning: rounds of prune -> retrain (§3.4)",
                       description="Prune a trained checkpoint iteratively. Give a schedule file (JSON/TOML, "
                                   "see sparsenet.engine) or inline JSON with --schedule, or build N equal "
                                   "rounds from --criterion/--amount/--rounds and the retraining options.")
    p.add_argument("checkpoint", nargs="?", help="trained checkpoint to prune (not needed with --resume)")
    p.add_argument("--out", required=True, help="run directory (schedule.json, log.jsonl, checkpoint.h5)")
    p.add_argument("--resume", action="store_true", help="continue the pruning run in --out")
    p.add_argument("--schedule", help="schedule file (.json/.toml) or inline JSON object")
    p.add_argument("--criterion", choices=CRITERIA, default="quality",
                   help="quality: |w| < q*std pruned (the paper's rule); percentile: per-layer target "
                        "sparsity; global: one threshold for all layers (default quality)")
    p.add_argument("--amount", default="1.0",
                   help="q, or target sparsity as a fraction of the original layer; per layer as "
                        "fc1=0.92,fc2=0.91,default=0.8 (default 1.0)")
    p.add_argument("--rounds", type=int, default=1,
                   help="number of prune/retrain rounds; percentile/global targets are reached in equal ratios")
    p.add_argument("--epochs", type=int, default=RETRAIN_DEFAULTS["epochs"],
                   help=f"retraining epochs per round (default {RETRAIN_DEFAULTS['epochs']})")
    p.add_argument("--batch-size", type=int, default=RETRAIN_DEFAULTS["batch_size"])
    p.add_argument("--freeze", default="", help="comma-separated layers to keep fixed while retraining (§3.3)")
    p.add_argument("--keep-dead-neurons", action="store_true", help="do not remove dead neurons (§3.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the retraining data order")
    _add_optim(p, RETRAIN_DEFAULTS)

    p = sub.add_parser("quantise", help="Deep Compression: share each pruned layer's weights (k-means) and "
                                        "fine-tune the shared values",
                       description="Cluster each pruned layer's surviving weights into 2**bits shared values (k-means, "
                                   "linear initialisation), then retrain the codebooks (each shared value moves by the "
                                   "sum of its weights' gradients). Pruned connections stay pruned. Export the result "
                                   "with `sparsenet export CK OUT.h5 --format compressed` (Huffman-coded).")
    p.add_argument("checkpoint", nargs="?", help="pruned checkpoint (not needed with --resume)")
    p.add_argument("--out", required=True, help="run directory (schedule.json, log.jsonl, checkpoint.h5)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--bits", default=None, help="bits per layer: a number, or fc1=6,fc2=6,default=5 (default: "
                                                "8 for conv and 5 for FC layers, Deep Compression's choice)")
    p.add_argument("--epochs", type=int, default=QUANTISE_DEFAULTS["epochs"],
                   help=f"codebook fine-tuning epochs (default {QUANTISE_DEFAULTS['epochs']})")
    p.add_argument("--batch-size", type=int, default=RETRAIN_DEFAULTS["batch_size"])
    p.add_argument("--seed", type=int, default=0, help="seed of the fine-tuning data order")
    _add_optim(p, {**RETRAIN_DEFAULTS, **QUANTISE_DEFAULTS})

    p = sub.add_parser("report", help="per-layer table: weights, FLOP, act%%, weights%% and FLOP%% left (Tables 2-3)")
    p.add_argument("checkpoint")
    p.add_argument("--out", help="folder for report.json and report.md (default: the checkpoint's folder)")
    p.add_argument("--force", action="store_true", help="overwrite an earlier report there")
    _add_common(p)

    p = sub.add_parser("sensitivity", help="test error with one layer pruned at a time, no retraining (Fig. 6)")
    p.add_argument("checkpoint")
    p.add_argument("--ratios", help="comma-separated fractions of a layer's weights to prune "
                                    "(default 0,0.05,...,0.95)")
    p.add_argument("--layers", help="comma-separated layers (default: every prunable layer)")
    p.add_argument("--out", help="folder for sensitivity.json/.md/.png (default: the checkpoint's folder)")
    p.add_argument("--force", action="store_true", help="overwrite an earlier sensitivity sweep there")
    _add_engine(p, "this process; --workers N: an embedded Dask cluster")
    p.add_argument("--no-progress", action="store_true")
    _add_common(p)

    p = sub.add_parser("reproduce", help="rerun one of the paper's experiments end to end",
                       description="LeNets: dense training, iterative pruning with retraining, dead-neuron removal, "
                                   "per-layer report and figures, written to runs/EXPERIMENT/ and compared with the "
                                   "committed reproduce/results/EXPERIMENT/. AlexNet, VGG-16: trained weights "
                                   "imported (--weights), the paper's plan run on ImageNet (--imagenet). A killed "
                                   "run resumes when started again.")
    p.add_argument("experiment", help="lenet-300-100, lenet-5, alexnet, vgg-16, … (a config in reproduce/) or a .json")
    p.add_argument("--out", help="results folder (default runs/EXPERIMENT)")
    p.add_argument("--weights", help="AlexNet/VGG-16: trained weights to start from (.onnx or .safetensors)")
    p.add_argument("--imagenet", help="AlexNet/VGG-16: the ILSVRC-2012 folder (train/, val/); same as --data-dir")
    p.add_argument("--prune-only", action="store_true",
                   help="AlexNet/VGG-16: apply the plan's pruning without data or retraining (counts and sizes)")
    p.add_argument("--seeds", help="LeNets: rerun over seeds, N (0..N-1) or a list 0,3,7, one task per seed on Dask "
                                   "(docs/sweeps.md); results as mean ± sd with 95%% intervals in runs/EXPERIMENT-seeds")
    _add_engine(p, "an embedded cluster; with --seeds")
    p.add_argument("--no-progress", action="store_true")
    _add_common(p, json=False)

    p = sub.add_parser("import", help="weights (.safetensors in torch's layout; AlexNet/VGG-16 .onnx, .safetensors) "
                                      "into a checkpoint",
                       description="Reads a .safetensors file in torch's state-dict layout (plain, or "
                                   "torch.nn.utils.prune's weight_orig/weight_mask; `sparsenet export --format torch` "
                                   "writes one) for any network, and for alexnet/vgg-16 also the ONNX model zoo's "
                                   "bvlcalexnet/vgg16 files and torchvision/timm VGG-16 .safetensors (tensors only: no "
                                   "code from the file runs) into a sparsenet checkpoint, checking every tensor against "
                                   "the network. See docs/interop.md.")
    p.add_argument("file")
    p.add_argument("--model", required=True, help=MODEL_FORMS)
    p.add_argument("--out", required=True, help="checkpoint to write")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--apply-masks", action="store_true",
                   help="zero weight_orig where weight_mask prunes (torch's prune keeps the values there)")

    p = sub.add_parser("eval", help="test error of a checkpoint")
    p.add_argument("checkpoint")
    _add_common(p)

    p = sub.add_parser("summary", help="per-layer shapes and parameter counts")
    p.add_argument("checkpoint", nargs="?", help="a checkpoint (or use --model)")
    p.add_argument("--model", help=MODEL_FORMS)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("export", help="write a model file (dense, CSR or relative-index sparse) and its storage "
                                      "table, or an ONNX model or torch tensors (safetensors)")
    p.add_argument("checkpoint", help="a checkpoint (or a model file)")
    p.add_argument("out", nargs="?", help="file to write: a model file (HDF5), .onnx or .safetensors")
    p.add_argument("--format", choices=(*ENCODINGS, "onnx", "torch"), default=None,
                   help="encoding of the weights, or onnx / torch (docs/interop.md) (default: onnx for OUT.onnx, "
                        "torch for OUT.safetensors, else relative)")
    p.add_argument("--sparse-initializers", action="store_true",
                   help="onnx: store each weight as a sparse initializer (its connections only)")
    p.add_argument("--layout", choices=("pruned", "dense"), default=None,
                   help="torch: weight_orig + weight_mask as torch.nn.utils.prune keeps them (pruned, the "
                        "default) or plain weight")
    p.add_argument("--report", action="store_true",
                   help="write nothing: print the storage table, the on-disk size of each model-file encoding "
                        "(dense, csr, relative; compressed for a quantised network) and dense/relative (or "
                        "/compressed) of this network's own files. After dead-neuron removal its dense file is "
                        "smaller than the unpruned network's, so that ratio is below the README's (the unpruned "
                        "network's dense file over the relative one) and below the compression prune prints "
                        "(parameters over non-zero parameters)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("predict", help="test error of a model file (or checkpoint), pruned layers run sparse")
    p.add_argument("model")
    p.add_argument("--mode", choices=("auto", "dense", "sparse"), default="auto",
                   help="per-layer choice by density and batch size (auto), or force one")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--dataset", default="mnist", help=f"{DATASET_FORMS} (docs/data.md; default mnist)")
    _add_common(p)

    p = sub.add_parser("sweep", help="a pruning study over seeds, methods and densities, on Dask (docs/sweeps.md)",
                       description="Runs the SPEC's task graph (a dense training per network, data set and seed, then "
                                   "each pruning method at each kept fraction from it) on an embedded Dask cluster, "
                                   "an existing one (--scheduler) or in this process (--serial), and writes "
                                   "sweep.json, report.md and a figure: errors over seeds with 95% intervals, "
                                   "paired comparisons, the paper's claims. A rerun skips finished tasks and "
                                   "resumes interrupted ones.")
    p.add_argument("spec", help="the study: a .json or .toml file (docs/sweeps.md)")
    p.add_argument("--out", help="sweep folder (default runs/NAME)")
    _add_engine(p, "an embedded cluster")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="array backend of every task (default: $SPARSENET_DEVICE, else cpu)")
    p.add_argument("--data-dir", default=None,
                   help="directory holding mnist/ on every worker (default: each worker's $SPARSENET_DATA, else ./data)")
    return ap


# Options that say where and how a command runs, not what it computes: --resume may repeat them.
_NOT_SETTINGS = {"command", "out", "resume", "device", "threads", "data_dir", "no_progress", "json"}


def _given(argv):
    """The destinations of the options and arguments given on the command line ``argv``, in order (argparse
    fills the others with defaults, so they are read from a second parse with every default suppressed)."""
    ap = build_parser()
    for sub in (a for a in ap._actions if isinstance(a, argparse._SubParsersAction)):
        for parser in sub.choices.values():
            for action in parser._actions:
                action.default = argparse.SUPPRESS
    return list(vars(ap.parse_args(argv)))


def _refuse_unused(a, why, allowed=()):
    """Refuse, in one line naming them, the options given on the command line that ``why`` leaves unused
    (all but :data:`_NOT_SETTINGS` and ``allowed``): an option is applied or refused, never ignored."""
    unused = [d for d in getattr(a, "given", ()) if d not in _NOT_SETTINGS and d not in allowed]
    if unused:
        names = ", ".join("CHECKPOINT" if d == "checkpoint" else "--" + d.replace("_", "-") for d in unused)
        raise SparsenetError(f"{names}: not used {why}")


_RESUMED = ("with --resume: a run continues from its checkpoint with the settings it started with{}; start a new "
            "run with another --out to change them")


def cmd_train(a):
    from .engine import TrainConfig, train

    if a.resume:
        _refuse_unused(a, _RESUMED.format(" (a training run may get more --epochs)"), allowed={"epochs"})
        log = train(a.out, resume=True, data_dir=a.data_dir, device=a.device, progress=not a.no_progress,
                    epochs=a.epochs)
    else:
        from .data import parse_preprocess

        cfg = TrainConfig(model=a.model, dataset=a.dataset, batch_size=a.batch_size, seed=a.seed,
                          epochs=TrainConfig.epochs if a.epochs is None else a.epochs, train_subset=a.train_subset,
                          preprocess=parse_preprocess(a.preprocess) if a.preprocess else None,
                          **{k: getattr(a, k) for k in SETTINGS})
        log = train(a.out, cfg, data_dir=a.data_dir, device=a.device, progress=not a.no_progress)
    if log:
        r = log[-1]
        print(f"{a.out}: epoch {r['epoch']}, test error {100 * r['test_error']:.2f}%")


def cmd_eval(a):
    from .engine import evaluate

    r = evaluate(a.checkpoint, a.data_dir, a.device)
    top5 = f" (top-5 {100 * r['top5_error']:.2f}%)" if "top5_error" in r else ""
    print(json.dumps(r) if a.json else f"{r['checkpoint']}: {r['model']}, {r['run']}  test error "
          f"{100 * r['test_error']:.2f}%{top5}  params {r['params']:,} (non-zero {r['nonzero_params']:,})")


def parse_amount(text, option="--amount"):
    """``"0.9"`` -> 0.9; ``"fc1=0.92,fc2=0.9,default=0.8"`` -> dict of layer -> number (whole numbers as int)."""
    def num(v):
        return int(v) if v.strip().isdigit() else float(v)
    try:
        return num(text) if "=" not in text else {k.strip(): num(v) for k, v in (i.split("=") for i in text.split(","))}
    except ValueError:
        raise SparsenetError(f"{option} {text!r}: expected a number or layer=number,... pairs") from None


def cmd_prune(a):
    from .engine import load_schedule, prune_run, uniform_schedule

    if a.resume:
        _refuse_unused(a, _RESUMED.format(""))
        schedule = None
    elif a.checkpoint is None:
        raise SparsenetError("prune needs a CHECKPOINT to start from (or --resume)")
    elif a.schedule:
        _refuse_unused(a, "with --schedule, which sets every round: put them in the schedule",
                       allowed={"checkpoint", "schedule"})
        schedule = load_schedule(a.schedule)
    else:
        schedule = uniform_schedule(
            a.criterion, parse_amount(a.amount), a.rounds, a.seed, epochs=a.epochs, batch_size=a.batch_size,
            freeze=[n for n in a.freeze.split(",") if n], remove_neurons=not a.keep_dead_neurons,
            **{k: getattr(a, k) for k in SETTINGS})
    log = prune_run(a.checkpoint, a.out, schedule, resume=a.resume, data_dir=a.data_dir, device=a.device,
                    progress=not a.no_progress, expect="prune")
    r = log[-1]
    print(f"{a.out}: test error {100 * r['test_error']:.2f}%, {r['nonzero_params']:,} of {r['params']:,} "
          f"parameters left ({r['compression']:.1f}x fewer)")


def cmd_quantise(a):
    from .engine import Schedule, prune_run

    schedule = None
    if a.resume:
        _refuse_unused(a, _RESUMED.format(""))
    else:
        if a.checkpoint is None:
            raise SparsenetError("quantise needs a CHECKPOINT to start from (or --resume)")
        bits = parse_amount(a.bits, "--bits") if a.bits else "auto"
        schedule = Schedule.from_dict({"seed": a.seed, "rounds": [{
            "quantise": bits, "epochs": a.epochs, "batch_size": a.batch_size, "remove_neurons": False,
            **{k: getattr(a, k) for k in SETTINGS}}]})
    log = prune_run(a.checkpoint, a.out, schedule, resume=a.resume, data_dir=a.data_dir, device=a.device,
                    progress=not a.no_progress, expect="quantise")
    r = log[-1]
    print(f"{a.out}: test error {100 * r['test_error']:.2f}%, {r['nonzero_params']:,} of {r['params']:,} parameters "
          f"left, shared values per layer {next(x['shared'] for x in log if x.get('event') == 'quantise')}")


def _refuse_overwrite(a, *names):
    """The one overwrite policy: a command does not replace files it wrote before unless --force."""
    folder = Path(a.out) if a.out is not None else Path(a.checkpoint).parent
    there = [str(folder / n) for n in names if (folder / n).exists()]
    if there and not a.force:
        raise SparsenetError(f"{there[0]} exists; choose another --out or add --force to overwrite it")


def cmd_report(a):
    from .report import format_table, report_checkpoint

    _refuse_overwrite(a, "report.json", "report.md")
    rep = report_checkpoint(a.checkpoint, a.out, a.data_dir, a.device)
    print(json.dumps(rep) if a.json else f"{format_table(rep)}\nwritten: {', '.join(rep['files'])}")


def cmd_sensitivity(a):
    from .report import DEFAULT_RATIOS, format_sensitivity, sensitivity_checkpoint

    try:
        ratios = [float(r) for r in a.ratios.split(",")] if a.ratios else DEFAULT_RATIOS
    except ValueError:
        raise SparsenetError(f"--ratios {a.ratios!r}: expected comma-separated numbers in [0, 1]") from None
    layers = [n.strip() for n in a.layers.split(",") if n.strip()] if a.layers else None
    _refuse_overwrite(a, "sensitivity.json", "sensitivity.md", "sensitivity.png")
    res = sensitivity_checkpoint(a.checkpoint, a.out, ratios, layers, a.data_dir, a.device, scheduler=a.scheduler,
                                 serial=a.serial or None, workers=a.workers, progress=not (a.json or a.no_progress),
                                 timeout=a.connect_timeout, threads=a.threads or 1)
    print(json.dumps(res) if a.json else f"{format_sensitivity(res)}\nwritten: {', '.join(res['files'])}")


def cmd_reproduce(a):
    from .reproduce import reproduce

    if a.imagenet and a.data_dir and a.imagenet != a.data_dir:
        raise SparsenetError("give the ImageNet folder once: --imagenet or --data-dir")
    if a.seeds is not None:
        _reproduce_seeds(a)
        return
    engine = [f"--{k.replace('_', '-')}" for k in ("scheduler", "serial", "workers", "connect_timeout")
              if k in getattr(a, "given", ())]
    if engine:
        raise SparsenetError(f"{', '.join(engine)}: these run the seeds of --seeds on Dask; give --seeds N")
    m = reproduce(a.experiment, a.out, a.imagenet or a.data_dir, a.device, progress=not a.no_progress,
                  weights=a.weights, prune_only=a.prune_only)
    pr, err = m["pruned"], (lambda e: "-" if e is None else f"{100 * e:.2f}%")
    dense = m["dense"].get("test_error", m["dense"].get("error"))
    print(f"{m['experiment']}: dense {err(dense)} -> pruned {err(pr['test_error'])} "
          f"with {pr['nonzero_params']:,} of {pr['params']:,} parameters ({pr['compression']:.1f}x); "
          f"report: {m['results_dir']}/report.md")
    failed = [k for k, c in m["checks"].items() if not c["ok"]]
    if failed:
        raise SparsenetError(f"{m['experiment']}: bounds not met: {', '.join(failed)}")


def cmd_import(a):
    from .interop import import_file

    info = import_file(a.file, a.model, a.out, force=a.force, apply_masks=a.apply_masks)
    print(f"{a.out}: {a.model} from {info['format']} ({info['layout']} layout)" + (
        f", input {info['input_size']}x{info['input_size']}, preprocessing {info['preprocess']['mode']}"
        if "preprocess" in info else ""))


def cmd_summary(a):
    if (a.checkpoint is None) == (a.model is None):
        raise SparsenetError("summary needs either a CHECKPOINT or --model NAME|FILE (not both)")
    from .checkpoint import load_checkpoint

    net = build_model(a.model) if a.model else load_checkpoint(a.checkpoint).net
    from .model import is_description
    from .paper import LAYERS

    # the paper's rows only beside its own networks (a description file may take any name)
    rows, paper = net.summary(), {"rows": {}} if is_description(a.model) else LAYERS.get(net.name, {"rows": {}})
    total = {"params": net.count_params(), "nonzero_params": net.count_nonzero(),
             "macs": sum(r["macs"] for r in rows)}
    for r in [*rows, total]:  # FLOP = 2 MACs, as the paper counts; its Table 2-5 numbers beside ours
        r.update(flop=2 * r["macs"], paper={k: v for k, v in paper["rows"].get(r.get("name", "total"), {}).items()
                                            if k in ("weights", "flop", "weights_left")} or None)
    if a.json:
        print(json.dumps({"model": net.name, "input_shape": list(net.input_shape), "layers": rows, **total,
                          "paper_source": paper.get("source")}))
        return
    from .report import pct, text_table

    def num(v):
        return "-" if v is None else f"{v:,}"

    shown = 10 if paper.get("source") else 7  # the paper's three columns only where it has numbers
    print(text_table(["layer", "kind", "output", "weight", "params", "connections", "FLOP/sample", "paper weights",
                      "paper FLOP", "paper weights% left"][:shown], [
        [r.get("name", "total"), r.get("kind", ""), "x".join(map(str, r.get("output_shape", []))),
         "x".join(map(str, r.get("weight_shape") or [])) or "-", f"{r['params']:,}", f"{r['nonzero_params']:,}",
         f"{r['flop']:,}", *((num((r["paper"] or {}).get(k)) for k in ("weights", "flop"))),
         pct((r["paper"] or {}).get("weights_left"))][:shown] for r in [*rows, total]]))
    if paper.get("source"):
        print(f"paper columns: {paper['source']}, as published")


def cmd_export(a):
    from .modelfile import export_model, export_sizes, load_model, storage_report

    if (a.out is None) != a.report:
        raise SparsenetError("export needs an output file OUT.h5, or --report (which writes nothing)")
    suffix = Path(a.out or "").suffix.lower()
    a.format = a.format or {".onnx": "onnx", ".safetensors": "torch"}.get(suffix, "relative")
    if a.report and a.format in ("onnx", "torch"):
        raise SparsenetError(f"--report prints the HDF5 encodings' table; --format {a.format} needs an output file")
    if a.sparse_initializers and a.format != "onnx" or a.layout and a.format != "torch":
        raise SparsenetError(f"{'--sparse-initializers' if a.sparse_initializers else '--layout'} is an option of "
                             f"--format {'onnx' if a.sparse_initializers else 'torch'}, not {a.format}")
    if a.out is not None and Path(a.out).exists() and not a.force:
        raise SparsenetError(f"{a.out} exists; choose another name or add --force to overwrite it")
    net = load_model(a.checkpoint)
    if a.format in ("onnx", "torch"):
        from .interop import export_onnx, export_torch

        r = (export_onnx(net, a.out, a.sparse_initializers) if a.format == "onnx" else
             export_torch(net, a.out, a.layout or "pruned"))
        r.update(checkpoint=a.checkpoint, params=net.count_params(), nonzero_params=net.count_nonzero())
        print(json.dumps(r) if a.json else f"{a.out}: {net.name} as {a.format} "
              f"({r.get('layout', 'sparse initializers' if a.sparse_initializers else 'dense initializers')}), "
              f"{r['nonzero_params']:,} of {r['params']:,} parameters left, {r['bytes']:,} B")
        return
    r = {"checkpoint": a.checkpoint, **storage_report(net)}
    if a.report:
        r["file_bytes"] = export_sizes(net)
    else:
        export_model(net, a.out, a.format)
        r.update(out=a.out, format=a.format, file_bytes={a.format: Path(a.out).stat().st_size})
    if a.json:
        print(json.dumps(r))
        return
    from .report import text_table

    orig = {**{k: v["weights"] for k, v in net.origin.items()}, "total": sum(v["weights"] for v in net.origin.values())}
    print(text_table(["layer", "weights stored", "connections", "% of stored", "% of original", "dense B", "CSR B",
                      "relative B", "CSR idx", "rel idx", "CSR x", "rel x"], [
        [w["layer"], f"{w['weights']:,}", f"{w['nonzero']:,}", f"{100 * w['density']:.1f}%",
         f"{100 * w['nonzero'] / orig[w['layer']]:.1f}%" if orig.get(w["layer"]) else "-", f"{w['dense_bytes']:,}",
         f"{w['csr_bytes']:,}", f"{w['relative_bytes']:,}", f"{w['csr_overhead_pct']:.1f}%",
         f"{w['relative_overhead_pct']:.1f}%", f"{w['ratio_csr']:.1f}", f"{w['ratio_relative']:.1f}"]
        for w in r["layers"] + [r["total"]]]))
    sizes = r["file_bytes"]
    best = "compressed" if "compressed" in sizes else "relative"
    print("on disk: " + ", ".join(f"{k} {v:,} B" for k, v in sizes.items())
          + (f"  (dense/{best} {sizes['dense'] / sizes[best]:.2f}x, both files of this network)" if a.report
             else f"  -> {a.out}"))


def cmd_predict(a):
    import time

    from .backend import array_module
    from .data import check_dataset, open_splits
    from .inference import SparseNetwork
    from .modelfile import load_model

    if a.batch_size < 1:
        raise SparsenetError(f"--batch-size must be >= 1, got {a.batch_size}")
    dataset = check_dataset(a.dataset)
    xp = array_module(a.device)
    net = load_model(a.model, xp)
    test = open_splits({"dataset": dataset}, net, xp, a.data_dir, split="test")["test"]
    snet = SparseNetwork(net, a.mode)
    t0 = time.perf_counter()  # an image folder's test images are decoded batch by batch, inside the time
    wrong = sum(int((snet.predict(x, a.batch_size) != t).sum()) for x, t in test.batches(a.batch_size, xp=xp))
    error = wrong / len(test)
    r = {"model": a.model, "test_error": error, "n_test": len(test), "mode": a.mode,
         "layers": snet.plan(a.batch_size), "seconds": time.perf_counter() - t0}
    if a.json:
        print(json.dumps(r))
        return
    plan = "; ".join(f"{k}: {', '.join(n for n, v in r['layers'].items() if v == k)}" for k in ("sparse", "dense")
                     if k in r["layers"].values())
    print(f"{a.model}: test error {100 * error:.2f}% on {len(test):,} images in {r['seconds']:.2f} s "
          f"(layers run {plan or 'none'})")


def _reproduce_seeds(a):
    from .reproduce import reproduce_seeds

    if a.weights or a.prune_only:
        raise SparsenetError("--seeds reruns the experiments that train their network: no --weights or --prune-only")
    text = a.seeds.strip()
    try:
        seeds = [int(x) for x in text.split(",")] if "," in text else int(text)
    except ValueError:
        raise SparsenetError(f"--seeds {a.seeds!r}: expected a count N or comma-separated seeds (0,3,7)") from None
    r = reproduce_seeds(a.experiment, seeds, a.out, scheduler=a.scheduler, serial=a.serial, workers=a.workers,
                        data_dir=a.imagenet or a.data_dir, device=a.device, progress=not a.no_progress,
                        timeout=a.connect_timeout)
    ms = (lambda s: "-" if s["mean"] is None else f"{100 * s['mean']:.2f}%" + (
        "" if s["sd"] is None else f" ± {100 * s['sd']:.2f}"))
    failed = sum(t["status"] != "ok" for t in r["tasks"])
    print(f"{r['experiment']} over {r['pruned_error']['n']} seeds: dense {ms(r['dense_error'])} -> pruned "
          f"{ms(r['pruned_error'])}, {r['compression']['mean'] or 0:.1f}x; report: {r['results_dir']}/report.md"
          + (f" ({failed} seeds failed; a rerun retries them)" if failed else ""))
    if failed:
        raise SparsenetError(f"{failed} of {len(r['tasks'])} seeds failed: {next(t['reason'] for t in r['tasks'] if t['status'] != 'ok')}")


def cmd_sweep(a):
    from .report import count, kept, pct
    from .sweeps import sweep

    r = sweep(a.spec, a.out, scheduler=a.scheduler, serial=a.serial, workers=a.workers, data_dir=a.data_dir,
              device=a.device, progress=not a.no_progress, timeout=a.connect_timeout)
    for g in r["groups"]:
        print(f"{g['label']}: dense {pct(g['dense']['mean'], 2)} over {count(g['dense']['n'], 'seed')}")
        for row in g["rows"]:
            sd = "" if row["sd"] is None else f" ± {100 * row['sd']:.2f}"
            failed = f", {row['failed']} failed" if row["failed"] else ""
            print(f"  {row['method']:>13} {kept(row['density']):>6} kept: {pct(row['mean'], 2)}{sd} "
                  f"({count(row['n'], 'seed')}{failed})")
    failed = sum(t["status"] != "ok" for t in r["tasks"])
    print(f"report: {r['out']}/report.md" + (f" ({failed} tasks failed; a rerun retries them)" if failed else ""))


COMMANDS = {"train": cmd_train, "prune": cmd_prune, "reproduce": cmd_reproduce, "eval": cmd_eval, "summary": cmd_summary,
            "report": cmd_report, "sensitivity": cmd_sensitivity, "export": cmd_export, "predict": cmd_predict,
            "import": cmd_import, "quantise": cmd_quantise, "sweep": cmd_sweep}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(x) for x in argv]
    a = build_parser().parse_args(argv)
    a.given = _given(argv)
    try:
        set_threads(getattr(a, "threads", None))
        COMMANDS[a.command](a)
    except SparsenetError as e:
        print(f"sparsenet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        msg = "sparsenet: interrupted"
        if a.command in ("train", "prune", "quantise"):
            msg += f"; the last finished epoch is saved, continue with: sparsenet {a.command} --out {a.out} --resume"
        elif a.command in ("reproduce", "sweep"):
            msg += "; run the same command again to continue where it stopped"
        print(msg, file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
