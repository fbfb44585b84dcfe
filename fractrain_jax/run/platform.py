"""Process-level settings that every entry point (main.py, benchmark, scripts) applies first.

Library modules never set XLA flags or environment variables: only a program
started from the command line knows which machine it runs on. Call
``configure()`` before JAX starts its backend.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import pathlib
import sys
import warnings

# XLA:CPU recomputes chains of cheap element-wise ops (BN, ReLU, residual adds)
# inside the transposes of weight-gradient convs; YNNPACK's element-wise fusion
# measured 1.4-1.5x faster CIFAR training steps on a 2-core AVX-512 CPU.
# Convolutions stay XLA's own (Eigen): YNNPACK takes those with more than 16
# channels unless told not to, and ran them up to 1.5x slower per call; without
# them ResNet-38 steps took 0.75-0.95x the time, every method (docs/RESULTS.md).
CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type=+eltwise,-individual_convolution"

# Distributions whose presence means JAX will pick an accelerator by default.
_ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")


def _accelerator_plugin_installed() -> bool:
  for dist in importlib.metadata.distributions():
    name = (dist.metadata["Name"] or "").lower()
    if name.startswith(_ACCELERATOR_PLUGINS):
      return True
  return False


def cpu_backend_expected() -> bool:
  """True when JAX will run on the CPU: ``JAX_PLATFORMS`` says so, or no accelerator plugin is there."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0] == "cpu"
  return not _accelerator_plugin_installed()


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_KEEP_BELOW = 2**31 - 1  # The largest trim threshold mallopt takes: ~2 GiB stays in the heap.


def keep_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory for the next allocation; False where the C
  library is not glibc.

  Why: glibc gives each thread that allocates an arena of its own, and an arena serves a
  request larger than its 64 MiB heap with a fresh mmap, unmapped again at free.
  XLA:CPU allocates a step's temporaries on its own threads, so every ResNet-38 step
  faulted in about 560 MB of new pages (137,000 minor faults, 0.45 s of kernel time a
  step); one arena that neither maps nor trims keeps those pages (docs/RESULTS.md,
  issue 28's sixth step). Call it before JAX starts its threads.
  """
  if not hasattr(os, "confstr") or not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith(
      "glibc"):
    return False
  libc = ctypes.CDLL(None)
  return all(libc.mallopt(option, value) == 1 for option, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_BELOW)))


def configure(*, cpu_flags: bool = True, malloc: bool = True) -> None:
  """XLA:CPU flags and glibc's malloc kept from unmapping a step's memory (both on the
  CPU backend only), and a TensorFlow that prints nothing at start.

  cpu_flags: False leaves XLA_FLAGS as it is (to measure without them).
  malloc: False leaves the C library's malloc as it is (``keep_freed_memory``).
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if cpu_flags and cpu_backend_expected() and "ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_FLAG}".strip()
  if malloc and cpu_backend_expected():
    keep_freed_memory()
  # TensorFlow, where it is used at all, only reads data: none of its start-up lines.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # Its oneDNN note ("oneDNN custom operations are on", with absl's "All log messages
  # before absl::InitializeLog()") ignores the level above; oneDNN speeds up TensorFlow's
  # matmuls and convolutions, which decoding and cropping images never run.
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


CACHE_ENV = "FRACTRAIN_CACHE_DIR"


def cache_root() -> pathlib.Path:
  """The project's cache folder: ``$FRACTRAIN_CACHE_DIR`` or ``~/.cache/fractrain_jax``."""
  root = os.environ.get(CACHE_ENV)
  return pathlib.Path(root).expanduser() if root else pathlib.Path.home() / ".cache" / "fractrain_jax"


def enable_compilation_cache(jax) -> pathlib.Path:
  """JAX's persistent compilation cache under ``cache_root()/jax``: a restart or resume of the
  same config loads its compiled steps instead of compiling them again."""
  folder = cache_root() / "jax"
  jax.config.update("jax_compilation_cache_dir", str(folder))
  # Everything, the small programs of eager model initialization too: together they
  # took seconds of every start.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return folder


def _orbax_leftover(unraisable) -> bool:
  """An unraisable error of a failed Orbax save or restore: TensorStore completing a future
  after Orbax closed the asyncio loop that waited on it, or a read coroutine of Orbax's
  raising while the garbage collector closes it."""
  exc, obj = unraisable.exc_value, unraisable.object
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    return True
  code = getattr(obj, "cr_code", None)
  return code is not None and any(part in code.co_filename for part in _QUIET_PACKAGES)


# Whose coroutines' failures at collection are the leftovers of a failed checkpoint.
_QUIET_PACKAGES = ("/orbax/", "/tensorstore/")


def quiet_closed_loop_callbacks() -> None:
  """Drops the known-harmless reports a failed checkpoint save or restore leaves behind.

  ``checkpoints`` already drains Orbax's event loops (``orbax_loops.draining``), so a
  failed restore leaves no pending read; this catches what a library version that
  ends its loops otherwise might still leave, whenever the collector reports it
  (up to thousands of tracebacks). Every other unraisable error is printed as before.
  """
  default = sys.unraisablehook

  def hook(unraisable):
    if not _orbax_leftover(unraisable):
      default(unraisable)

  sys.unraisablehook = hook
  # The coroutines such a failed save leaves behind are reported once more at exit.
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                          category=RuntimeWarning)
