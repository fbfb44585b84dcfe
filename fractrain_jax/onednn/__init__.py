"""oneDNN's convolution kernels for XLA:CPU, called through JAX's FFI.

- ``conv.cc``: the kernels (forward conv, input gradient, weight gradient).
- ``library.py``: finding oneDNN, building the kernels once and registering them.
- ``ops.py``: the conv as a JAX function with its VJP.

``fractrain_jax/conv.py`` decides which convs of a step run here
(``train.conv_kernel``). What it may import: nothing of the package (JAX, NumPy and
the standard library only), so the algorithm's layers can all build on it.
"""
