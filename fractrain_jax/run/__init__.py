"""A training run: the loop, its record in the workdir, and the programs' process settings.

- ``train``: ``train_and_evaluate`` and ``evaluate_checkpoint``, the loop of every
  method; ``setup`` (``RunSetup``, what the loop runs with) and ``summary``
  (``summary.json``) beside it.
- ``checkpoints`` (with ``orbax_loops``), ``workdir`` (the lock, metrics.jsonl and
  TensorBoard kept in step with the checkpoints; ``tensorboard_writer``),
  ``divergence``, ``console`` (signals, log.txt, speed; no JAX), ``files`` (the
  workdir's file names; no JAX).
- ``config_check`` (early refusal of bad configs), ``command_line`` (main.py's
  one-line mistakes) and ``platform`` (XLA/TF settings applied before JAX starts).

What it may import: the algorithm (the top-level modules, ``models/``, ``data/``,
``attach/``) and itself; never ``report/`` or ``benchmark/``, and nothing of the
algorithm imports it (``tests/test_layout.py`` checks both). ``report/`` reads the
workdir through ``files`` and ``console`` alone, so those two stay free of JAX;
this file imports nothing, so ``platform`` can run before JAX is imported.
"""
