"""sparsenet: Han et al. 2015, "Learning both Weights and Connections for Efficient
Neural Networks", in NumPy/CuPy with hand-derived backprop (no autograd).

Modules, in reading order:

* :mod:`sparsenet.backend`    NumPy/CuPy dispatch (``get_array_module``)
* :mod:`sparsenet.layers`     forward/backward of every layer, with the equations
* :mod:`sparsenet.model`      networks and the LeNet architectures
* :mod:`sparsenet.optim`      SGD with momentum, L1/L2, learning-rate policies
* :mod:`sparsenet.data`       MNIST / Fashion-MNIST with checksum verification
* :mod:`sparsenet.checkpoint` HDF5 checkpoints (atomic writes)
* :mod:`sparsenet.train`      the training loop and evaluation
* :mod:`sparsenet.cli`        the ``sparsenet`` command
"""
__version__ = "0.1.0"
