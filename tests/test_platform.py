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
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  monkeypatch.setattr(platform, "_accelerator_plugin_installed", lambda: plugin)
  platform.configure()
  flags = os.environ["XLA_FLAGS"]
  assert flags.startswith("--xla_dump_to=/tmp/x")  # What the user set stays.
  assert (platform.CPU_FLAG in flags) == want


def test_no_cpu_flags_leaves_xla_flags_alone(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  platform.configure(cpu_flags=False)
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
