"""sparsenet: Han et al. 2015, "Learning both Weights and Connections for Efficient
Neural Networks", in NumPy/CuPy with hand-derived backprop (no autograd).

Train a network, prune its small-magnitude connections, retrain the rest, and iterate;
then store and run the sparse result. ``docs/paper.md`` summarises the paper.

Where the paper lives in the code (a test checks that every name below exists):

==============================  ===========================================================
paper                           code
==============================  ===========================================================
step 1, train                   :func:`sparsenet.engine.train`
step 2, prune by magnitude      :func:`sparsenet.pruning.prune`, :func:`sparsenet.pruning.quality_mask`
the mask rule                   :class:`sparsenet.param.Param`, :meth:`sparsenet.param.Param.prune`
step 3, retrain                 :func:`sparsenet.engine.train_epoch`, :class:`sparsenet.optim.SGD`
§3.1 L1/L2 regularisation       :meth:`sparsenet.optim.SGD.step`
§3.2 dropout-ratio adjustment   :func:`sparsenet.pruning.adjust_dropout`
§3.3 conv / FC retrained apart  :meth:`sparsenet.model.Network.freeze`
§3.4 iterative pruning          :func:`sparsenet.engine.prune_run`
§3.5 pruning neurons            :func:`sparsenet.pruning.remove_dead_neurons`
layers and their backprop       :mod:`sparsenet.layers` (plain), :mod:`sparsenet.fast_layers` (tuned)
storage, relative indices       :func:`sparsenet.codecs.relative_encode`, :func:`sparsenet.modelfile.export_model`
sparse inference                :class:`sparsenet.inference.SparseNetwork`
Tables 1-3, per-layer table     :func:`sparsenet.report.layer_report`
Fig. 4, sparsity pattern        :func:`sparsenet.figures.plot_pattern`
Fig. 5, accuracy trade-off      :func:`sparsenet.reproduce.tradeoff`
Fig. 6, sensitivity             :func:`sparsenet.report.sensitivity`
the paper's published numbers   :mod:`sparsenet.paper`
AlexNet, VGG-16 (Tables 4-5)    :func:`sparsenet.model.alexnet`, :func:`sparsenet.model.vgg_16`
LRN, grouped conv (AlexNet)     :func:`sparsenet.layers.lrn_forward`, :func:`sparsenet.layers.conv2d_forward`
trained weights, ImageNet       :func:`sparsenet.pretrained.import_weights`, :class:`sparsenet.imagenet.ImageFolder`
ONNX, PyTorch out and back      :func:`sparsenet.interop.export_onnx`, :func:`sparsenet.interop.import_torch`
the ImageNet plans              :func:`sparsenet.reproduce.reproduce_pretrained`, :func:`sparsenet.reproduce.apply_plan`
beyond: weight sharing          :func:`sparsenet.quantise.share_weights`, :meth:`sparsenet.param.Param.share`
beyond: Huffman, compressed     :func:`sparsenet.huffman.encode`, :func:`sparsenet.compressed.write`
beyond: studies over seeds      :func:`sparsenet.sweep` (:mod:`sparsenet.sweeps`, on Dask), :mod:`sparsenet.methods`, :mod:`sparsenet.stats`
==============================  ===========================================================

Supporting modules: :mod:`sparsenet.backend` (NumPy/CuPy dispatch), :mod:`sparsenet.cuda` (the GPU's fused
kernels, CUDA graphs and sparse kernel), :mod:`sparsenet.model`
(networks: the LeNets, AlexNet, VGG-16), :mod:`sparsenet.data` (MNIST, the splits a run reads),
:mod:`sparsenet.checkpoint` and
:mod:`sparsenet.h5io` (HDF5 files), :mod:`sparsenet.cli` (the ``sparsenet`` command).

The public API below is importable from ``sparsenet`` directly (``__all__``).
"""
__version__ = "0.2.0"

from . import backend
from .checkpoint import load_checkpoint, save_checkpoint
from .engine import Schedule, TrainConfig, evaluate, load_schedule, prune_run, train, uniform_schedule
from .inference import SparseNetwork
from .interop import export_onnx, export_torch, import_torch
from .model import Network, build_model, build_network
from .modelfile import export_model, load_model, storage_report
from .optim import SGD
from .param import Param
from .pruning import adjust_dropout, prune, remove_dead_neurons
from .quantise import share_weights
from .sweeps import sweep
from .util import SparsenetError

# BLAS threads: the package's default (1, or $SPARSENET_THREADS; BLAS's own when OPENBLAS_NUM_THREADS/OMP_NUM_THREADS
# is set) from the first import on, after NumPy's and SciPy's BLAS are loaded (backend.set_threads: how to change it)
backend.ensure_threads(strict=False)

__all__ = ["SGD", "Network", "Param", "Schedule", "SparseNetwork", "SparsenetError", "TrainConfig", "adjust_dropout",
           "build_model", "build_network", "evaluate", "export_model", "export_onnx", "export_torch", "import_torch",
           "load_checkpoint", "load_model", "load_schedule",
           "prune", "prune_run", "remove_dead_neurons", "save_checkpoint", "share_weights", "storage_report", "sweep",
           "train", "uniform_schedule"]
