"""Which kernels run the convs, BatchNorms and quantizers of a step: the FFI's or XLA's.

``config.train.kernels`` chooses "onednn" (``fractrain_jax/onednn``: oneDNN's conv and
BatchNorm through JAX's FFI, 1.5-7x faster per call than XLA:CPU's fusions on an
AVX-512 CPU, docs/RESULTS.md "Fifth step", and the quantizer's one-pass kernels, the
same bits as XLA's, "Sixth step"), "xla" (XLA's: earlier versions' numerics)
or "auto" (oneDNN's on a one-device CPU mesh where they build, XLA's elsewhere: a
mesh of several devices partitions XLA's ops, not a foreign call).

The setting is read when a step is traced (``use``), so a model called outside a
step (tests, a user's own loop) runs XLA's; ops the oneDNN kernels do not take (not
float32, an input dilation, batch groups, a BatchNorm over other axes) stay XLA's.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax
from absl import logging

from fractrain_jax.errors import ConfigError
from fractrain_jax.onednn import library

AUTO, XLA, ONEDNN = "auto", "xla", "onednn"
CHOICES = (AUTO, XLA, ONEDNN)

_CURRENT: contextvars.ContextVar[str] = contextvars.ContextVar("fractrain_kernels", default=XLA)


def _one_cpu(mesh: jax.sharding.Mesh) -> bool:
  return mesh.devices.size == 1 and mesh.devices.flat[0].platform == "cpu"


def resolve(setting: str, mesh: jax.sharding.Mesh) -> str:
  """The kernels ("xla" or "onednn") a step on ``mesh`` runs for ``setting``; an explicit
  "onednn" that cannot run here is a ConfigError saying why."""
  if setting not in CHOICES:
    raise ConfigError(f"config.train.kernels={setting!r}; expected one of {CHOICES}")
  if setting == XLA:
    return XLA
  if not _one_cpu(mesh):
    if setting == ONEDNN:
      raise ConfigError(
          f"config.train.kernels='onednn' runs on a one-device CPU mesh; this mesh has "
          f"{mesh.devices.size} {mesh.devices.flat[0].platform} device(s): expected 'auto' or "
          "'xla'")
    return XLA
  found = library.status()
  if found.ok:
    return ONEDNN
  if setting == ONEDNN:
    raise ConfigError(f"config.train.kernels='onednn': {found.reason}; expected 'auto' or "
                      "'xla' where oneDNN cannot be built")
  logging.warning("Convs and BatchNorms run XLA's kernels, not oneDNN's "
                  "(train.kernels='auto'): %s", found.reason)
  return XLA


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
  """Convs and BatchNorms traced inside run ``name``'s kernels ("xla" or "onednn", as
  ``resolve`` gives it)."""
  if name not in (XLA, ONEDNN):
    raise ValueError(f"kernels {name!r}; expected 'xla' or 'onednn'")
  token = _CURRENT.set(name)
  try:
    yield
  finally:
    _CURRENT.reset(token)


def current() -> str:
  """The kernels of the step being traced ("xla" outside any)."""
  return _CURRENT.get()
