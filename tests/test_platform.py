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
