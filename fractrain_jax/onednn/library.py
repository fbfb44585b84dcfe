"""Finds oneDNN, compiles ``conv.cc``, ``batch_norm.cc`` and ``quantize.cc`` against it and
JAX's FFI headers, and registers their handlers.

The shared library is built once per source, JAX and oneDNN version, compiler and CPU, into
``kernels/`` of the project's cache folder (``$FRACTRAIN_CACHE_DIR`` or
``~/.cache/fractrain_jax``, as in ``run/platform.py``), and loaded from there after.
oneDNN comes from the ``onednn-devel-cpu-gomp`` wheel (requirements.txt: headers, and
``libdnnl.so`` through its dependency ``onednn-cpu-gomp``) or from ``$FRACTRAIN_ONEDNN_ROOT``
(a folder with ``include/oneapi/dnnl/dnnl.hpp`` and ``lib/libdnnl.so.3``). The compiler is
``$CXX``, else ``c++`` or ``g++``.

``status()`` says whether the kernels can run here and, if not, why; nothing raises
until a caller asks for the kernels (``require()``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import NamedTuple

import jax

SOURCES = tuple(pathlib.Path(__file__).with_name(n)
                for n in ("conv.cc", "batch_norm.cc", "quantize.cc"))
HEADERS = (pathlib.Path(__file__).with_name("common.h"),)  # Included by the sources.
ROOT_ENV = "FRACTRAIN_ONEDNN_ROOT"
WHEEL = "onednn-devel-cpu-gomp"
# The project's cache folder (run/platform.py's cache_root; this layer may not import it).
CACHE_ENV = "FRACTRAIN_CACHE_DIR"
# FFI target names, as the handlers in the sources are named: a conv's three passes,
# BatchNorm's two.
FORWARD = "FractrainOneDnnConvForward"
INPUT_GRAD = "FractrainOneDnnConvInputGrad"
WEIGHT_GRAD = "FractrainOneDnnConvWeightGrad"
BN_FORWARD = "FractrainOneDnnBatchNormForward"
BN_BACKWARD = "FractrainOneDnnBatchNormBackward"
BN_RELU_FORWARD = "FractrainOneDnnBatchNormReluForward"  # BatchNorm, then ReLU, fused.
BN_RELU_BACKWARD = "FractrainOneDnnBatchNormReluBackward"
# The quantizer's own kernels, built and run beside oneDNN's (its OpenMP threads).
QUANTIZE = "FractrainQuantize"
BLEND_GRAD = "FractrainBlendGrad"
TARGETS = (FORWARD, INPUT_GRAD, WEIGHT_GRAD, BN_FORWARD, BN_BACKWARD, BN_RELU_FORWARD,
           BN_RELU_BACKWARD, QUANTIZE, BLEND_GRAD)


class Status(NamedTuple):
  ok: bool
  reason: str  # Where the library was loaded from, or why it was not.


class OneDnnUnavailable(RuntimeError):
  """The oneDNN kernels were asked for but cannot be built or loaded here."""


def _root() -> pathlib.Path:
  """The folder holding oneDNN's ``include/`` and ``lib/``."""
  if os.environ.get(ROOT_ENV):
    return pathlib.Path(os.environ[ROOT_ENV]).expanduser()
  try:
    files = importlib.metadata.files(WHEEL) or []
  except importlib.metadata.PackageNotFoundError:
    raise OneDnnUnavailable(f"oneDNN is not installed: pip install {WHEEL} (requirements.txt), "
                            f"or set {ROOT_ENV} to a oneDNN install folder") from None
  header = next((f for f in files if str(f).endswith("oneapi/dnnl/dnnl.hpp")), None)
  if header is None:
    raise OneDnnUnavailable(f"the {WHEEL} wheel lists no oneapi/dnnl/dnnl.hpp")
  # .../include/oneapi/dnnl/dnnl.hpp -> ...
  return pathlib.Path(header.locate()).resolve().parents[3]


def _compiler() -> str:
  for name in (os.environ.get("CXX"), "c++", "g++"):
    if name and shutil.which(name):
      return shutil.which(name)
  raise OneDnnUnavailable("no C++ compiler found ($CXX, c++ or g++) to build the oneDNN "
                          "kernels")


def _cpu_flags() -> bytes:
  """The CPU's feature flags, for the build's key: a cache folder shared between machines
  keeps one build per kind of CPU."""
  try:
    with open("/proc/cpuinfo", "rb") as f:
      return next((line for line in f if line.startswith(b"flags")), b"")
  except OSError:
    return os.uname().machine.encode()


def _build(root: pathlib.Path) -> pathlib.Path:
  include, lib = root / "include", root / "lib"
  if not (include / "oneapi" / "dnnl" / "dnnl.hpp").is_file():
    raise OneDnnUnavailable(f"no oneapi/dnnl/dnnl.hpp under {include}")
  if not (lib / "libdnnl.so.3").is_file():
    raise OneDnnUnavailable(f"no libdnnl.so.3 under {lib} (oneDNN 3.x)")
  cxx = _compiler()
  # -march=native: the library is built where it runs (the CPU's flags are in the key);
  # no FMA contraction, so quantize.cc's arithmetic is quant.py's to the bit; OpenMP is
  # oneDNN's own runtime here (the gomp build).
  command = [cxx, "-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-std=c++17",
             "-shared", "-fPIC", "-DNDEBUG", "-w",
             f"-I{jax.ffi.include_dir()}", f"-I{include}", *map(str, SOURCES), f"-L{lib}",
             "-l:libdnnl.so.3", f"-Wl,-rpath,{lib}"]
  version = (include / "oneapi" / "dnnl" / "dnnl_version.h").read_bytes()
  key = hashlib.sha256(b"\0".join([*(p.read_bytes() for p in SOURCES + HEADERS), version,
                                   " ".join(command).encode(),
                                   jax.__version__.encode(), sys.version.encode(),
                                   _cpu_flags()])).hexdigest()
  folder = pathlib.Path(os.environ.get(CACHE_ENV) or "~/.cache/fractrain_jax").expanduser()
  folder = folder / "kernels"
  target = folder / f"onednn_kernels-{key[:16]}.so"
  if target.is_file():
    return target
  import fcntl  # pylint: disable=import-outside-toplevel  # POSIX: the kernels build on Linux.
  try:
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder / f".{target.name}.lock", "w")  # pylint: disable=consider-using-with
  except OSError as e:
    raise OneDnnUnavailable(f"cannot write the oneDNN kernels' build to {folder}: {e}; "
                            f"set {CACHE_ENV} to a writable folder") from None
  with lock:
    # Processes starting at once (test workers, the processes of one run) wait for the
    # first one's build instead of each compiling the same library.
    fcntl.flock(lock, fcntl.LOCK_EX)
    if target.is_file():
      return target
    fd, partial = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
      done = subprocess.run(command + ["-o", partial], capture_output=True, text=True,
                            check=False)
      if done.returncode != 0:
        raise OneDnnUnavailable(f"building the oneDNN kernels failed ({' '.join(command)}):\n"
                                f"{done.stderr[-2000:]}")
      # A reader never sees a partial file: the rename is atomic.
      os.replace(partial, target)
    finally:
      if os.path.exists(partial):
        os.remove(partial)
  return target


@functools.cache
def _load() -> pathlib.Path:
  path = _build(_root())
  library = ctypes.cdll.LoadLibrary(str(path))
  for name in TARGETS:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")
  return path


@functools.cache
def status() -> Status:
  """Whether the kernels run here (x86-64 Linux with oneDNN and a C++ compiler), building
  and registering them the first time."""
  if sys.platform != "linux" or os.uname().machine != "x86_64":
    return Status(False, f"the oneDNN kernels are built for x86-64 Linux only, not "
                         f"{sys.platform}/{os.uname().machine}")
  try:
    return Status(True, str(_load()))
  except OneDnnUnavailable as e:
    return Status(False, str(e))
  except OSError as e:  # The built library would not load (a missing libgomp, say).
    return Status(False, f"loading the oneDNN kernels failed: {e}")


def require() -> None:
  """Builds (once) and registers the kernels; raises OneDnnUnavailable saying why not."""
  found = status()
  if not found.ok:
    raise OneDnnUnavailable(found.reason)
