"""The paper's Figs. 4-6 redrawn for our networks as PNG: :func:`plot_pattern`, :func:`plot_tradeoff`,
:func:`plot_sensitivity`. Each writes atomically and returns True, or False (writing nothing) without
matplotlib. The paper's Figs. 5 and 6 are AlexNet's; these draw the network given."""
import numpy

from .backend import asnumpy
from .util import atomic_path


def _plot(path, figsize, draw, dpi=120):
    """A figure of ``figsize`` filled by ``draw(fig)``, saved atomically to ``path``; False without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    draw(fig)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return True


def plot_sensitivity(result, path):
    """Fig. 6: test error against the fraction of one layer's weights pruned
    (``result``: :func:`sparsenet.report.sensitivity`)."""
    def draw(fig):
        ax = fig.add_subplot()
        for name, errors in result["layers"].items():
            ax.plot(result["ratios"], [100 * e for e in errors], marker="o", ms=3, label=name)
        ax.axhline(100 * result["baseline"], color="gray", ls="--", lw=1, label="unpruned")
        ax.set(xlabel="fraction of the layer's parameters pruned", ylabel="test error (%)",
               title=f"{result.get('model') or 'network'}: one layer pruned, no retraining")
        ax.grid(alpha=0.3)
        ax.legend()
    return _plot(path, (6, 4), draw)


TRADEOFF_STYLES = {"L2 w/o retrain": ("tab:blue", "--"), "L1 w/o retrain": ("tab:orange", "--"),
                   "L1 w/ retrain": ("tab:orange", "-"), "L2 w/ retrain": ("tab:blue", "-"),
                   "L2 iterative prune + retrain": ("tab:red", "-")}


def plot_tradeoff(result, path):
    """Fig. 5: accuracy change against weights pruned, one curve per entry of
    ``result["curves"]`` (:func:`sparsenet.reproduce.tradeoff`)."""
    def draw(fig):
        ax = fig.add_subplot()
        for name, c in result["curves"].items():
            color, ls = TRADEOFF_STYLES.get(name, (None, "-"))
            ax.plot([100 * v for v in c["pruned"]], [-100 * v for v in c["loss"]], ls, color=color, marker="o",
                    ms=3, label=name)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set(xlabel="weights pruned away (%)", ylabel="accuracy change (points)")
        ax.set_ylim(bottom=max(ax.get_ylim()[0], -4.0))
        ax.set_title(f"Trade-off (dense test error {100 * result['dense_error']:.2f}%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _plot(path, (6.5, 4.2), draw)


def pattern_title(net, layer):
    """What share of ``layer``'s weights survive, against the original (dense) layer and,
    when dead-neuron removal shrank it, against the layer as it is now."""
    W, o = net.layer(layer).params["W"], net.origin[layer]
    units = o["params"] - o["weights"]  # one bias per unit
    shape, origin = "x".join(map(str, W.data.shape)), f"{units}x{o['weights'] // units}"
    title = f"{layer}: {100 * W.nonzero() / o['weights']:.1f}% of the original {origin} weights kept"
    if shape == origin:
        return title + " (no neuron removed)"
    return title + f" ({100 * W.nonzero() / W.size:.1f}% of the {shape} layer after dead-neuron removal)"


def plot_pattern(net, path):
    """Fig. 4: the sparsity pattern of the first FC layer (kept connections in black)
    and, when that layer reads the image, how many connections each input pixel keeps."""
    fc = next(l for l in net.layers if l.kind == "linear")
    M = asnumpy(fc.params["W"].mask)
    side = int(numpy.sqrt(M.shape[1]))
    image = fc is net.layers[0] and len(net.input_shape) == 1 and side * side == M.shape[1]

    def draw(fig):
        fig.suptitle(pattern_title(net, fc.name), fontsize=10)
        ax = fig.add_subplot(1, 2 if image else 1, 1)
        ax.imshow(M, cmap="gray_r", aspect="auto", interpolation="nearest")
        ax.set_title(f"kept connections: {M.shape[0]} units x {M.shape[1]} inputs", fontsize=9)
        ax.set(xlabel="input index", ylabel="unit")
        if image:
            ax2 = fig.add_subplot(1, 2, 2)
            im = ax2.imshow(M.sum(axis=0).reshape(side, side), cmap="viridis")
            ax2.set_title("connections kept per input pixel", fontsize=9)
            ax2.axis("off")
            fig.colorbar(im, ax=ax2, fraction=0.046)
    return _plot(path, (10, 4) if image else (7, 4), draw, dpi=110)
