"""Entry-point settings: the XLA:CPU flag goes only to a process that will run on the CPU."""

import os

import pytest

from fractrain_jax.run import platform


@pytest.mark.parametrize("platforms,plugin,want", [
    ("cpu", True, True),          # Asked for the CPU: the flag, whatever is installed.
    ("cuda", False, False),       # Asked for a GPU.
    ("tpu,cpu", False, False),    # The first platform is the one JAX uses.
    ("", False, True),            # Nothing asked, no accelerator plugin: the CPU.
    ("", True, False),            # Nothing asked, a CUDA/ROCm/TPU plugin: JAX picks it.
])
def test_cpu_flag_only_for_the_cpu_backend(monkeypatch, platforms, plugin, want):
  monkeypatch.setattr(platform, "keep_freed_memory", lambda: None)  # Not this process's.
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  monkeypatch.setattr(platform, "_accelerator_plugin_installed", lambda: plugin)
  platform.configure()
  flags = os.environ["XLA_FLAGS"]
  assert flags.startswith("--xla_dump_to=/tmp/x")  # What the user set stays.
  assert (platform.CPU_FLAG in flags) == want


_FAULTS = """
import ctypes, resource, sys, threading
from fractrain_jax.run import platform
if sys.argv[1] == "keep":
  assert platform.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size, faults = 96 << 20, []

def round_trip():  # As XLA:CPU's threads allocate a step's temporaries.
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(size)
  ctypes.memset(p, 1, size)
  libc.free(ctypes.c_void_p(p))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

for _ in range(3):
  t = threading.Thread(target=round_trip)
  t.start()
  t.join()
print(faults[-1])
"""


@pytest.mark.skipif(not (getattr(os, "confstr", None) and os.confstr("CS_GNU_LIBC_VERSION")),
                    reason="glibc's malloc only")
def test_kept_memory_is_not_faulted_in_again_by_each_step():
  """A thread's large allocation, freed and made again: glibc maps it afresh every time
  (a page fault per 4 KiB page), unless ``keep_freed_memory`` made it keep the pages."""
  import subprocess
  import sys

  def faults(mode):
    return int(subprocess.run([sys.executable, "-c", _FAULTS, mode], check=True,
                              capture_output=True, text=True).stdout)

  pages = (96 << 20) // 4096
  assert faults("system") > pages // 2
  assert faults("keep") < pages // 20


def test_malloc_is_kept_for_the_cpu_backend_only(monkeypatch):
  calls = []
  monkeypatch.setattr(platform, "keep_freed_memory", lambda: calls.append(1))
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  platform.configure()
  assert not calls
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  platform.configure(malloc=False)
  assert not calls
  platform.configure()
  assert calls == [1]


def test_no_cpu_flags_leaves_xla_flags_alone(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  platform.configure(cpu_flags=False, malloc=False)
  assert "XLA_FLAGS" not in os.environ


_COMPILE = """
import jax, jax.numpy as jnp
x = jnp.ones((8, 8, 8, 32)); w = jnp.ones((3, 3, 32, 32))
conv = lambda x: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                              dimension_numbers=("NHWC", "HWIO", "NHWC"))
f = jax.jit(lambda x, y: (conv(x), jnp.maximum(y * 2.0 + 1.0, 0.0)))
text = f.lower(x, x).compile().as_text()
bodies = [c for c in text.split("\\n\\n") if "ENTRY" not in c]
print(sum(c.count(" convolution(") for c in bodies), text.count("ynn_fusion"))
"""


@pytest.mark.parametrize("flags,conv_in_ynn", [
    (platform.CPU_FLAG, False),
    ("--xla_cpu_experimental_ynn_fusion_type=+eltwise", True),  # The flag before: the contrast.
])
def test_the_cpu_flag_leaves_convolutions_to_xla_and_element_wise_ops_to_ynnpack(
    flags, conv_in_ynn):
  # A 32-channel conv: YNNPACK takes convs of more than 16 channels unless told not to.
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _COMPILE], env=env, check=True,
                       capture_output=True, text=True).stdout.split()
  convs_in_fusions, ynn_fusions = int(out[0]), int(out[1])
  assert (convs_in_fusions > 0) == conv_in_ynn
  assert ynn_fusions > 0  # The element-wise ops.
