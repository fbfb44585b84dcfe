"""Test-session setup: two host CPU devices (for the sharding tests) and cheap compiles."""

import os
import pathlib
import sys

# `pytest` as well as `python -m pytest`: the package and configs/ live at the repo root.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 2)
# Tests use tiny models: compile time dominates, and these runs need no speed.
jax.config.update("jax_disable_most_optimizations", True)
