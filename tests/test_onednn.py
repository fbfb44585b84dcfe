"""oneDNN's conv and BatchNorm kernels (fractrain_jax/onednn), and how conv.py and norm.py
route ops to them.

The forward conv is checked against a float64 NumPy sum over the kernel window, both
gradients against XLA's own conv (another implementation, float32), over strides,
asymmetric padding, dilation and groups; BatchNorm against Flax's (its output, the
running averages and the gradients); the routing by the jaxpr's calls; the Trainer's
choice of kernels against its mesh and oneDNN's availability; and one whole train step
against the same step on XLA's kernels.
"""

from __future__ import annotations

import pathlib
import subprocess
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fractrain_jax import conv, defaults, kernels, norm, steps
from fractrain_jax.errors import ConfigError
from fractrain_jax.onednn import library, ops
from fractrain_jax.run import config_check

DN = ("NHWC", "HWIO", "NHWC")

needs_onednn = pytest.mark.skipif(not library.status().ok, reason=library.status().reason)


def _numpy_conv(x, k, strides, padding, dilation, groups):
  """y[n, h, w, o] = sum over i, j, c of xpad[n, h*s + i*d, w*s + j*d, c] * k[i, j, c, o]."""
  x, k = np.asarray(x, np.float64), np.asarray(k, np.float64)
  (lo_h, hi_h), (lo_w, hi_w) = padding
  xp = np.pad(x, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)))
  kh, kw, cin, cout = k.shape
  (sh, sw), (dh, dw) = strides, dilation
  ho = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
  wo = (xp.shape[2] - (kw - 1) * dw - 1) // sw + 1
  per_out = cout // groups
  y = np.zeros((x.shape[0], ho, wo, cout))
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, i * dh:i * dh + (ho - 1) * sh + 1:sh, j * dw:j * dw + (wo - 1) * sw + 1:sw]
      for g in range(groups):
        y[..., g * per_out:(g + 1) * per_out] += np.einsum(
            "nhwc,co->nhwo", patch[..., g * cin:(g + 1) * cin], k[i, j, :, g * per_out:(g + 1) * per_out])
  return y


CASES = [  # (input shape, kernel shape, strides, padding, dilation, groups)
    ((3, 9, 9, 4), (3, 3, 4, 8), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
    ((2, 10, 9, 6), (3, 3, 6, 5), (2, 2), ((1, 1), (1, 1)), (1, 1), 1),  # strided, odd width
    ((2, 8, 8, 3), (3, 2, 3, 4), (2, 1), ((0, 2), (1, 0)), (1, 1), 1),   # asymmetric
    ((2, 9, 9, 4), (3, 3, 4, 4), (1, 1), ((2, 2), (2, 2)), (2, 2), 1),   # dilated
    ((2, 7, 7, 6), (3, 3, 2, 9), (1, 1), ((1, 1), (1, 1)), (1, 1), 3),   # grouped
    ((2, 7, 7, 8), (3, 3, 1, 8), (2, 2), ((1, 1), (1, 1)), (1, 1), 8),   # depthwise
    ((4, 6, 6, 5), (1, 1, 5, 7), (1, 1), ((0, 0), (0, 0)), (1, 1), 1),   # 1x1
]


def _args(strides, padding, dilation, groups):
  return dict(window_strides=strides, padding=padding, rhs_dilation=dilation,
              dimension_numbers=DN, feature_group_count=groups)


def _inputs(x_shape, k_shape, seed=0):
  kx, kk = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, x_shape), jax.random.normal(kk, k_shape) * 0.3


@needs_onednn
@pytest.mark.parametrize("x_shape,k_shape,strides,padding,dilation,groups", CASES)
def test_the_kernels_compute_the_conv_and_its_gradients(x_shape, k_shape, strides, padding,
                                                        dilation, groups):
  x, k = _inputs(x_shape, k_shape)
  args = _args(strides, padding, dilation, groups)
  win = ops.window(x.shape, k.shape, args)
  y, vjp = jax.vjp(jax.jit(lambda x, k: ops.conv(x, k, win)), x, k)
  expected = _numpy_conv(x, k, strides, padding, dilation, groups)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  g = jax.random.normal(jax.random.key(1), y.shape)
  y_xla, vjp_xla = jax.vjp(lambda x, k: jax.lax.conv_general_dilated(x, k, **args), x, k)
  for got, want in zip(vjp(g), vjp_xla(g)):
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  np.testing.assert_array_equal(y_xla.shape, y.shape)


@needs_onednn
def test_same_padding_strings_match_explicit_pads():
  x, k = _inputs((2, 9, 9, 4), (3, 3, 4, 6))
  for padding in ("SAME", "VALID"):
    args = _args((2, 2), padding, (1, 1), 1)
    win = ops.window(x.shape, k.shape, args)
    got = jax.jit(lambda x, k, win=win: ops.conv(x, k, win))(x, k)
    want = jax.lax.conv_general_dilated(x, k, **args)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_the_same_program_gives_the_same_bits_twice():
  x, k = _inputs((8, 16, 16, 16), (3, 3, 16, 16))
  win = ops.window(x.shape, k.shape, _args((1, 1), ((1, 1), (1, 1)), (1, 1), 1))
  grads = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(ops.conv(x, k, win))), (0, 1)))
  first, second = grads(x, k), grads(x, k)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)


def _calls(fn, *args) -> str:
  return str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("extra,taken", [
    ({}, True),
    ({"lhs_dilation": (2, 2)}, False),                      # transposed conv: XLA's
    ({"dimension_numbers": ("NCHW", "OIHW", "NCHW")}, False),  # another layout: XLA's
])
def test_conv_routes_the_convs_the_kernels_take(extra, taken):
  x, k = _inputs((2, 6, 6, 4), (3, 3, 4, 4))
  if "dimension_numbers" in extra:
    x, k = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(k, (3, 2, 0, 1))
  args = _args((1, 1), ((1, 1), (1, 1)), (1, 1), 1) | extra
  with kernels.use(kernels.ONEDNN):
    jaxpr = _calls(lambda x, k: conv.conv_general_dilated(x, k, **args), x, k)
  assert (library.FORWARD in jaxpr) == taken
  assert ("conv_general_dilated" in jaxpr) != taken
  with kernels.use(kernels.XLA):  # And never outside the oneDNN setting.
    assert library.FORWARD not in _calls(lambda x, k: conv.conv_general_dilated(x, k, **args), x, k)


def test_bfloat16_convs_stay_xla():
  x, k = _inputs((2, 6, 6, 4), (3, 3, 4, 4))
  x, k = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
  with kernels.use(kernels.ONEDNN):
    jaxpr = _calls(lambda x, k: conv.conv_general_dilated(
        x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN), x, k)
  assert library.FORWARD not in jaxpr and "conv_general_dilated" in jaxpr


def _mesh(n):
  return jax.sharding.Mesh(np.array(jax.devices("cpu")[:n]), ("data",))


def test_the_kernel_setting_resolves_by_mesh_and_availability(monkeypatch, caplog):
  one, two = _mesh(1), _mesh(2)
  assert kernels.resolve("xla", one) == kernels.XLA
  assert kernels.resolve("auto", two) == kernels.XLA  # Sharded: XLA's, whose convs partition.
  with pytest.raises(ConfigError, match=r"kernels='onednn' runs on a one-device CPU mesh; "
                                        r"this mesh has 2 cpu device"):
    kernels.resolve("onednn", two)
  with pytest.raises(ConfigError, match=r"config.train.kernels='fast'; expected one of "
                                        r"\('auto', 'xla', 'onednn'\)"):
    kernels.resolve("fast", one)
  monkeypatch.setattr(kernels.library, "status", lambda: library.Status(True, "here"))
  assert kernels.resolve("auto", one) == kernels.ONEDNN
  assert kernels.resolve("onednn", one) == kernels.ONEDNN
  monkeypatch.setattr(kernels.library, "status", lambda: library.Status(False, "no compiler found"))
  assert kernels.resolve("auto", one) == kernels.XLA
  assert "no compiler found" in caplog.text
  with pytest.raises(ConfigError, match=r"kernels='onednn': no compiler found; expected "
                                        r"'auto' or 'xla'"):
    kernels.resolve("onednn", one)


def test_a_gpu_runs_xla_s_convs_and_its_one_weight_gradient_conv(monkeypatch):
  """The GPU path: on a one-device GPU mesh 'auto' is XLA's kernels with XLA's
  whole-batch weight-gradient conv, wherever oneDNN could be built; 'onednn' is refused."""
  gpu = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="gpu")]))
  monkeypatch.setattr(kernels.library, "status", lambda: library.Status(True, "here"))
  assert kernels.resolve("auto", gpu) == kernels.XLA
  with pytest.raises(ConfigError, match=r"this mesh has 1 gpu device"):
    kernels.resolve("onednn", gpu)
  assert conv.resolve_split(conv.AUTO, gpu) == conv.Split(0)


def test_config_check_refuses_an_unknown_kernel():
  config = defaults.get_config()
  config.train.kernels = "mkl"
  with pytest.raises(ConfigError, match=r"config.train.kernels='mkl'; expected one of"):
    config_check.validate(config)


def test_a_missing_onednn_is_named_with_what_to_do(tmp_path, monkeypatch):
  with pytest.raises(library.OneDnnUnavailable, match=r"no oneapi/dnnl/dnnl.hpp under"):
    library._build(tmp_path)
  monkeypatch.setenv(library.ROOT_ENV, str(tmp_path))
  assert library._root() == tmp_path
  monkeypatch.delenv(library.ROOT_ENV)
  monkeypatch.setattr(library.importlib.metadata, "files", _not_installed)
  with pytest.raises(library.OneDnnUnavailable, match=r"pip install onednn-devel-cpu-gomp"):
    library._root()


def _not_installed(name):
  raise library.importlib.metadata.PackageNotFoundError(name)


def test_processes_starting_at_once_build_the_library_once(tmp_path, monkeypatch):
  """Two builds at once (two test workers, the processes of one run): the second waits for
  the first's file instead of compiling again."""
  import threading  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel

  root = tmp_path / "onednn"
  (root / "include" / "oneapi" / "dnnl").mkdir(parents=True)
  (root / "lib").mkdir()
  for f in ("include/oneapi/dnnl/dnnl.hpp", "include/oneapi/dnnl/dnnl_version.h",
            "lib/libdnnl.so.3"):
    (root / f).write_text("")
  compiles = []

  def compile_(command, **_):
    compiles.append(command)
    time.sleep(0.5)  # A compile long enough for the other build to arrive meanwhile.
    pathlib.Path(command[-1]).write_bytes(b"library")
    return subprocess.CompletedProcess(command, 0, "", "")

  monkeypatch.setenv(library.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.setattr(library.subprocess, "run", compile_)
  built = []
  threads = [threading.Thread(target=lambda: built.append(library._build(root)))
             for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(compiles) == 1 and len(built) == 2 and built[0] == built[1]
  assert built[0].read_bytes() == b"library"


@needs_onednn
@pytest.mark.parametrize("shape,relu", [((4, 5, 5, 3), False), ((16, 8, 8, 16), False),
                                        ((16, 8, 8, 16), True)])
def test_batch_norm_on_onednn_is_flax_batch_norm(shape, relu):
  """Output, running averages and the gradients of x, scale and bias, against Flax's own
  call of the same module (two-pass variance, PyTorch's momentum and epsilon), and with
  a ReLU after it (fused on oneDNN) against Flax's followed by ``jax.nn.relu``."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  x = jax.random.normal(jax.random.key(0), shape) * 3.0 + 1.5
  g = jax.random.normal(jax.random.key(1), shape)

  def run(kernel):
    bn = norm.BatchNorm(shape[-1], momentum=0.9, epsilon=1e-5, use_fast_variance=False,
                        rngs=nnx.Rngs(0))
    bn.scale[...] = jnp.linspace(0.5, 2.0, shape[-1])
    bn.bias[...] = jnp.linspace(-1.0, 1.0, shape[-1])
    graphdef, params, stats = nnx.split(bn, nnx.Param, ...)

    def loss(params, x):
      model = nnx.merge(graphdef, params, stats, copy=True)
      with kernels.use(kernel):
        y = model(x, use_running_average=False, relu=relu)
      return jnp.vdot(y, g), (y, nnx.state(model, nnx.Not(nnx.Param)))

    fn = jax.jit(jax.grad(loss, (0, 1), has_aux=True))
    return fn(params, x), str(jax.make_jaxpr(fn)(params, x))

  ((d_params, d_x), (y, stats)), text = run(kernels.ONEDNN)
  ((want_params, want_x), (want_y, want_stats)), xla_text = run(kernels.XLA)
  target = library.BN_RELU_FORWARD if relu else library.BN_FORWARD
  assert text.count("FractrainOneDnnBatchNorm") == 2 and target in text  # Forward, backward.
  assert "FractrainOneDnn" not in xla_text
  assert (float(jnp.min(y)) == 0.0) == relu
  chex.assert_trees_all_close(y, want_y, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(stats, want_stats, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(d_params, want_params, rtol=1e-4, atol=1e-4)
  chex.assert_trees_all_close(d_x, want_x, rtol=1e-4, atol=1e-5)


@needs_onednn
def test_the_fused_relu_is_relu_after_the_batch_norm_to_the_bit():
  x = jax.random.normal(jax.random.key(2), (8, 6, 6, 8))
  scale, shift = jnp.linspace(0.5, 2.0, 8), jnp.linspace(-1.0, 1.0, 8)
  g = jax.random.normal(jax.random.key(3), x.shape)

  def fused(x, scale, shift):
    return jnp.vdot(ops.batch_norm(x, scale, shift, 1e-5, True)[0], g)

  def apart(x, scale, shift):
    return jnp.vdot(jax.nn.relu(ops.batch_norm(x, scale, shift, 1e-5)[0]), g)

  for a, b in zip(jax.jit(jax.value_and_grad(fused, (0, 1, 2)))(x, scale, shift),
                  jax.jit(jax.value_and_grad(apart, (0, 1, 2)))(x, scale, shift)):
    chex.assert_trees_all_equal(a, b)


@needs_onednn
def test_batch_norm_outside_training_or_on_other_axes_is_flax_own():
  from flax import nnx  # pylint: disable=import-outside-toplevel

  def calls(x, running):
    graphdef, state = nnx.split(norm.BatchNorm(x.shape[-1], rngs=nnx.Rngs(0)))
    with kernels.use(kernels.ONEDNN):
      return str(jax.make_jaxpr(lambda x: nnx.merge(graphdef, state, copy=True)(
          x, use_running_average=running))(x))

  assert library.BN_FORWARD in calls(jnp.ones((2, 3, 3, 4)), False)  # The contrast.
  assert library.BN_FORWARD not in calls(jnp.ones((2, 3, 3, 4)), True)  # Evaluation.
  assert library.BN_FORWARD not in calls(jnp.ones((2, 3, 3, 4), jnp.bfloat16), False)
  assert library.BN_FORWARD not in calls(jnp.ones((2, 4)), False)  # [N, C]: Flax's.


def _one_step(method, kernel):
  """A one-device Trainer's first step of ``method`` on resnet8 with ``kernel``'s convs:
  the state after it, its metrics, and the jaxprs of the train and the eval step."""
  from fractrain_jax import data, methods  # pylint: disable=import-outside-toplevel
  from fractrain_jax.benchmark import speed  # pylint: disable=import-outside-toplevel

  config = speed.step_config(method, "resnet8", 8)
  config.train.num_devices = 1
  config.train.kernels = kernel
  trained = methods.get(method)
  model = trained.create_model(config, 10, 0)
  trainer = steps.Trainer(config, model, mean=data.CIFAR_MEAN, std=data.CIFAR_STD)
  rng = np.random.default_rng(0)
  batch = trainer.put_replicated((rng.integers(0, 256, (16, 32, 32, 3), np.uint8),
                                  rng.integers(0, 10, (16,), np.int32)))
  args = (trainer.init_state(0), batch, jnp.float32(config.dfq.target_cp),
          jnp.float32(config.dfq.tau_start))
  fn = trainer.train_step(trained.step_precision(config, 0))
  jaxpr = str(jax.make_jaxpr(fn)(*args))
  images, labels = batch
  jaxpr += str(jax.make_jaxpr(trainer.eval_step(trained.step_precision(config, 0)))(
      args[0], images[:8], labels[:8], jnp.ones((8,), bool)))
  state, metrics = fn(*args)
  return trainer.kernels, state, metrics, jaxpr


@needs_onednn
def test_a_train_step_on_onednn_matches_the_step_on_xla():
  kernel, state, metrics, jaxpr = _one_step("fp32", "onednn")
  # resnet8's 9 convs, in the train step and in the eval step.
  assert kernel == kernels.ONEDNN and jaxpr.count(library.FORWARD) == 18
  assert "conv_general_dilated" not in jaxpr
  # Training's BatchNorms: the stem's and each block's first with its ReLU fused (4), the
  # blocks' second and the projection shortcuts' without (5); evaluation's are Flax's.
  assert jaxpr.count(library.BN_RELU_FORWARD) == 4 and jaxpr.count(library.BN_FORWARD) == 5
  _, xla_state, xla_metrics, xla_jaxpr = _one_step("fp32", "xla")
  assert library.FORWARD not in xla_jaxpr
  chex.assert_trees_all_close(metrics["ce"], xla_metrics["ce"], rtol=1e-5)
  chex.assert_trees_all_close(state.params, xla_state.params, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(state.batch_stats, xla_state.batch_stats, rtol=1e-4, atol=1e-5)


@needs_onednn
def test_a_dfq_step_runs_its_convs_on_onednn():
  """DFQ's quantized convs too; its stochastic rounding amplifies last-bit differences,
  so only the forward loss (before any rounding of gradients) is compared."""
  _, _, metrics, jaxpr = _one_step("dfq", "onednn")
  _, _, xla_metrics, _ = _one_step("dfq", "xla")
  assert jaxpr.count(library.FORWARD) >= 9 and jaxpr.count(library.WEIGHT_GRAD) >= 9
  # Its gated convs' input blends and gradient quantizers run the quantizer's kernels.
  assert library.QUANTIZE in jaxpr and library.BLEND_GRAD in jaxpr
  chex.assert_tree_all_finite(metrics)
  chex.assert_trees_all_close(metrics["ce"], xla_metrics["ce"], rtol=1e-3)
