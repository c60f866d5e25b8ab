"""The numbers Han, Pool, Tran and Dally publish (NIPS 2015, "Learning both Weights and Connections
for Efficient Neural Networks"), the one copy the code imports; ``docs/paper.md`` explains them.
Fractions (``.08`` is 8%), top-1 errors (``top5_*`` where given), parameter counts with biases as
published (267K is ``267_000``); per-layer columns as printed (AlexNet, VGG-16: ``weights_left`` only)."""
# Table 1: the whole networks before and after pruning.
TABLE1 = {
    "lenet-300-100": {"dataset": "mnist", "error_before": .0164, "error_after": .0159,
                      "params_before": 267_000, "params_after": 22_000, "compression": 12},
    "lenet-5": {"dataset": "mnist", "error_before": .0080, "error_after": .0077,
                "params_before": 431_000, "params_after": 36_000, "compression": 12},
    "alexnet": {"dataset": "imagenet", "error_before": .4278, "error_after": .4277, "top5_before": .1973,
                "top5_after": .1967, "params_before": 61_000_000, "params_after": 6_700_000, "compression": 9},
    "vgg-16": {"dataset": "imagenet", "error_before": .3150, "error_after": .3134, "top5_before": .1132,
               "top5_after": .1088, "params_before": 138_000_000, "params_after": 10_300_000, "compression": 13},
}

_COLUMNS = ("weights", "flop", "act", "weights_left", "flop_left")


def _table(number, model, **rows):
    return {"table": number, "source": f"Han et al. 2015, Table {number} ({model})",
            "rows": {name: dict(zip(_COLUMNS, r)) if isinstance(r, tuple) else {"weights_left": r}
                     for name, r in rows.items()}}


# Tables 2-5: per layer, after pruning ("total" is the whole network).
LAYERS = {
    "lenet-300-100": _table(2, "LeNet-300-100",
                            fc1=(235_000, 470_000, .38, .08, .08), fc2=(30_000, 60_000, .65, .09, .04),
                            fc3=(1_000, 2_000, 1.0, .26, .17), total=(266_000, 532_000, .46, .08, .08)),
    "lenet-5": _table(3, "LeNet-5",
                      conv1=(500, 576_000, .82, .66, .66), conv2=(25_000, 3_200_000, .72, .12, .10),
                      fc1=(400_000, 800_000, .55, .08, .06), fc2=(5_000, 10_000, 1.0, .19, .10),
                      total=(431_000, 4_586_000, .77, .08, .16)),
    "alexnet": _table(4, "AlexNet", conv1=.84, conv2=.38, conv3=.35, conv4=.37, conv5=.37,
                      fc1=.09, fc2=.09, fc3=.25, total=.11),
    # fc6: published as about 4%; 3.8% is what the 10.3M total implies.
    "vgg-16": _table(5, "VGG-16", conv1_1=.58, conv1_2=.22, conv2_1=.34, conv2_2=.36, conv3_1=.53,
                     conv3_2=.24, conv3_3=.42, conv4_1=.32, conv4_2=.27, conv4_3=.34, conv5_1=.35,
                     conv5_2=.29, conv5_3=.36, fc6=.04, fc7=.04, fc8=.23, total=.075),
}


def weights_left(model):
    """``{layer: fraction of its weights kept}`` for ``model`` (no "total"): the paper's
    per-layer densities, e.g. for pruning a network at random to them."""
    return {name: r["weights_left"] for name, r in LAYERS[model]["rows"].items() if name != "total"}
