"""Pruning methods as named strategies, for studies over seeds (:mod:`sparsenet.sweeps`, docs/sweeps.md).

A method turns a target **density** d (the kept fraction of the network's prunable weights), one seed's
trained network and the study's settings (:class:`Study`) into one ordinary run of the engine:

* :class:`Prune`: a pruning :class:`~sparsenet.engine.Schedule` applied to a checkpoint
  (:func:`sparsenet.engine.prune_run`), or
* :class:`Train`: a masked network trained with the dense settings (:func:`sparsenet.engine.run`).

Each method starts from the checkpoint of one earlier task (:attr:`Method.start`): the dense run of its
seed, ``l1-base`` (the dense network fine-tuned with L1, Fig. 5's L1 arms) or ``han`` at the same density
(whose masks ``reinit`` and ``rewind`` reuse). With R = ``rounds`` and E = ``epochs`` (retraining epochs
per round) of the study:

================  ===========  ==========================================================  =================
method            starts from  run                                                         retraining epochs
================  ===========  ==========================================================  =================
``han``           dense        R rounds of per-layer pruning to :func:`han_targets`        R·E
                               (layer l keeps t_l^(r/R) after round r), E epochs each
``one-shot``      dense        han's final per-layer densities in one prune                R·E
``global``        dense        R rounds of one magnitude threshold over all layers, to d   R·E
``random``        dense        han's rounds and densities, survivors drawn at random       R·E
``reinit``        han          han's masks, survivors re-initialised (a fresh draw),       the dense epochs
                               trained with the dense settings
``rewind``        han          han's masks, survivors reset to their initial values,       the dense epochs
                               trained with the dense settings
``l2-noretrain``  dense        Fig. 5: one prune, every layer to d                         0
``l2-retrain``    dense        Fig. 5: one prune, every layer to d, retrained with L2      R·E
``l1-noretrain``  l1-base      Fig. 5: one prune of the L1-trained network                 0 (l1-base: l1_epochs)
``l1-retrain``    l1-base      Fig. 5: one prune, retrained with L1 (no L2)                R·E (l1-base: l1_epochs)
``l2-iterative``  dense        Fig. 5: R rounds, every layer to d^(r/R), E epochs each     R·E
================  ===========  ==========================================================  =================

Every method keeps dead neurons (``remove_neurons`` false; §3.5's removal changes no output): every
mask then stays in the shape of the original layer, which ``reinit``, ``rewind`` and ``random`` need, and
all methods are treated alike. Retraining uses the study's ``retrain`` settings (the seed's data order);
the data-order seed of every run is the task's seed.
"""
import dataclasses
from typing import Callable, NamedTuple

import numpy

from .backend import asnumpy
from .checkpoint import load_checkpoint
from .engine import TrainConfig, uniform_schedule
from .model import build_model
from .pruning import adjust_dropout, layer_amounts


@dataclasses.dataclass(frozen=True)
class Study:
    """The settings every method of one sweep task shares.

    Attributes
    ----------
    train : TrainConfig
        The dense run's settings, ``seed`` the task's seed (initial weights and data order).
    retrain : dict
        Optimiser settings (:data:`sparsenet.optim.SETTINGS`) and ``batch_size`` of every retraining round.
    rounds, epochs : int
        R, the pruning rounds of the iterative methods, and E, retraining epochs per round.
    quality : dict
        ``{layer: q_l}`` (and ``"default"``) for :func:`han_targets`; empty: q_l = 1 for every layer.
    l1, l1_epochs : float, int
        Fig. 5's L1 arms: the L1 strength and the epochs of L1 fine-tuning that make ``l1-base``.
    """

    train: TrainConfig
    retrain: dict
    rounds: int = 3
    epochs: int = 4
    quality: dict = dataclasses.field(default_factory=dict)
    l1: float = 5e-5
    l1_epochs: int = 4

    @property
    def seed(self):
        return self.train.seed


class Prune(NamedTuple):
    """Run ``schedule`` on the checkpoint ``source`` (a path)."""
    source: str
    schedule: object


class Train(NamedTuple):
    """Train ``net`` (already masked) with the dense settings ``config``."""
    net: object
    config: TrainConfig


@dataclasses.dataclass(frozen=True)
class Method:
    """A named strategy: ``plan(study, source, density, xp)`` → :class:`Prune` or :class:`Train`, where
    ``source`` is the checkpoint of the task named by ``start`` (``"dense"``, ``"l1-base"`` or ``"han"``)."""

    name: str
    start: str
    plan: Callable
    doc: str


METHODS = {}


def _method(name, start="dense"):
    def register(fn):
        METHODS[name] = Method(name, start, fn, fn.__doc__.strip().split("\n\n")[0].replace("\n    ", " "))
        return fn
    return register


def _schedule(study, criterion, amount, rounds, epochs, **settings):
    """``rounds`` rounds towards ``amount`` (:func:`~sparsenet.engine.uniform_schedule`) with the study's
    retraining settings (``settings`` override them), dead neurons kept, the task's seed."""
    return uniform_schedule(criterion, amount, rounds, study.seed, epochs=epochs, remove_neurons=False,
                            **{**study.retrain, **settings})


def han_targets(net, density, quality=None):
    """Per-layer kept fractions that the paper's rule gives at a total density: prune ``|w| < s·q_l·std_l``
    in every layer l, with one scale s chosen so that a fraction ``density`` of all prunable weights stays.

    The surviving weights of every layer are scored ``|w| / (q_l·std_l)`` (std over the layer's survivors)
    and the ``round(density·N)`` highest scores over all N prunable weights are kept; a layer keeps at least
    one weight.

    Parameters
    ----------
    net : Network
        The trained (dense) network.
    density : float
        The kept fraction of all its prunable weights, in (0, 1].
    quality : dict, optional
        ``{layer: q_l}`` with an optional ``"default"`` (:func:`sparsenet.pruning.layer_amounts`), the
        per-layer quality ratios (e.g. the paper's fc1 0.7, fc2 0.8, fc3 0.6); q_l = 1 where not given.

    Returns
    -------
    dict
        ``{layer: kept fraction of the layer's original weights}``.
    """
    params = {n: p for n, p in net.params().items() if p.prunable}
    q = {n: 1.0 for n in params} | (layer_amounts(net, quality) if quality else {})
    scores, sizes = [], {}
    for n, p in params.items():
        w = asnumpy(p.data)[asnumpy(p.mask).astype(bool)]
        std = float(w.std()) if w.size else 0.0
        scores.append(numpy.abs(w) / (q[n] * std) if std > 0 else numpy.full(w.size, numpy.inf))
        sizes[n] = net.origin.get(n.rsplit(".", 1)[0], {}).get("weights", p.size)
    flat, owner = numpy.concatenate(scores), numpy.repeat(numpy.arange(len(scores)), [s.size for s in scores])
    n_keep = min(int(round(density * sum(sizes.values()))), flat.size)
    kept = numpy.bincount(owner[numpy.argpartition(-flat, n_keep - 1)[:n_keep]], minlength=len(scores)) \
        if n_keep else numpy.zeros(len(scores), dtype=int)
    return {n.rsplit(".", 1)[0]: max(int(k), 1) / sizes[n] for n, k in zip(params, kept)}


def _han_sparsities(study, source, density):
    """:func:`han_targets` of the network in the checkpoint ``source``, as pruned fractions per layer."""
    return {k: 1.0 - t for k, t in han_targets(load_checkpoint(source).net, density, study.quality).items()}


@_method("han")
def han(study, source, density, xp=numpy):
    """The paper's rule, iterated (§3.4): per-layer thresholds, R rounds of prune → retrain (E epochs each).

    Each layer's final density comes from :func:`han_targets` on the dense network (the q·std rule with one
    scale for the whole network, q_l from ``quality``); round r of R keeps t_l^(r/R) of layer l (the
    ``percentile`` criterion, geometric steps, as :func:`~sparsenet.engine.uniform_schedule` makes them)."""
    return Prune(source, _schedule(study, "percentile", _han_sparsities(study, source, density), study.rounds,
                                   study.epochs))


@_method("one-shot")
def one_shot(study, source, density, xp=numpy):
    """han's final per-layer densities in one prune, then R·E epochs of retraining (the same total).

    Against ``han`` it tests §3.4's claim that iterating prune → retrain reaches a lower error than
    pruning once at high compression."""
    return Prune(source, _schedule(study, "percentile", _han_sparsities(study, source, density), 1,
                                   study.rounds * study.epochs))


@_method("global")
def global_threshold(study, source, density, xp=numpy):
    """One magnitude threshold over all layers (the ``global`` criterion), R rounds to d, E epochs each.

    Layers with larger weights keep more of them; against ``han`` it compares per-layer thresholds with
    one for the whole network (Blalock et al. 2020's global baseline)."""
    return Prune(source, _schedule(study, "global", 1.0 - density, study.rounds, study.epochs))


@_method("random")
def random_masks(study, source, density, xp=numpy):
    """han's rounds and per-layer densities, but the survivors drawn at random (the ``random`` criterion).

    Same layers, same densities, same retraining as ``han``: only the choice of the weights differs, so
    it tests whether pruning by magnitude matters at all."""
    return Prune(source, _schedule(study, "random", _han_sparsities(study, source, density), study.rounds,
                                   study.epochs))


def _masked(study, han_checkpoint, init_seed, xp):
    """A network freshly initialised from ``init_seed``, with the masks (and dropout, §3.2) of the pruned
    network in ``han_checkpoint``, and the dense settings to train it with."""
    masks = {n: p.mask for n, p in load_checkpoint(han_checkpoint).net.params().items() if p.prunable}
    net = build_model(study.train.model, init_seed, xp)
    for n, p in net.params().items():
        if p.prunable:
            p.prune(xp.asarray(masks[n]))
    adjust_dropout(net)
    return Train(net, study.train)


@_method("reinit", start="han")
def reinit(study, source, density, xp=numpy):
    """han's final masks on a freshly initialised network (an independent draw), trained for the dense
    schedule: §3.3's argument for keeping the trained survivors rather than re-initialising them.

    The new initial values come from the seed ``SeedSequence([seed, 1])`` (the same initialiser as the
    dense run, another draw); the data order is the task's seed."""
    init = int(numpy.random.SeedSequence([study.seed, 1]).generate_state(1)[0])
    return _masked(study, source, init, xp)


@_method("rewind", start="han")
def rewind(study, source, density, xp=numpy):
    """han's final masks with every survivor reset to its value at initialisation (the dense run's seed
    gives them), trained for the dense schedule: Frankle & Carbin 2019's rewinding (lottery tickets)."""
    return _masked(study, source, study.seed, xp)


@_method("l2-noretrain")
def l2_noretrain(study, source, density, xp=numpy):
    """Fig. 5: the dense (L2-trained) network pruned once, every layer to d, no retraining."""
    return Prune(source, _schedule(study, "percentile", 1.0 - density, 1, 0))


@_method("l2-retrain")
def l2_retrain(study, source, density, xp=numpy):
    """Fig. 5: the dense network pruned once, every layer to d, then R·E epochs of retraining with L2."""
    return Prune(source, _schedule(study, "percentile", 1.0 - density, 1, study.rounds * study.epochs))


@_method("l1-noretrain", start="l1-base")
def l1_noretrain(study, source, density, xp=numpy):
    """Fig. 5: the L1-trained network (``l1-base``) pruned once, every layer to d, no retraining."""
    return Prune(source, _schedule(study, "percentile", 1.0 - density, 1, 0))


@_method("l1-retrain", start="l1-base")
def l1_retrain(study, source, density, xp=numpy):
    """Fig. 5: the L1-trained network pruned once, every layer to d, then R·E epochs with L1 (strength
    ``l1``, no L2)."""
    return Prune(source, _schedule(study, "percentile", 1.0 - density, 1, study.rounds * study.epochs,
                                   l1=study.l1, weight_decay=0.0))


@_method("l2-iterative")
def l2_iterative(study, source, density, xp=numpy):
    """Fig. 5's iterative curve: R rounds of prune → retrain with L2, every layer to d^(r/R) after round r."""
    return Prune(source, _schedule(study, "percentile", 1.0 - density, study.rounds, study.epochs))


def l1_base(study, source):
    """``l1-base``, the start of Fig. 5's L1 arms: the dense network fine-tuned for ``l1_epochs`` with L1
    (strength ``l1``, no L2), pruning nothing (a round of ``percentile`` 0)."""
    return Prune(source, _schedule(study, "percentile", 0.0, 1, study.l1_epochs, l1=study.l1, weight_decay=0.0))
