"""Test-session setup: two host CPU devices (for the sharding tests) and cheap compiles."""

import atexit
import os
import pathlib
import shutil
import sys
import tempfile

# `pytest` as well as `python -m pytest`: the package and configs/ live at the repo root.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Folder datasets cache their decoded arrays (and main.py its compiled steps); tests keep
# theirs out of ~/.cache, in a folder removed when the session ends.
if "FRACTRAIN_CACHE_DIR" not in os.environ:
  os.environ["FRACTRAIN_CACHE_DIR"] = tempfile.mkdtemp(prefix="fractrain_cache_")
  atexit.register(shutil.rmtree, os.environ["FRACTRAIN_CACHE_DIR"], ignore_errors=True)

# The main.py processes that tests start inherit cheap compiles through the environment.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")

import jax  # noqa: E402

# scripts/device_check.sh runs some test files on the GPU with FRACTRAIN_TEST_PLATFORM=gpu.
jax.config.update("jax_platforms", os.environ.get("FRACTRAIN_TEST_PLATFORM", "cpu"))
jax.config.update("jax_num_cpu_devices", 2)
# Tests use tiny models: compile time dominates, and these runs need no speed.
jax.config.update("jax_disable_most_optimizations", True)
# Many tests compile the same tiny programs (a method's step on the same model): the
# session's test processes and the main.py runs they start share one compilation cache,
# removed with the session's cache folder (the key holds the devices and XLA's options).
from fractrain_jax.run import platform as _platform  # noqa: E402

_platform.enable_compilation_cache(jax)


import pytest  # noqa: E402

# Real CIFAR-10 JPEGs shared beside the repository (never copied into it).
CIFAR10_TAR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def real_cifar10_folder(tmp_path_factory):
  """A small class-balanced image folder cut from the real CIFAR-10 JPEGs.

  50 training and 10 test images per class, in the `folder:PATH` layout.
  """
  import tarfile  # pylint: disable=import-outside-toplevel

  if not CIFAR10_TAR.is_file():
    pytest.skip(f"real CIFAR-10 not found at {CIFAR10_TAR}")
  root = tmp_path_factory.mktemp("cifar10_small")
  wanted = {"train": 50, "test": 10}
  counts: dict[tuple[str, str], int] = {}
  with tarfile.open(CIFAR10_TAR, "r:gz") as tar:
    for member in tar:
      parts = member.name.split("/")
      if not member.isfile() or len(parts) < 3 or parts[-3] not in wanted:
        continue
      split, cls = parts[-3], parts[-2]
      if counts.get((split, cls), 0) >= wanted[split]:
        continue
      counts[(split, cls)] = counts.get((split, cls), 0) + 1
      folder = root / split / cls
      folder.mkdir(parents=True, exist_ok=True)
      (folder / parts[-1]).write_bytes(tar.extractfile(member).read())
  return root


@pytest.fixture
def optimized_compiles():
  """XLA's optimizations on for one test whose time goes to running hundreds of steps, not
  to compiling them (the session default suits the many tests that compile and run a few).
  The CNNs' steps need none: their convs and BatchNorms are oneDNN's calls either way."""
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


# Files whose tests start main.py processes or train for hundreds of steps (tens of seconds
# each) run first: under pytest-xdist a long test collected last would leave the other
# worker idle at the end.
_SLOW_FIRST = ("test_processes.py", "test_attach_train.py", "test_workdir.py", "test_steering.py",
               "test_gated_lm.py", "test_train.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: order kept within.
