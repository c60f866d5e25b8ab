"""Statistics over seeds for :mod:`sparsenet.sweeps`: a mean with its t-interval, and paired comparisons.

Seeds are independent replicates of one experiment: the spread over seeds is the spread a reader would see
rerunning it. With n values x_i (one per seed):

* mean x̄, standard deviation s (n − 1 in the denominator), and the 95% confidence interval of the mean
  x̄ ± t_{0.975, n−1} · s / √n (Student's t, ``scipy.stats.t``);
* two methods compared at one density are **paired by seed** (both start from that seed's dense network):
  the differences d_i = a_i − b_i get the same interval, and the two-sided paired t-test
  (``scipy.stats.ttest_rel``) its p-value.

Fewer than two values have no spread: ``sd``, ``ci`` and ``p`` are None then.
"""
import math

import numpy

ALPHA = 0.05  # a difference is called significant when p < ALPHA


def describe(values, confidence=0.95):
    """Mean, standard deviation and t-interval of ``values`` (a sequence of n numbers).

    Returns
    -------
    dict
        ``{"n", "mean", "sd", "ci": [low, high]}``; ``sd`` and ``ci`` None when n < 2, everything but
        ``n`` None when n = 0.
    """
    from scipy.stats import t

    x = numpy.asarray(values, dtype=numpy.float64)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci": None}
    mean = float(x.mean())
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "ci": None}
    sd = float(x.std(ddof=1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci": [mean - half, mean + half]}


def paired(a, b, confidence=0.95):
    """Compare ``a`` with ``b``, two sequences of n values paired by position (by seed).

    Returns
    -------
    dict
        ``{"n", "mean_diff", "sd_diff", "ci": interval of the mean of a − b, "t", "p"}``: ``t`` and ``p`` of
        the two-sided paired t-test; when every difference is the same, p is 1 (all zero) or 0 (t = ±inf),
        where SciPy would return NaN with a warning.
    """
    from scipy.stats import ttest_rel

    a, b = numpy.asarray(a, dtype=numpy.float64), numpy.asarray(b, dtype=numpy.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples need equal lengths, got {a.shape} and {b.shape}")
    d = describe(a - b, confidence)
    out = {"n": d["n"], "mean_diff": d["mean"], "sd_diff": d["sd"], "ci": d["ci"], "t": None, "p": None}
    if d["n"] < 2:
        return out
    if d["sd"] == 0:
        out.update(t=0.0 if d["mean"] == 0 else math.copysign(math.inf, d["mean"]), p=1.0 if d["mean"] == 0 else 0.0)
    else:
        r = ttest_rel(a, b)
        out.update(t=float(r.statistic), p=float(r.pvalue))
    return out


def verdict(comparisons, alpha=ALPHA):
    """Whether "a beats b" (lower error) holds over ``comparisons`` (:func:`paired` results of a − b, one per
    density), in words: ``holds``, ``holds at k of n densities``, ``does not hold: the opposite holds``,
    ``mixed: …``, ``not shown: …`` (no significant difference), or ``cannot be judged: …`` (fewer than
    two seeds with both methods)."""
    cs = [c for c in comparisons if c["p"] is not None]
    if not cs:
        return "cannot be judged: fewer than two seeds with both methods"
    n = len(cs)
    better = sum(c["mean_diff"] < 0 for c in cs)
    sig_better = sum(c["mean_diff"] < 0 and c["p"] < alpha for c in cs)
    sig_worse = sum(c["mean_diff"] > 0 and c["p"] < alpha for c in cs)
    if sig_better and sig_worse:
        return f"mixed: significantly better at {sig_better} and worse at {sig_worse} of {n} densities"
    if sig_better:
        return "holds" if sig_better == n else f"holds at {sig_better} of {n} densities (not significant at the others)"
    if sig_worse:
        return "does not hold: the opposite holds" + ("" if sig_worse == n else f" at {sig_worse} of {n} densities")
    return f"not shown: no significant difference (lower mean error at {better} of {n} densities)"
