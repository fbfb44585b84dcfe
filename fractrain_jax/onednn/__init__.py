"""oneDNN's convolution and BatchNorm kernels for XLA:CPU, called through JAX's FFI.

- ``conv.cc``: the conv's kernels (forward, input gradient, weight gradient).
- ``batch_norm.cc``: training BatchNorm's (forward with the batch's statistics, backward).
- ``common.h``: what both share (the engine, caller-given scratch space, errors as the FFI's).
- ``library.py``: finding oneDNN, building the kernels once and registering them.
- ``ops.py``: the conv and BatchNorm as JAX functions with their VJPs.

``fractrain_jax/kernels.py`` says when a step runs them (``train.kernels``);
``conv.py`` and ``norm.py`` route their ops here. What it may import: nothing of the package (JAX, NumPy and
the standard library only), so the algorithm's layers can all build on it.
"""
