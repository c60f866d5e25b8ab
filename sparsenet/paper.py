"""The numbers Han, Pool, Tran and Dally publish (NIPS 2015, "Learning both Weights and Connections
for Efficient Neural Networks"), the one copy the code imports; ``docs/paper.md`` explains them.
Fractions (``.08`` is 8%), top-1 errors (``top5_*`` where given), parameter counts with biases as
published (267K is ``267_000``); per-layer columns as printed."""
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
    # AlexNet's fc1-fc3 in the paper are Caffe's fc6-fc8, the names used here.
    "alexnet": _table(4, "AlexNet",
                      conv1=(35_000, 211_000_000, .88, .84, .84), conv2=(307_000, 448_000_000, .52, .38, .33),
                      conv3=(885_000, 299_000_000, .37, .35, .18), conv4=(663_000, 224_000_000, .40, .37, .14),
                      conv5=(442_000, 150_000_000, .34, .37, .14), fc6=(38_000_000, 75_000_000, .36, .09, .03),
                      fc7=(17_000_000, 34_000_000, .40, .09, .03), fc8=(4_000_000, 8_000_000, 1.0, .25, .10),
                      total=(61_000_000, 1_500_000_000, .54, .11, .30)),
    # fc6: published as 4%; 3.8% is what the 10.3M total implies (reproduce/vgg-16.json uses it).
    "vgg-16": _table(5, "VGG-16", **dict((  # rows: weights, FLOP, act, weights left, FLOP left
        ("conv1_1", (2_000, 200_000_000, .53, .58, .58)),
        ("conv1_2", (37_000, 3_700_000_000, .89, .22, .12)),
        ("conv2_1", (74_000, 1_800_000_000, .80, .34, .30)),
        ("conv2_2", (148_000, 3_700_000_000, .81, .36, .29)),
        ("conv3_1", (295_000, 1_800_000_000, .68, .53, .43)),
        ("conv3_2", (590_000, 3_700_000_000, .70, .24, .16)),
        ("conv3_3", (590_000, 3_700_000_000, .64, .42, .29)),
        ("conv4_1", (1_000_000, 1_800_000_000, .51, .32, .21)),
        ("conv4_2", (2_000_000, 3_700_000_000, .45, .27, .14)),
        ("conv4_3", (2_000_000, 3_700_000_000, .34, .34, .15)),
        ("conv5_1", (2_000_000, 925_000_000, .32, .35, .12)),
        ("conv5_2", (2_000_000, 925_000_000, .29, .29, .09)),
        ("conv5_3", (2_000_000, 925_000_000, .19, .36, .11)),
        ("fc6", (103_000_000, 206_000_000, .38, .04, .01)),
        ("fc7", (17_000_000, 34_000_000, .42, .04, .02)),
        ("fc8", (4_000_000, 8_000_000, 1.0, .23, .09)),
        ("total", (138_000_000, 30_900_000_000, .64, .075, .21)),
    ))),
}


def weights_left(model):
    """``{layer: fraction of its weights kept}`` for ``model`` (no "total"): the paper's
    per-layer densities, e.g. for pruning a network at random to them."""
    return {name: r["weights_left"] for name, r in LAYERS[model]["rows"].items() if name != "total"}


# Deep Compression (Han, Mao & Dally, ICLR 2016), Tables 2-3: pruning (P) + quantisation (Q) + Huffman (H)
# on the LeNets. Per layer: weights, weights left after P, bits per weight after Q and after H, bits per
# relative index after Q and after H, and the compressed size as a fraction of the dense float32 layer after
# P+Q and after P+Q+H. Their ip1-ip3 are our fc1-fc3. Whole model: dense and compressed bytes, top-1 error.
def _dc(number, model, rows, dense_bytes, compressed_bytes, error):
    keys = ("weights", "weights_left", "weight_bits", "weight_bits_coded", "index_bits", "index_bits_coded",
            "rate", "rate_coded")
    return {"table": number, "source": f"Han, Mao & Dally 2016 (Deep Compression), Table {number} ({model})",
            "rows": {name: dict(zip(keys, r)) for name, r in rows.items()}, "dense_bytes": dense_bytes,
            "compressed_bytes": compressed_bytes, "compression": round(dense_bytes / compressed_bytes), "error": error}


DEEP_COMPRESSION = {
    "lenet-300-100": _dc(2, "LeNet-300-100", {
        "fc1": (235_000, .08, 6, 4.4, 5, 3.7, .031, .0232), "fc2": (30_000, .09, 6, 4.4, 5, 4.3, .038, .0304),
        "fc3": (1_000, .26, 6, 4.3, 5, 3.2, .157, .1270), "total": (266_000, .08, 6, 5.1, 5, 3.7, .031, .0249)},
        1_070_000, 27_000, .0158),
    "lenet-5": _dc(3, "LeNet-5", {
        "conv1": (500, .66, 8, 7.2, 5, 1.5, .785, .6745), "conv2": (25_000, .12, 8, 7.2, 5, 3.9, .060, .0528),
        "fc1": (400_000, .08, 5, 4.5, 5, 4.5, .027, .0245), "fc2": (5_000, .19, 5, 5.2, 5, 3.7, .069, .0613),
        "total": (431_000, .08, 5.3, 4.1, 5, 4.4, .0305, .0255)},
        1_720_000, 44_000, .0074),
}
