"""Pruning connections (:func:`prune`, criteria :data:`CRITERIA`) and dead neurons
(§3.5, :func:`remove_dead_neurons`), and §3.2's dropout adjustment (:func:`adjust_dropout`).

These functions only *choose* which connections go; :class:`sparsenet.param.Param` keeps
a pruned connection exactly 0 for good. Criteria read the mask, never ``W == 0`` (a
surviving weight may pass through zero). Targets and densities are fractions of the
original (dense) layer.
"""
import hashlib
import math

import numpy

from . import layers as L
from .backend import asnumpy, get_array_module
from .util import SparsenetError

CRITERIA = ("quality", "percentile", "global", "random")  # random: a baseline (random_mask)


# ----------------------------------------------------------------------------- criteria
def layer_amounts(net, amount):
    """Resolve ``amount`` to ``{"fc1.W": value, ...}`` over the prunable parameters.

    ``amount`` is a number (every prunable layer) or a dict of layer names to numbers, with
    an optional ``"default"``; a layer neither named nor covered by a default is left alone.
    """
    prunable = {name: p for name, p in net.params().items() if p.prunable}
    layer_of = {name: name.rsplit(".", 1)[0] for name in prunable}
    if isinstance(amount, dict):
        unknown = set(amount) - set(layer_of.values()) - {"default"}
        if unknown:
            raise SparsenetError(f"no prunable layer named {', '.join(sorted(unknown))} "
                                 f"(prunable: {', '.join(layer_of.values())})")
        out = {n: amount.get(layer_of[n], amount.get("default")) for n in prunable}
        out = {n: v for n, v in out.items() if v is not None}
    else:
        out = dict.fromkeys(prunable, amount)
    for n, v in out.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SparsenetError(f"pruning amount for {layer_of[n]} must be a number, got {v!r}")
    return {n: float(v) for n, v in out.items()}


def _keep_largest(W, M, sparsity, size):
    """Mask keeping the largest |W| among the survivors of ``M`` (ties: first index) so that
    a fraction ``sparsity`` of ``size`` weights (default ``M.size``) is pruned. The n-th largest
    magnitude comes from a partition (linear time; a sort of fc6's 10⁸ weights took seconds)."""
    n_keep = int(round((1.0 - sparsity) * (M.size if size is None else size)))
    xp = get_array_module(W)
    idx = xp.flatnonzero(M)
    if n_keep >= idx.size:
        return M.copy()
    new = xp.zeros(M.size, dtype=M.dtype)
    if n_keep > 0:
        mag = xp.abs(W.ravel()[idx])
        kth = xp.partition(mag, mag.size - n_keep)[mag.size - n_keep]  # the n_keep-th largest
        above = mag > kth
        ties = xp.flatnonzero(mag == kth)[:n_keep - int(xp.count_nonzero(above))]  # the first of equal ones
        new[idx[above]] = 1
        new[idx[ties]] = 1
    return new.reshape(M.shape)


def quality_mask(W, M, quality):
    """The paper's rule: prune ``|w| < quality · std(surviving w)`` (the std is over the
    mask's ones, whatever their value)."""
    if quality < 0:
        raise SparsenetError(f"quality must be >= 0, got {quality}")
    xp = get_array_module(W)
    alive = M.astype(bool)
    if not alive.any():
        return M.copy()
    threshold = quality * float(W[alive].std())
    return M * (xp.abs(W) >= threshold)


def percentile_mask(W, M, sparsity, size=None):
    """Per-layer target: prune the smallest-magnitude survivors until a fraction
    ``sparsity`` of the layer's weights (counting earlier prunes) is pruned.

    ``size``: the weight count the fraction is of (the original one, from :func:`prune`;
    default ``M.size``). A layer already that sparse is left as it is (masks never grow).
    """
    if not 0.0 <= sparsity <= 1.0:
        raise SparsenetError(f"target sparsity must be in [0, 1], got {sparsity}")
    return _keep_largest(W, M, sparsity, size)


def random_mask(W, M, sparsity, size=None):
    """A baseline, not a magnitude rule: prune survivors of ``M`` chosen uniformly at random until a
    fraction ``sparsity`` of ``size`` weights (default ``M.size``) is pruned, as :func:`percentile_mask`
    counts. The draw is seeded by the bytes of ``W`` and ``M`` (SHA-256): the same layer pruned again
    gets the same mask (a resumed run re-prunes identically), networks trained from other seeds get
    other masks. Returns the new mask (``M``'s shape and dtype)."""
    if not 0.0 <= sparsity <= 1.0:
        raise SparsenetError(f"target sparsity must be in [0, 1], got {sparsity}")
    xp = get_array_module(W)
    n_keep = int(round((1.0 - sparsity) * (M.size if size is None else size)))
    idx = xp.flatnonzero(M)
    if n_keep >= idx.size:
        return M.copy()
    digest = hashlib.sha256(asnumpy(W).tobytes() + asnumpy(M).tobytes()).digest()
    rng = numpy.random.default_rng(int.from_bytes(digest[:8], "little"))
    chosen = rng.choice(int(idx.size), n_keep, replace=False)
    new = xp.zeros(M.size, dtype=M.dtype)
    new[idx[xp.asarray(chosen)]] = 1
    return new.reshape(M.shape)


def global_masks(params, sparsity, size=None):
    """One magnitude threshold over ``params`` (names -> :class:`~sparsenet.param.Param`):
    the smallest survivors are pruned until a fraction ``sparsity`` of all their weights
    (``size``: the original count; default the current one) is. Returns names -> new mask.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise SparsenetError(f"target sparsity must be in [0, 1], got {sparsity}")
    if not params:
        return {}
    xp = get_array_module(next(iter(params.values())).data)
    names = list(params)
    W = xp.concatenate([params[n].data.ravel() for n in names])
    M = xp.concatenate([params[n].mask.ravel() for n in names])
    new = _keep_largest(W, M, sparsity, size)
    out, start = {}, 0
    for n in names:
        size = params[n].mask.size
        out[n] = new[start:start + size].reshape(params[n].mask.shape)
        start += size
    return out


# ----------------------------------------------------------------------------- pruning
def check_amount(net, criterion, amount, current=True, relative_to="original"):
    """Validate and resolve a criterion's amount before anything is pruned: ``global``'s one sparsity,
    else per-layer values (:func:`layer_amounts`). An amount that would prune every weight of a layer
    (``global``: every weight) is refused, naming the largest amount that keeps one:

    * ``percentile``, ``random``, ``global``: fractions pruned of the original layers (of ``relative_to``'s
      sizes), so at most ``1 - 1/size`` (a fraction < 1 that still rounds to one weight kept);
    * ``quality``: ``q ≤ max|w| / std(w)`` over the layer's surviving weights, which only the network
      as it will be pruned can tell: checked when ``current`` (the default, as :func:`prune` calls it).
      A schedule's later rounds, seen before the earlier ones have pruned, are checked with
      ``current=False`` up front, then by :func:`prune` at their round.
    """
    if criterion not in CRITERIA:
        raise SparsenetError(f"unknown pruning criterion {criterion!r}: choose from {', '.join(CRITERIA)}")
    params, size = net.params(), _sizes(net, relative_to)
    if criterion == "global":
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount <= 1:
            raise SparsenetError(f"the global criterion takes one target sparsity in [0, 1], got {amount!r}")
        total = sum(size(n) for n, p in params.items() if p.prunable)
        if total and round((1.0 - amount) * total) < 1:
            raise SparsenetError(f"global amount {amount:g} prunes all {total:,} prunable weights; the largest that "
                                 f"keeps one is {_floor(1 - 1 / total)} (the fraction of all of them pruned)")
        return float(amount)
    amounts = layer_amounts(net, amount)
    for name, a in amounts.items():
        if not (0 <= a <= 1 if criterion in ("percentile", "random") else a >= 0):
            raise SparsenetError(f"{criterion} amount for {name.rsplit('.', 1)[0]} must be "
                                 f"{'>= 0' if criterion == 'quality' else 'in [0, 1]'}, got {a}")
    if criterion in ("percentile", "random"):
        limits, what = {n: 1 - 1 / size(n) for n in amounts}, "the fraction of its original weights pruned"
        empties = [n for n, a in amounts.items() if round((1.0 - a) * size(n)) < 1]
    elif current:
        limits, what = {n: _quality_limit(params[n]) for n in amounts}, "q in |w| < q·std"
        empties = [n for n, a in amounts.items() if limits[n] is not None and not _quality_keeps(params[n], a)]
    else:
        empties = []
    if empties:
        name, one = empties[0], not isinstance(amount, dict)  # one number for all layers: the largest that suits all
        best = min(v for v in limits.values() if v is not None) if one else limits[name]
        raise SparsenetError(f"{criterion} amount {amounts[name]:g} prunes every weight of "
                             f"{', '.join(n.rsplit('.', 1)[0] for n in (empties if one else [name]))}; the largest "
                             f"that keeps one{' in every layer' if one else ''} is {_floor(best)} ({what})")
    return amounts


def _sizes(net, relative_to):
    """``size(name)``: the weight count that fractions of parameter ``name`` are of: the original (dense) layer's,
    or with ``relative_to="current"`` the layer's now."""
    params = net.params()
    if relative_to == "current":
        return lambda name: params[name].size
    return lambda name: net.origin.get(name.rsplit(".", 1)[0], {}).get("weights", params[name].size)


def _floor(x, digits=4):
    """``x`` rounded down to ``digits`` decimals (a suggested amount that does what it says)."""
    return math.floor(x * 10**digits) / 10**digits


def _quality_limit(p):
    """The largest q for which ``|w| < q·std`` spares a surviving weight of ``p`` (max|w| / std), or None when
    every q does (no survivor, or all of equal magnitude: std 0)."""
    w = p.data[p.mask.astype(bool)]
    std = float(w.std()) if w.size else 0.0
    return float(abs(w).max()) / std if std > 0 else None


def _quality_keeps(p, q):
    """Whether :func:`quality_mask` with ``q`` keeps a weight of ``p`` (the same threshold, computed the same way)."""
    alive = p.mask.astype(bool)
    return bool((abs(p.data[alive]) >= q * float(p.data[alive].std())).any())


def prune(net, criterion="quality", amount=1.0, relative_to="original"):
    """Prune ``net`` in place; return ``{"fc1.W": (survivors before, after), ...}``.

    criterion ``quality``: amount = q per layer, threshold q·std (the paper's rule);
    ``percentile``: amount = target sparsity per layer; ``global``: one target sparsity
    over all prunable weights; ``random``: as percentile, survivors drawn at random (a
    baseline, :func:`random_mask`). Per-layer amounts may be a dict (:func:`layer_amounts`).
    Targets are fractions of the *original* (dense) layers, also after dead-neuron removal;
    ``relative_to="current"`` measures them against the layers as they are now. New masks
    go to :meth:`Param.prune`, which zeroes weights and momentum where they prune. An amount
    that would prune a whole layer is refused before anything changes (:func:`check_amount`).
    """
    if relative_to not in ("original", "current"):
        raise SparsenetError(f"relative_to must be 'original' or 'current', got {relative_to!r}")
    amounts = check_amount(net, criterion, amount, relative_to=relative_to)
    params, size = net.params(), _sizes(net, relative_to)
    if criterion == "global":
        prunable = {n: p for n, p in params.items() if p.prunable}
        new = global_masks(prunable, amounts, sum(size(n) for n in prunable))
    elif criterion in ("percentile", "random"):
        fn = percentile_mask if criterion == "percentile" else random_mask
        new = {n: fn(params[n].data, params[n].mask, a, size(n)) for n, a in amounts.items()}
    else:
        new = {n: quality_mask(params[n].data, params[n].mask, a) for n, a in amounts.items()}
    return {name: params[name].prune(M) for name, M in new.items()}


def prune_at_random(net, density, seed=0):
    """Prune every prunable weight at random, keeping a ``density[layer]`` fraction of it
    (a baseline, and sparse networks for tests and benchmarks). Returns ``net``."""
    rng = numpy.random.default_rng(seed)
    for name, p in net.params().items():
        if p.prunable:
            p.prune(net.xp.asarray(rng.random(p.data.shape) < density[name.split(".")[0]]))
    return net


def densities(net):
    """``{"fc1": surviving fraction of the layer's *original* weights, ...}``."""
    return {l.name: l.params["W"].nonzero() / net.origin.get(l.name, {}).get("weights", l.params["W"].size)
            for l in net.layers if "W" in l.params}


# ----------------------------------------------------------------------------- §3.2 dropout
def adjust_dropout(net):
    """§3.2: ``D_r = D_o · sqrt(C_ir / C_io)`` for every dropout layer.

    C_i: connections of the nearest parametric layer before the dropout layer, originally
    (C_io) and now (C_ir); D_o: its ``base_rate``. Returns ``{dropout name: new rate}``.
    """
    rates, last, density = {}, None, densities(net)
    for l in net.layers:
        if "W" in l.params:
            last = l
        elif isinstance(l, L.Dropout) and last is not None:
            l.rate = l.base_rate * math.sqrt(density[last.name])
            rates[l.name] = l.rate
    return rates


# ----------------------------------------------------------------------------- §3.5 neurons
_PASS = (L.ReLU, L.MaxPool2d, L.Dropout, L.Flatten)  # act unit by unit (channel by channel)


def _inputs_of(W, n_units, flat):
    """View of ``W`` (the next layer's weight) as (its units, n_units, …) over the inputs
    from each unit j of the previous layer: column j of a linear W; columns j, j + C, …
    after a conv and flatten (NHWC order); W[:, :, :, j] of a conv W.
    """
    if W.ndim == 4:  # conv (F, kh, kw, C): move the channel axis next to F
        return W.transpose(0, 3, 1, 2).reshape(W.shape[0], n_units, -1)
    if flat:  # columns (h·Wd + w)·C + c
        return W.reshape(W.shape[0], -1, n_units).transpose(0, 2, 1)
    return W.reshape(W.shape[0], n_units, 1)


def _pairs(net):
    """Consecutive parametric layers (A, B, layers between) with only unit-wise layers between
    (LRN mixes channels) and neither a grouped convolution (its groups must stay equal)."""
    out, prev, between = [], None, []
    for l in net.layers:
        if "W" in l.params:
            if (prev is not None and all(isinstance(m, _PASS) for m in between)
                    and getattr(prev, "groups", 1) == getattr(l, "groups", 1) == 1):
                out.append((prev, l, between))
            prev, between = l, []
        else:
            between.append(l)
    return out


def remove_dead_neurons(net):
    """§3.5: remove the units left with no incoming or no outgoing connection.

    For parametric layers A → (ReLU / max-pool / flatten / dropout) → B, a unit j of A
    (a row of a linear W, a filter of a conv W) is dead when

    * all its incoming weights are pruned: it emits the constant ``c_j = f(b_j)`` (f: the
      layers in between), folded first into B's bias, ``b_B ← b_B + Σ_{inputs of B
      reading j} W_B · c_j`` (exact for a conv B only without padding: a unit with
      ``c_j ≠ 0`` feeding a padded conv is kept);
    * or all its outgoing weights (B's inputs from j) are pruned.

    Removal deletes A's row/filter j and B's inputs from j (:meth:`Param.take`), leaving
    the outputs unchanged, and repeats until nothing changes. The output units and the
    inputs stay; every layer keeps at least one unit. Returns ``{layer: units removed}``.
    """
    removed, changed = {}, True
    while changed:
        changed = False
        for A, B, between in _pairs(net):
            flat = any(isinstance(m, L.Flatten) for m in between)
            WA, bA, WB, bB = A.params["W"], A.params["b"], B.params["W"], B.params["b"]
            xp = get_array_module(WA.data)
            n = WA.data.shape[0]
            no_in = ~WA.mask.reshape(n, -1).any(axis=1)
            no_out = ~_inputs_of(WB.mask, n, flat).any(axis=(0, 2))
            c = bA.data
            for m in between:  # max-pool, flatten and (inference) dropout pass constants through
                if isinstance(m, L.ReLU):
                    c = xp.maximum(c, 0)
            c = c * no_in
            exact_fold = WB.data.ndim == 2 or B.pad == 0  # a padded conv sees zeros at the border
            foldable = no_in & ((c == 0) | exact_fold)
            dead = no_out | foldable
            if not bool(dead.any()):
                continue
            if bool(dead.all()):  # keep one unit (the first) so the layer stays a layer
                dead[0] = False
                if not bool(dead.any()):
                    continue
            fold = dead & no_in & ~no_out
            if bool(fold.any()):
                bB.data += (_inputs_of(WB.data, n, flat).sum(axis=2) * (c * fold)).sum(axis=1)
            keep = xp.flatnonzero(~dead)
            WA.take(keep, 0)
            bA.take(keep, 0)
            if WB.data.ndim == 4:  # conv (F, kh, kw, C): channels
                WB.take(keep, 3)
            else:  # linear: columns j, or j, j + C, j + 2C, … after a flatten (NHWC order)
                WB.take(xp.arange(WB.data.shape[1]).reshape(-1, n)[:, keep].ravel() if flat else keep, 1)
            removed[A.name] = removed.get(A.name, 0) + int(n - keep.size)
            changed = True
    return removed


def prunable_layers(net):
    """Names of the layers with a prunable weight, in order."""
    return [l.name for l in net.layers if "W" in l.params and l.params["W"].prunable]


def check_masks(net):
    """Raise :class:`SparsenetError` naming the parameter if the pruning rule is broken."""
    for name, p in net.params().items():
        try:
            p.check()
        except SparsenetError as e:
            raise SparsenetError(f"{name}: {e}") from None
