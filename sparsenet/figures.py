"""The paper's Figs. 4-6 for our networks, and training curves, as PNG (AlexNet's Figs. 5 and 6 redrawn for the
network given). Each ``plot_*`` writes atomically and returns True, or False (writing nothing) without matplotlib."""
import numpy

from .backend import asnumpy
from .util import atomic_path


def _plot(path, figsize, draw, dpi=120):
    """A figure of ``figsize`` filled by ``draw(fig)``, saved atomically to ``path``; False without matplotlib.
    Constrained layout fits titles, colour bars and figure legends into the figure."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    FigureCanvasAgg(fig := Figure(figsize=figsize, layout="constrained"))
    draw(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return True


def plot_sensitivity(result, path):
    """Fig. 6: test error against the fraction of one layer's weights pruned (:func:`sparsenet.report.sensitivity`).
    Over seeds (:func:`sparsenet.reproduce.reproduce_seeds`) the errors are means, and ``result["ci"]``
    (``{layer: [[low, high] or None per ratio]}``, ``"baseline"`` too) draws their 95% bands."""
    ci = result.get("ci") or {}

    def draw(fig):
        ax = fig.add_subplot()
        for name, errors in result["layers"].items():
            line, = ax.plot(result["ratios"], [100 * e for e in errors], marker="o", ms=3, label=name)
            _band(ax, result["ratios"], ci.get(name), line.get_color())
        ax.axhline(100 * result["baseline"], color="gray", ls="--", lw=1, label="unpruned")
        if ci.get("baseline"):
            ax.axhspan(100 * ci["baseline"][0], 100 * ci["baseline"][1], color="gray", alpha=0.15, lw=0)
        ax.set(xlabel="fraction of the layer's parameters pruned", ylabel="test error (%)",
               title=f"{result.get('model') or 'network'}: one layer pruned, no retraining" + (
                   f"\nmean over {result['seeds']} seeds, 95% bands" if result.get("seeds") else ""))
        ax.grid(alpha=0.3)
        ax.legend()
    return _plot(path, (6, 4), draw)


def _band(ax, x, ci, color, scale=100):
    """A 95% band: ``ci`` is ``[low, high]`` (or None) per x, drawn at ``scale`` times (-100: losses as gains)."""
    pts = [(v, c) for v, c in zip(x, ci or []) if c is not None]
    if pts:
        ax.fill_between([v for v, _ in pts], [scale * c[0] for _, c in pts], [scale * c[1] for _, c in pts],
                        color=color, alpha=0.2, lw=0)


def tradeoff_limits(result):
    """Fig. 5's y range: 0 and the retrained curves; and the lowest point if a curve w/o retraining leaves it."""
    kept = [0.0] + [-100 * v for n, c in result["curves"].items() if "w/o" not in n for v in c["loss"]]
    pad, low = max(0.1, 0.1 * (max(kept) - min(kept))), min(-100 * max(c["loss"]) for c in result["curves"].values())
    return min(kept) - pad, max(kept) + pad, low if low < min(kept) - pad else None


def plot_tradeoff(result, path):
    """Fig. 5: accuracy change against weights pruned, per curve of :func:`sparsenet.reproduce.tradeoff`. Over
    seeds the losses are means and each curve's ``ci`` (``[low, high]`` per point) draws its 95% band."""
    lo, hi, low = tradeoff_limits(result)

    def draw(fig):
        ax = fig.add_subplot()
        for name, c in result["curves"].items():
            color = "tab:red" if "iterative" in name else "tab:orange" if "L1" in name else "tab:blue"
            ax.plot([100 * v for v in c["pruned"]], [-100 * v for v in c["loss"]], "--" if "w/o" in name else "-",
                    color=color, marker="o", ms=3, label=name)
            if c.get("ci") and "w/o" not in name:  # the curves without retraining leave the frame anyway
                _band(ax, [100 * v for v in c["pruned"]], c["ci"], color, scale=-100)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set(xlabel="weights pruned away (%)", ylabel="accuracy change (points)", ylim=(lo, hi))
        ax.set_title(f"Trade-off (dense test error {100 * result['dense_error']:.2f}%"
                     + (f", mean over {result['seeds']} seeds, 95% bands)" if result.get("seeds") else ")") + (
            f"\ncurves w/o retraining leave the frame (down to {low:.1f} points)" if low is not None else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _plot(path, (6.5, 4.2), draw)


def plot_curves(log, path):
    """Training loss and test error per epoch from a run's log records (a pruning run's rounds dashed off, the error
    just after each prune an x; one legend below the panels); ``log`` may be a dict {title: records}, a panel each."""
    logs = log if isinstance(log, dict) else {"training": log}

    def draw(fig):
        from matplotlib.ticker import MaxNLocator

        handles = {}
        for k, (title, recs) in enumerate(logs.items(), 1):
            ax = fig.add_subplot(1, len(logs), k)
            ax2, ep = ax.twinx(), [r for r in recs if "loss" in r]
            handles["training loss"], = ax.plot(range(1, len(ep) + 1), [r["loss"] for r in ep], ".-", color="tab:blue")
            handles["test error"], = ax2.plot(range(1, len(ep) + 1), [100 * r["test_error"] for r in ep], ".-",
                                              color="tab:red")
            ax.set(xlabel="epoch (of the run)", ylabel="training loss (blue)", title=title)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax2.set(ylabel="test error, % (red)")
            for r in (r for r in recs if r.get("event") == "prune"):
                x = 0.5 + sum(e.get("round", 0) < r["round"] for e in ep)
                handles["round starts: prune"] = ax.axvline(x, color="gray", ls="--", lw=0.8)
                handles["test error right after the prune"], = ax2.plot(x, 100 * r["test_error"], "x", color="tab:red")
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=len(handles), fontsize=8)
    return _plot(path, (5 * len(logs), 4.3), draw)


def plot_bits(sweep, path):
    """Deep Compression's bits-vs-accuracy figure: test error of one layer shared at each width, before and
    after its codebook is fine-tuned (:func:`sparsenet.reproduce.bits_sweep`)."""
    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        for key, style in (("before", "o--"), ("after", "s-")):
            ax.plot(sweep["bits"], [100 * e for e in sweep[key]], style, label=f"{key} fine-tuning")
        ax.set(xlabel=f"bits per weight of {sweep['layer']} (2**bits shared values)", ylabel="test error, %",
               title=f"{sweep['layer']} weight-shared: quantisation alone vs fine-tuned codebook")
        ax.legend()
    return _plot(path, (6, 4), draw)


def pattern_title(net, layer):
    """The share of ``layer``'s weights kept, of the original layer and (neurons removed) of the layer now."""
    W, o = net.layer(layer).params["W"], net.origin[layer]
    units = o["params"] - o["weights"]  # one bias per unit
    shape, origin = "x".join(map(str, W.data.shape)), f"{units}x{o['weights'] // units}"
    title = f"{layer}: {100 * W.nonzero() / o['weights']:.1f}% of the original {origin} weights kept"
    return title + (" (no neuron removed)" if shape == origin else
                    f" ({100 * W.nonzero() / W.size:.1f}% of the {shape} layer after dead-neuron removal)")


def plot_pattern(net, path):
    """Fig. 4: the first FC layer's sparsity pattern (kept connections black) and, when that layer reads the image,
    how many connections each input pixel keeps."""
    fc = next(l for l in net.layers if l.kind == "linear")
    M, side = asnumpy(fc.params["W"].mask), int(numpy.sqrt(fc.params["W"].mask.shape[1]))
    image = fc is net.layers[0] and len(net.input_shape) == 1 and side * side == M.shape[1]

    def draw(fig):
        fig.suptitle(pattern_title(net, fc.name).replace(" (", "\n(", 1), fontsize=10)  # two lines: it fits
        ax = fig.add_subplot(1, 2 if image else 1, 1)
        ax.imshow(M, cmap="gray_r", aspect="auto", interpolation="nearest")
        ax.set_title(f"kept connections: {M.shape[0]} units x {M.shape[1]} inputs", fontsize=9)
        ax.set(xlabel="input index", ylabel="unit")
        if image:
            ax2 = fig.add_subplot(1, 2, 2)
            fig.colorbar(ax2.imshow(M.sum(axis=0).reshape(side, side), cmap="viridis"), ax=ax2, fraction=0.046)
            ax2.set_title("connections kept per input pixel", fontsize=9)
            ax2.axis("off")
    return _plot(path, (10, 4) if image else (7, 4), draw, dpi=110)
