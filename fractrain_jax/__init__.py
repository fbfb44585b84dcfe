"""fractrain-jax: FracTrain (NeurIPS 2020) low-precision training in JAX/Flax NNX.

The folders are the layers; imports go one way, down this list:

- ``benchmark/``, ``report/``: programs. ``report/`` reads a run's workdir
  back and draws it, without JAX (of ``run/`` only ``files`` and ``console``).
- ``run/``: a training run: the loop (``run.train``), its checkpoints and its
  record in the workdir, and the programs' process settings.
- The algorithm, here at the top: ``quant``, ``conv``, ``norm``, ``layers``, ``cost``
  (numerics, the convs and BatchNorm on oneDNN's or XLA's kernels with ``kernels``
  choosing, quantized layers, bit-scaled cost), ``pfq``, ``dfq``, ``optim``, ``methods``
  (one object per method) and ``steps`` (the jitted ``Trainer`` that a user's
  own loop also drives), with ``defaults`` (the config schema), ``errors``
  (one-line mistakes) and ``processes`` (how a batch splits over processes);
  beside them ``models/`` (the model zoo), ``attach/`` (FracTrain on a user's
  own NNX model), ``data/`` (the data sources) and, under them all, ``onednn/``
  (oneDNN's conv and BatchNorm kernels through JAX's FFI).

What it may import: the top-level modules import each other and ``models/``,
``attach/``, ``data/`` and ``onednn/``; never ``run/``, ``report/`` or ``benchmark/``. Each
folder's ``__init__.py`` states its own rule, and ``tests/test_layout.py``
checks every import against them, and that no import circle exists.
"""

__version__ = "0.1.0"
