"""The run engine: dense training and §3.4's iterative prune → retrain, one loop for both.

A run is a :class:`Schedule` of rounds; each round is the paper's iteration (:func:`_round`):
prune (:func:`sparsenet.pruning.prune`) → adjust dropout (§3.2) → retrain the survivors
(§3.1 ``weight_decay``/``l1``, §3.3 ``freeze``) → remove dead neurons (§3.5). Dense
training is one round that prunes nothing (:meth:`TrainConfig.schedule`). As JSON/TOML::

    {"seed": 0, "retrain": {"epochs": 4, "lr": 0.02},      # defaults for every round
     "rounds": [{"criterion": "quality", "amount": 1.0},
                {"criterion": "percentile", "amount": {"default": 0.9, "fc3": 0.7}, "freeze": ["fc3"]}]}

Optimiser keys are :data:`sparsenet.optim.SETTINGS`; pruning targets are fractions of
the original layers. ``checkpoint.h5`` is a run's one commit point (weights, masks,
momentum, RNG states, the position — round, stage, epoch — and the whole log), written
atomically after every prune and epoch; ``log.jsonl`` and ``config.json`` (dense) or
``schedule.json`` (pruning) are views rewritten from it. A run killed at any instant
resumes to the same checkpoint and log as an uninterrupted one (bit-identical on the
CPU). Nothing is written before the request is validated and the data loaded.
"""
import contextlib
import ctypes
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy

from . import cuda, pruning
from .backend import array_module, device_name, ensure_threads
from .checkpoint import load_checkpoint, save_checkpoint
from .data import IMAGE_FOLDERS, ArraySplit, check_dataset, image_preprocess, open_splits, parse_dataset
from .model import build_model, is_description, model_spec
from .optim import SETTINGS, SGD, check_settings, layered
from .util import SparsenetError, eta, new_output, progress_bar, whole, write_text_atomic

# Retraining defaults, chosen by experiment on LeNet-300-100 (reproduce/README.md, "Retraining defaults, chosen
# by experiment"): lr ×0.1 every 2 epochs (1,876 iterations of a full MNIST epoch at batch 64; optim's docstring).
RETRAIN_DEFAULTS = {"epochs": 4, "lr": 0.02, "lr_policy": "step", "gamma": None, "power": 0.75, "step_size": None,
                    "step_epochs": 2, "momentum": 0.9, "weight_decay": 5e-4, "l1": 0.0, "batch_size": 64, "freeze": [],
                    "remove_neurons": True}
# Codebook fine-tuning (sparsenet quantise): a shared value moves by the sum of its weights' gradients.
QUANTISE_DEFAULTS = {"epochs": 2, "lr": 0.001, "lr_policy": "fixed"}
ROUND_KEYS = {"criterion", "amount", "quantise"} | set(RETRAIN_DEFAULTS)  # quantise: bits per layer (Deep Compression)


# ----------------------------------------------------------------------------- configurations
@dataclasses.dataclass
class TrainConfig:
    """Dense training settings: Caffe's MNIST solver except the schedule: lr 0.05, ×0.1 every 7 epochs
    (``step_epochs``; 6,566 iterations of 938 batches on all of MNIST at batch 64), 20 epochs; ``--lr-policy inv
    --lr 0.01`` is Caffe's (README, "The method in the code", **Defaults**; reproduce/README.md, "Training
    defaults, and where they differ from Caffe's solver"). ``step_size`` (iterations) replaces ``step_epochs``
    when set (configs written before ``step_epochs`` existed give it)."""

    model: str = "lenet-300-100"
    dataset: str = "mnist"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    l1: float = 0.0
    lr_policy: str = "step"
    gamma: float | None = None
    power: float = 0.75
    step_size: int | None = None
    step_epochs: float | None = None  # None: 7, unless step_size is set
    seed: int = 0
    train_subset: int = 0  # use only the first N training images (0 = all); for tests/CI
    preprocess: dict | None = None  # image folders only (docs/data.md); None: the defaults for the network

    def __post_init__(self):
        if self.step_size is None and self.step_epochs is None:
            self.step_epochs = 7

    def validate(self, base=None):
        """Check every setting; the network description (a name in MODELS, or a .json/.toml file, checked
        whole) and the data set (docs/data.md) are read now. File paths in ``model`` and ``dataset`` are
        made absolute (relative ones against the folder ``base``, default the working directory), so the
        run's config finds them from anywhere; a resumed run needs neither file (the checkpoint has the
        network)."""
        if is_description(self.model):
            self.model = os.path.abspath(Path(base or ".").expanduser() / Path(self.model).expanduser())
        spec = model_spec(self.model)
        self.dataset = check_dataset(self.dataset, base)
        if self.preprocess is not None:
            kind = parse_dataset(self.dataset)[0]
            if kind not in IMAGE_FOLDERS:
                raise SparsenetError(f"preprocess applies to image folders (folder:DIR, imagenet), not to {kind}")
            image_preprocess(self.preprocess, spec["input_shape"], self.dataset)
        for key in ("epochs", "batch_size", "seed", "train_subset"):
            whole(getattr(self, key), key, 1 if key in ("epochs", "batch_size") else 0)
        check_settings(dataclasses.asdict(self))
        return self

    @classmethod
    def from_dict(cls, d, base=None):
        if not isinstance(d, dict):
            raise SparsenetError("training settings must be a JSON object")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SparsenetError(f"unknown training settings: {', '.join(sorted(unknown))}")
        return cls(**d).validate(base)

    def schedule(self):
        """Dense training as a run: one round that prunes nothing."""
        s = dataclasses.asdict(self)
        r = {**{k: s[k] for k in SETTINGS}, "criterion": None, "amount": None, "epochs": self.epochs,
             "batch_size": self.batch_size, "freeze": [], "remove_neurons": False}
        return Schedule([r], self.seed)


@dataclasses.dataclass
class Schedule:
    """Fully resolved rounds (every key of :data:`ROUND_KEYS` set) and the data-order seed."""

    rounds: list
    seed: int = 0

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise SparsenetError("a pruning schedule must be a JSON/TOML object with a 'rounds' list")
        unknown = set(d) - {"seed", "retrain", "rounds"}
        if unknown:
            raise SparsenetError(f"unknown schedule keys: {', '.join(sorted(unknown))}")
        retrain = d.get("retrain", {})
        if not isinstance(retrain, dict) or set(retrain) - set(RETRAIN_DEFAULTS):
            bad = sorted(set(retrain) - set(RETRAIN_DEFAULTS)) if isinstance(retrain, dict) else retrain
            raise SparsenetError(f"unknown retraining settings in schedule: {bad}")
        rounds = d.get("rounds")
        if not isinstance(rounds, list) or not rounds:
            raise SparsenetError("a pruning schedule needs a non-empty 'rounds' list")
        out = []
        for i, r in enumerate(rounds, 1):
            if not isinstance(r, dict):
                raise SparsenetError(f"round {i} of the schedule is not an object")
            if set(r) - ROUND_KEYS:
                raise SparsenetError(f"round {i}: unknown keys {', '.join(sorted(set(r) - ROUND_KEYS))}")
            prune = {} if "quantise" in r else {"criterion": "quality", "amount": 1.0}  # a quantise round: no prune
            r = layered({"criterion": None, "amount": None}, prune, RETRAIN_DEFAULTS, retrain, r)  # r's step wins
            out.append(_check_round(r, i))
        return cls(out, whole(d.get("seed", 0), "schedule seed", 0))

    def to_dict(self):
        return {"seed": self.seed, "rounds": self.rounds}

    @property
    def prunes(self):
        """Whether any round prunes or quantises (a compression run, not dense training)."""
        return any(r["criterion"] is not None or r.get("quantise") is not None for r in self.rounds)


def _check_round(r, i):
    if r["criterion"] is not None and r["criterion"] not in pruning.CRITERIA:
        raise SparsenetError(f"round {i}: unknown criterion {r['criterion']!r} (choose from {', '.join(pruning.CRITERIA)})")
    whole(r["epochs"], f"round {i}: epochs", 0)
    whole(r["batch_size"], f"round {i}: batch_size", 1)
    check_settings(r, f"round {i}")
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
    except (ValueError, UnicodeDecodeError) as e:  # json and tomllib errors are ValueErrors
        raise SparsenetError(f"{path}: cannot parse schedule: {e}") from None
    return Schedule.from_dict(d)


def uniform_schedule(criterion="quality", amount=1.0, rounds=1, seed=0, **retrain):
    """``rounds`` rounds reaching ``amount``: the same q every round (quality), or a kept
    fraction shrinking geometrically, round r of R keeping ``(1 − amount)^(r/R)``."""
    whole(rounds, "rounds", 1)

    def at(r, a):
        if criterion == "quality" or not isinstance(a, (int, float)) or not 0 <= a <= 1:
            return a  # invalid values are reported by the pruning code with the layer name
        return 1.0 - (1.0 - a) ** (r / rounds)

    plan = [{"criterion": criterion,
             "amount": {k: at(r, v) for k, v in amount.items()} if isinstance(amount, dict) else at(r, amount)}
            for r in range(1, rounds + 1)]
    return Schedule.from_dict({"seed": seed, "retrain": retrain, "rounds": plan})


# ----------------------------------------------------------------------------- the loop
def reuse_heap_memory():
    """Keep freed activation-sized blocks in the heap instead of page-faulting them back
    every step (glibc's mmap/trim thresholds; LeNet-5 steps ~20% faster)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
        libc.mallopt(M_TOP_PAD, 64 << 20)
    except (OSError, AttributeError):
        pass


def train_epoch(net, opt, data, batch_size, rng, progress=None):
    """One pass over ``data`` (a split: :class:`~sparsenet.data.ArraySplit`, ImageNet's ImageFolder) in a
    random order drawn from ``rng``; returns ``(mean loss, training error)`` of the batches' forward
    passes, before their updates.

    On the GPU the step (forward, backward, update, running sums) is replayed from a CUDA graph per batch
    shape (:class:`sparsenet.cuda.CapturedStep`) unless :func:`sparsenet.cuda.capturable` says why not;
    the same kernels run either way, and nothing is copied to the host until the epoch ends. It tells ``opt``
    the epoch's length (``batches_per_epoch``), which a step policy in epochs (``step_epochs``) counts in."""
    xp = net.xp
    opt.batches_per_epoch = -(-len(data) // batch_size)
    loss_sum = xp.zeros((), dtype=numpy.float64)
    wrong = xp.zeros((), dtype=numpy.int64)

    def body(xb, tb):
        loss, z = net.loss_and_backward(xb, tb)
        opt.apply()
        xp.add(loss_sum, loss * len(tb), out=loss_sum)
        xp.add(wrong, (z.argmax(axis=1) != tb).sum(), out=wrong)

    captured = cuda.CapturedStep(body) if xp is not numpy and cuda.capturable(net, opt) is None else None
    with captured or contextlib.nullcontext():
        for xb, tb in data.batches(batch_size, rng, train=True, xp=xp):
            opt.stage()
            (captured or body)(xb, tb)
            opt.advance()
            if progress is not None:
                progress.update(1)
    return float(loss_sum) / len(data), int(wrong) / len(data)


def test_errors(net, data):
    """``{"test_error": top-1 error}`` of ``net`` on a split, with ``"top5_error"`` for ImageNet."""
    if isinstance(data, ArraySplit):
        return {"test_error": net.error(data.x, data.t)}
    from .imagenet import evaluate

    r = evaluate(net, data, xp=net.xp)
    return {"test_error": r["top1"], "top5_error": r["top5"]}


def _totals(net):
    params = sum(o["params"] for o in net.origin.values())
    weights = sum(o["weights"] for o in net.origin.values())
    nz = net.count_nonzero()
    nz_w = sum(l.params["W"].nonzero() for l in net.layers if "W" in l.params)
    return {"density": {k: round(v, 6) for k, v in pruning.densities(net).items()}, "params": params,
            "nonzero_params": nz, "compression": round(params / max(nz, 1), 3), "weights_left": round(nz_w / weights, 6)}


class _Run:
    """A run folder and the state that :meth:`commit` writes into its checkpoint."""

    def __init__(self, run_dir, net, schedule, state, base_config, log, rng, progress):
        self.dir, self.ckpt = Path(run_dir), Path(run_dir) / "checkpoint.h5"
        self.net, self.schedule, self.state, self.base_config = net, schedule, state, base_config
        self.log, self.rng, self.progress = log, rng, progress
        self.new = True  # a new run (not resumed): removed if it fails before it has saved any work

    def worth_keeping(self):
        """Whether the run folder holds work: a resumed run, or one that has saved a prune or an epoch."""
        return not self.new or any(r.get("event") in ("prune", "quantise") or "epoch" in r for r in self.log)

    def record(self, rec):
        self.log.append(rec)
        if self.progress:  # an epoch with the time left (from the mean epoch so far), and a warning if it was slow
            t, n = [r["seconds"] for r in self.log if "loss" in r], sum(r["epochs"] for r in self.schedule.rounds)
            left = "loss" in rec and len(t) < n and f"  [{len(t)}/{n} epochs, {eta(sum(t) * (n / len(t) - 1))} left]"
            print(_describe(rec) + (left or ""), file=sys.stderr)
            if "loss" in rec and len(t) > 1 and t[-2] and t[-1] > max(3 * t[-2], 2):
                print(f"warning: this epoch took {t[-1]:.1f} s, {t[-1] / t[-2]:.0f}x the one before; "
                      "are other jobs using the cores? (--threads / SPARSENET_THREADS)", file=sys.stderr)

    def commit(self, opt):
        """Write the checkpoint (the commit point), then the views rebuilt from it."""
        self.state["iteration"] = opt.iteration
        config = {**self.base_config, "run": self.state}
        save_checkpoint(self.ckpt, self.net, opt, self.rng, self.state["epoch"], config, self.log)
        self.write_views(settings=False)

    def write_views(self, settings=True, stale_only=False):
        """``log.jsonl`` and (when a run starts or resumes: they do not change) its settings; ``stale_only``:
        only a view that differs from the checkpoint's (a kill between a commit and its views left it behind)."""
        name, value = ("schedule.json", self.schedule.to_dict()) if self.schedule.prunes else ("config.json",
                                                                                               self.base_config)
        views = {"log.jsonl": "".join(json.dumps(r) + "\n" for r in self.log)}
        if settings:
            views[name] = json.dumps(value, indent=2) + "\n"
        for name, text in views.items():
            path = self.dir / name
            if not (stale_only and path.is_file() and path.read_text() == text):
                write_text_atomic(path, text)


def run(run_dir, schedule=None, *, source=None, base_config=None, resume=False, data_dir=None, device=None,
        progress=True, epochs=None, expect=None):
    """Run (or resume) a schedule in ``run_dir``; returns the log records. A new run starts
    from ``source`` (a checkpoint path, or a :class:`~sparsenet.model.Network` with
    ``base_config``: dataset, train_subset, …). ``epochs`` raises a resumed dense run's length.

    Resuming checks the whole stored state first (:func:`check_run_state`; ``expect``: the kind
    of run the caller continues, :data:`RUN_KINDS`) and writes nothing when it does not hold; a
    finished run only gets back the views (``log.jsonl``, its settings) that a kill between the
    last commit and its views left behind. A new run that fails with a :class:`SparsenetError` before
    its first epoch is saved leaves nothing behind (no folder, no files)."""
    run_dir = Path(run_dir)
    xp = array_module(device)
    ensure_threads()
    if not resume and schedule is None:
        raise SparsenetError("a new run needs a schedule")
    if resume:
        ck = load_checkpoint(run_dir / "checkpoint.h5", xp)
        state, schedule, base_config = check_run_state(ck, run_dir, expect)
        net, log, rng = ck.net, ck.log, ck.rng()
        if epochs is not None:
            if schedule.prunes:
                raise SparsenetError("--epochs with --resume applies to dense training runs only")
            schedule.rounds[0]["epochs"] = epochs
            _check_round(schedule.rounds[0], 1)
            if epochs < state["epoch"]:
                raise SparsenetError(f"{run_dir} has trained {state['epoch']} epochs already; --epochs {epochs} "
                                     "cannot shorten it")
            base_config["epochs"] = epochs
            state.update(schedule=schedule.to_dict(), schedule_id=schedule_id(schedule))
    else:
        if (run_dir / "checkpoint.h5").exists():
            raise SparsenetError(f"{run_dir} already holds a {'pruning ' if schedule.prunes else ''}run; "
                                 "continue it with --resume or choose another --out")
        net = source
        if isinstance(source, (str, Path)):
            ck = load_checkpoint(source, xp)
            net, base_config = ck.net, {k: v for k, v in ck.config.items() if k not in ("run", "prune")}
        state = {"kind": run_kind(schedule), "round": 0, "stage": "prune", "epoch": 0, "iteration": 0,
                 "schedule": schedule.to_dict(), "schedule_id": schedule_id(schedule)}
        log, rng = [], numpy.random.default_rng(schedule.seed)
    for i, r in enumerate(schedule.rounds, 1):  # the whole schedule is checked now, not at round 5
        next_prune = i - 1 == state["round"] and state["stage"] == "prune"  # sees this net; later ones a pruned one
        try:
            if r["criterion"] is not None and (next_prune or i - 1 > state["round"]):
                pruning.check_amount(net, r["criterion"], r["amount"], current=next_prune)
            if r.get("quantise") is not None:
                from .quantise import check_bits

                check_bits(net, r["quantise"])
        except SparsenetError as e:
            raise SparsenetError(f"round {i}: {e}" if len(schedule.rounds) > 1 else str(e)) from None
        net.freeze(r["freeze"])
    net.freeze(())
    data = open_splits(base_config, net, xp, data_dir)
    if resume:
        _check_iteration(state, schedule, len(data["train"]), run_dir)
        if _finished(state, schedule):  # nothing to run; views a kill left behind the checkpoint are brought up
            _Run(run_dir, net, schedule, state, base_config, log, rng, False).write_views(stale_only=True)
            if progress:
                print(f"{run_dir}: {describe_state(state, schedule)}; nothing to do", file=sys.stderr)
            return log
    if xp is not numpy:  # dropout on the GPU draws from a CuPy generator (not checkpointed)
        net.dropout_rng = xp.random.default_rng(int(rng.integers(2**63)))
    reuse_heap_memory()
    R = _Run(run_dir, net, schedule, state, base_config, log, rng, progress)
    opt = SGD.from_settings(net.params(), schedule.rounds[min(state["round"], len(schedule.rounds) - 1)])
    opt.iteration = state["iteration"]
    if resume:
        R.new = False
        for p in run_dir.glob(".*.tmp"):  # temporary files of a write that a kill interrupted
            p.unlink(missing_ok=True)
        R.write_views()
        _rounds(R, opt, data)
        return log
    with new_output(run_dir, lambda: not R.worth_keeping()):
        if schedule.prunes:
            R.record({"event": "start", "source": str(source) if isinstance(source, (str, Path)) else None,
                      **test_errors(net, data["test"]), **_totals(net)})
        R.commit(opt)
        R.write_views()
        _rounds(R, opt, data)
    return log


def _rounds(R, opt, data):
    """The rounds from the run's position to the end of its schedule."""
    with numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
        while R.state["round"] < len(R.schedule.rounds):
            _round(R, opt, data["train"], data["test"])
            if R.state["round"] < len(R.schedule.rounds):
                opt = SGD.from_settings(R.net.params(), R.schedule.rounds[R.state["round"]])


# ----------------------------------------------------------------------------- the stored run state
RUN_KINDS = {"train": "dense training run", "prune": "pruning run", "quantise": "quantisation run"}
_STATE_KEYS = {"kind", "round", "stage", "epoch", "iteration", "schedule", "schedule_id"}


def run_kind(schedule):
    """``"train"`` (prunes nothing), ``"quantise"`` (every round only shares weights) or ``"prune"``:
    also the command that continues the run (``sparsenet KIND --out RUN --resume``)."""
    if not schedule.prunes:
        return "train"
    return "quantise" if all(r["criterion"] is None for r in schedule.rounds) else "prune"


def schedule_id(schedule):
    """A fingerprint of a resolved schedule (the run state stores it beside the schedule)."""
    return hashlib.sha256(json.dumps(schedule.to_dict(), sort_keys=True, default=repr).encode()).hexdigest()[:16]


def describe_state(state, schedule):
    """Where a run stands, in words: "pruning run at round 2 of 4, epoch 1 of 3", "…, finished"."""
    kind, n, k = state["kind"], len(schedule.rounds), state["round"]
    what = RUN_KINDS[kind]
    if _finished(state, schedule):
        return f"{what}, finished ({n} round{'s' * (n > 1)})" if kind != "train" else \
            f"{what}, finished ({state['epoch']} epoch{'s' * (state['epoch'] != 1)})"
    epochs = schedule.rounds[k]["epochs"]
    at = f"epoch {state['epoch']} of {epochs}" if state["stage"] == "retrain" else "before its first epoch" \
        if kind == "train" else "before its prune"
    return f"{what} at " + (f"round {k + 1} of {n}, " if kind != "train" else "") + at


def _finished(state, schedule):
    if state["kind"] == "train":
        return state["stage"] == "retrain" and state["epoch"] == schedule.rounds[0]["epochs"]
    return state["round"] == len(schedule.rounds)


def _expected_log(state, schedule):
    """The (event, round, epoch) of every record the log of a run at ``state`` holds, in order."""
    if state["kind"] == "train":
        return [("epoch", None, e) for e in range(1, state["epoch"] + 1)]
    out = [("start", None, None)]
    for k, r in enumerate(schedule.rounds[:state["round"] + 1]):
        if k == state["round"] and state["stage"] == "prune":
            break
        out += [(ev, k + 1, None) for ev, on in (("prune", r["criterion"]), ("quantise", r.get("quantise")))
                if on is not None]
        done = k < state["round"]
        out += [("epoch", k + 1, e) for e in range(1, (r["epochs"] if done else state["epoch"]) + 1)]
        if done:
            out.append(("round", k + 1, None))
    return out


def check_run_state(ck, run_dir, expect=None):
    """Validate the whole stored state of the run in ``run_dir`` (``ck``: its loaded checkpoint) before a
    resume writes anything: its kind (against ``expect``, the caller's command), the schedule and its
    fingerprint, the position (round, stage, epoch) within the schedule, the iteration count and epoch
    stored beside it, and that the log holds exactly the records of that position. Returns ``(state,
    schedule, base_config)``; a mismatch is one line saying what the folder holds and which command
    continues it."""
    path = Path(run_dir) / "checkpoint.h5"
    config = dict(ck.config)
    state = config.pop("run", None)
    if not isinstance(state, dict) or not isinstance(ck.log, list):
        raise SparsenetError(f"{path}: not a run checkpoint of this version (no run state); it can be a source "
                             "(sparsenet prune/quantise CHECKPOINT --out NEW_RUN) but not resumed")

    def bad(what):
        return SparsenetError(f"{path}: the stored run state is damaged ({what}); the run cannot be resumed")

    if set(state) - _STATE_KEYS or _STATE_KEYS - {"kind", "schedule_id"} - set(state):
        raise bad(f"keys {sorted(state)}")
    try:
        schedule = Schedule.from_dict(state["schedule"])
    except SparsenetError as e:
        raise bad(f"schedule: {e}") from None
    kind = state.setdefault("kind", run_kind(schedule))
    if not isinstance(kind, str) or kind != run_kind(schedule):
        raise bad(f"kind {kind!r} for a schedule of a {RUN_KINDS[run_kind(schedule)]}")
    if state.setdefault("schedule_id", schedule_id(schedule)) != schedule_id(schedule):
        raise bad("the schedule does not match its fingerprint")
    n = len(schedule.rounds)
    for key, low, high in (("round", 0, 0 if kind == "train" else n), ("epoch", 0, None), ("iteration", 0, None)):
        v = state[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
            raise bad(f"{key} {v!r}, expected a whole number in {low}..{'' if high is None else high}")
    k, stage, epoch = state["round"], state["stage"], state["epoch"]
    if stage not in ("prune", "retrain") or (k == n and stage != "prune"):
        raise bad(f"stage {stage!r} in round {k + 1} of {n}")
    if epoch > (schedule.rounds[k]["epochs"] if k < n else 0) or (stage == "prune" and epoch):
        raise bad(f"epoch {epoch} at the {stage} stage of round {k + 1}")
    if ck.epoch != epoch or not isinstance(ck.optimizer_state, dict) or \
            ck.optimizer_state.get("iteration") != state["iteration"] or ck.rng() is None:
        raise bad("the epoch, iteration or generator stored beside the position do not match it")
    got = [(r.get("event", "epoch"), r.get("round"), r.get("epoch")) if isinstance(r, dict) else r for r in ck.log]
    if got != _expected_log(state, schedule):
        raise bad(f"its log of {len(got)} records does not match the position ({describe_state(state, schedule)})")
    if kind == "train" and (config.get("epochs") != schedule.rounds[0]["epochs"] or config.get("seed") != schedule.seed):
        raise bad("the training settings disagree with the schedule")
    if expect is not None and kind != expect:
        raise SparsenetError(f"{run_dir} holds a {describe_state(state, schedule)}, not a {RUN_KINDS[expect]}; "
                             f"continue it with: sparsenet {kind} --out {run_dir} --resume")
    return state, schedule, config


def _check_iteration(state, schedule, n_train, run_dir):
    """The stored iteration count is the position's: ``epoch`` epochs of the round's batches (0 before them)."""
    k = state["round"]
    if k < len(schedule.rounds):
        want = state["epoch"] * -(-n_train // schedule.rounds[k]["batch_size"])
        if state["iteration"] != want:
            raise SparsenetError(f"{Path(run_dir) / 'checkpoint.h5'}: the stored run state is damaged (iteration "
                                 f"{state['iteration']}, but {state['epoch']} epochs of this data make {want}); "
                                 "the run cannot be resumed")


def _round(R, opt, train_data, test_data):
    """Carry out (the rest of) round ``R.state["round"]``: §3.4 in one place."""
    net, state, k = R.net, R.state, R.state["round"]
    r, n_rounds = R.schedule.rounds[k], len(R.schedule.rounds)
    if state["stage"] == "prune":
        if r["criterion"] is not None:
            t0 = time.perf_counter()
            try:                                                                  # step 2
                pruning.prune(net, r["criterion"], r["amount"])
            except SparsenetError as e:  # an amount that would empty a layer of the net the earlier rounds left
                raise SparsenetError(f"round {k + 1}: {e}; the run stopped there: {R.ckpt} holds rounds 1-{k}, a "
                                     f"source for `sparsenet prune {R.ckpt} --out NEW_DIR`") from None
            rates = pruning.adjust_dropout(net)                                   # §3.2
            R.record({"event": "prune", "round": k + 1, "criterion": r["criterion"], "amount": r["amount"],
                      **_totals(net), "dropout": rates, **test_errors(net, test_data),
                      "seconds": round(time.perf_counter() - t0, 3)})
        if r.get("quantise") is not None:  # Deep Compression: weight sharing, then the codebooks fine-tuned
            from .quantise import share_weights

            t0 = time.perf_counter()
            shared = share_weights(net, r["quantise"])
            R.record({"event": "quantise", "round": k + 1, "bits": r["quantise"], "shared": shared, **_totals(net),
                      **test_errors(net, test_data), "seconds": round(time.perf_counter() - t0, 3)})
        state.update(stage="retrain", epoch=0)
        opt.iteration = 0
        if r["criterion"] is not None or r.get("quantise") is not None:
            R.commit(opt)
    net.freeze(r["freeze"])                                                       # §3.3
    n_batches = -(-len(train_data) // r["batch_size"])
    while state["epoch"] < r["epochs"]:                                           # retrain (§3.1)
        e, t0 = state["epoch"], time.perf_counter()
        desc = (f"round {k + 1}/{n_rounds} " if R.schedule.prunes else "") + f"epoch {e + 1}/{r['epochs']}"
        bar = progress_bar(n_batches, desc, enabled=R.progress)
        try:
            loss, train_err = train_epoch(net, opt, train_data, r["batch_size"], R.rng, bar)
        finally:
            if bar is not None:
                bar.close()
        if not numpy.isfinite(loss) or not all(bool(net.xp.isfinite(p.data).all()) for p in net.params().values()):
            where = f"round {k + 1}, " if R.schedule.prunes else ""
            kept = (f"the last good checkpoint is {R.ckpt} ({where}epoch {e})" if R.worth_keeping()
                    else f"nothing was kept in {R.dir}")
            raise SparsenetError(f"training diverged in {where}epoch {e + 1} (loss {loss:.4g}); {kept}; "
                                 "start again with a lower learning rate")
        seconds = time.perf_counter() - t0
        rec = {"event": "epoch", "round": k + 1} if R.schedule.prunes else {}
        rec.update({"epoch": e + 1, "iteration": opt.iteration, "lr": opt.current_lr(), "loss": loss,
                    "train_error": train_err, **test_errors(net, test_data), "seconds": round(seconds, 3)})
        R.record(rec)
        state["epoch"] = e + 1
        R.commit(opt)
    net.freeze(())
    if R.schedule.prunes:
        removed = pruning.remove_dead_neurons(net) if r["remove_neurons"] else {}  # §3.5
        seconds = sum(rec.get("seconds", 0) for rec in R.log if rec.get("round") == k + 1)
        R.record({"event": "round", "round": k + 1, **_totals(net), "removed_neurons": removed,
                  "shapes": {n: list(p.data.shape) for n, p in net.params().items()},
                  **test_errors(net, test_data), "seconds": round(seconds, 3)})
    state.update(round=k + 1, stage="prune", epoch=0)
    opt.iteration = 0
    if R.schedule.prunes or k + 1 < n_rounds:
        R.commit(opt)


def _describe(rec):
    err, r = f"test err {100 * rec['test_error']:.2f}%", f"round {rec.get('round')} "
    if rec.get("event", "epoch") == "epoch":
        return (("round" in rec) * r + f"epoch {rec['epoch']}: loss {rec['loss']:.4f}  train err "
                f"{100 * rec['train_error']:.2f}%  {err}  {rec['seconds']:.1f}s")
    dens = "  ".join(f"{k} {100 * v:.1f}%" for k, v in rec["density"].items())
    head = {"start": "start", "prune": r + "pruned", "quantise": r + "quantised", "round": r + "done"}[rec["event"]]
    return f"{head}: {err}  weights left (of the original layers): {dens}  ({rec['compression']:.1f}x)"


# ----------------------------------------------------------------------------- the two runs
def train(run_dir, config=None, resume=False, data_dir=None, device=None, progress=True, epochs=None):
    """Train (or resume training) a dense network into ``run_dir``; returns the epoch records.

    ``config`` is a :class:`TrainConfig` for a new run. With ``resume`` the configuration
    comes from the run's checkpoint, and ``epochs`` may raise the number of epochs.
    """
    if resume:
        return run(run_dir, resume=True, data_dir=data_dir, device=device, progress=progress, epochs=epochs,
                   expect="train")
    cfg = (config or TrainConfig()).validate()
    net = build_model(cfg.model, cfg.seed, array_module(device))
    return run(run_dir, cfg.schedule(), source=net, base_config=dataclasses.asdict(cfg), data_dir=data_dir,
               device=device, progress=progress)


def prune_run(source, run_dir, schedule=None, resume=False, data_dir=None, device=None, progress=True, expect=None):
    """Run (or resume) an iterative prune/retrain schedule on the checkpoint ``source``
    (ignored on resume); returns the log records. The training data (dataset, subset)
    follow the source's config. ``expect`` (``"prune"`` or ``"quantise"``): the kind of run a
    resume must find (:func:`check_run_state`)."""
    if resume:
        return run(run_dir, resume=True, data_dir=data_dir, device=device, progress=progress, expect=expect)
    schedule = schedule or uniform_schedule()
    if not schedule.prunes:
        raise SparsenetError("the schedule prunes nothing: give every round a criterion")
    return run(run_dir, schedule, source=source, data_dir=data_dir, device=device, progress=progress)


def evaluate(checkpoint, data_dir=None, device=None):
    """Test error and parameter counts of a checkpoint (the ``sparsenet eval`` record)."""
    xp = array_module(device)
    ck = load_checkpoint(checkpoint, xp)
    test = open_splits(ck.config, ck.net, xp, data_dir, split="test")["test"]
    return {"checkpoint": str(checkpoint), "model": ck.net.name, "dataset": ck.config.get("dataset", "mnist"),
            "epoch": ck.epoch, "run": checkpoint_state(ck), "device": device_name(xp), **test_errors(ck.net, test),
            "params": ck.net.count_params(), "nonzero_params": ck.net.count_nonzero()}


def checkpoint_state(ck):
    """What a loaded checkpoint holds, in words: its run's position (:func:`describe_state`, e.g. "pruning run,
    finished (4 rounds)"), or for one saved outside a run (``save_checkpoint``, ``sparsenet import``) its epoch."""
    state = ck.config.get("run")
    try:
        schedule = Schedule.from_dict(state["schedule"])
        return describe_state({"kind": run_kind(schedule), **state}, schedule)
    except (SparsenetError, KeyError, TypeError, IndexError):
        return f"saved outside a run, at epoch {ck.epoch}"
