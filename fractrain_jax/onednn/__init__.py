"""CPU kernels for XLA:CPU, called through JAX's FFI: oneDNN's convolution and BatchNorm,
and the quantizer's own one-pass kernels, built together against oneDNN.

- ``conv.cc``: the conv's kernels (forward, input gradient, weight gradient).
- ``batch_norm.cc``: training BatchNorm's (forward with the batch's statistics, backward).
- ``quantize.cc``: ``quant.quantize`` in one pass, and DFQ's blend backward in one pass.
- ``common.h``: what the oneDNN sources share (the engine, caller-given scratch space, errors as the FFI's).
- ``library.py``: finding oneDNN, building the kernels once and registering them.
- ``ops.py``: the conv and BatchNorm as JAX functions with their VJPs; the quantizer's
  kernels as JAX functions.

``fractrain_jax/kernels.py`` says when a step runs them (``train.kernels``);
``conv.py``, ``norm.py`` and ``quant.py`` route their ops here. What it may import:
nothing of the package (JAX, NumPy and the standard library only), so the algorithm's
layers can all build on it.
"""
