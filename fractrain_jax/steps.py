"""The jitted train and eval steps of every method, and what they are built from.

One ``Trainer`` per run owns the model's graph definitions, its per-layer MAC
table, the optimizer and the device mesh. Its train step is one jitted pure
function with the state donated and explicit shardings (batch split over the
1-D ``data`` mesh axis, everything else replicated), so the same code runs on
one device or many. The static precision (fp32, static, PFQ) is a static
argument: the step compiles once per PFQ stage. DFQ's target cp and the Gumbel
temperature are traced: changing them never recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from fractrain_jax import cost, data, dfq, models, optim

METHODS = ("fp32", "static", "pfq", "dfq", "frac")
GATED_METHODS = ("dfq", "frac")


@struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: iterations done.
  params: nnx.State
  rest: nnx.State        # BatchNorm statistics, activation ranges.
  opt_state: Any
  key: jax.Array         # Raw uint32 key data of the run's root key (checkpointable).


def data_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
  """A 1-D ``data`` mesh over the first ``num_devices`` devices (0 = all)."""
  n = num_devices or jax.device_count()
  if n > jax.device_count():
    raise ValueError(f"train.num_devices={n}, but only {jax.device_count()} devices are visible")
  # Auto axes: XLA propagates the batch sharding; the step needs no sharding-in-types.
  return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


def is_gated(method: str) -> bool:
  return method in GATED_METHODS


def create_model(config: ml_collections.ConfigDict, num_classes: int, seed: int):
  """The plain backbone, or its gated variant for DFQ and FracTrain."""
  name = config.model.name
  rngs = nnx.Rngs(seed)
  if not is_gated(config.method):
    return models.create(name, num_classes=num_classes, rngs=rngs,
                         act_momentum=config.quant.act_momentum)
  d = config.dfq
  return models.create(f"gated_{name}", num_classes=num_classes, rngs=rngs,
                       act_momentum=config.quant.act_momentum,
                       fw_candidates=tuple(d.fw_candidates), bw_candidates=tuple(d.bw_candidates),
                       weight_bits=d.weight_bits, gate=d.gate)


def plain_layer_macs(config: ml_collections.ConfigDict, num_classes: int) -> list[cost.LayerMACs]:
  """The plain backbone's layers (the FP32 and SBM 8/8 references of any run)."""
  abstract = nnx.eval_shape(lambda: models.create(
      config.model.name, num_classes=num_classes, rngs=nnx.Rngs(0)))
  return abstract.layer_macs()


class Trainer:
  """Builds and runs the steps of one method for one model and mesh."""

  def __init__(self, config: ml_collections.ConfigDict, model: nnx.Module, *,
               mean, std, mesh: jax.sharding.Mesh | None = None):
    self.config = config
    self.method = config.method
    self.gated = is_gated(self.method)
    self.mean, self.std = tuple(mean), tuple(std)
    self.mesh = mesh or data_mesh(config.train.num_devices)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P("data"))
    model.train()
    self.train_graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    self.eval_graphdef = nnx.split(model, nnx.Param, ...)[0]
    model.train()
    self._init = (params, rest)
    self.layers = model.layer_macs()
    # The FP32 cost of one sample's step: the unit of the paper's cost convention.
    self.fp32_step_cost = cost.fp32_cost(self.layers).total
    if self.gated:
      # w_l of the steering cp: the authors' accounting, gated blocks only.
      self.block_weights = cost.block_weights(self.layers, config.dfq.cost_weighting)
    self.tx = optim.make_optimizer(config.optim, config.train.iters + config.train.finetune_iters)
    self.trace_counts: dict[Any, int] = {}
    self._train_steps: dict[Any, Any] = {}
    self._eval_steps: dict[Any, Any] = {}

  # ---- state ----

  def init_state(self, seed: int) -> TrainState:
    params, rest = self._init
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                       opt_state=self.tx.init(params),
                       key=jax.random.key_data(jax.random.key(seed)))
    return jax.device_put(state, self.replicated)

  def abstract_state(self) -> TrainState:
    return jax.eval_shape(lambda: self.init_state(0))

  def put_replicated(self, tree):
    return jax.device_put(tree, self.replicated)

  # ---- the loss ----

  def _loss(self, params, rest, x, y, key, bits, target_cp, tau, graphdef):
    model = nnx.merge(graphdef, params, rest, copy=True)
    if self.gated and bits != "fp":
      logits, step_cost, cost_term, metrics = self._gated_forward(model, x, key, target_cp, tau)
    else:
      logits, step_cost, cost_term, metrics = self._plain_forward(model, x, key, bits, tau)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    model_cp = cost.cp(step_cost, self.layers)
    metrics.update(ce=ce, cost_term=cost_term, correct=jnp.sum(jnp.argmax(logits, -1) == y),
                   model_cp=model_cp, cost_fw=step_cost.fw, cost_eb=step_cost.eb,
                   cost_gc=step_cost.gc)
    # The paper's cost convention (SPEC section 2): the steering cp of a gated
    # step, the whole-model cp otherwise, times the FP32 cost.
    metrics.setdefault("paper_cp", model_cp)
    return ce + cost_term, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

  def _gated_forward(self, model, x, key, target_cp, tau):
    """DFQ: the gate picks each block's precision; the cost loss steers cp to the target."""
    d = self.config.dfq
    logits, masks = model(x, key=key, tau=tau)
    cands = (d.fw_candidates, d.bw_candidates, d.weight_bits)
    per_sample = cost.gated_cost(self.layers, masks, *cands)
    step_cost = cost.Cost(*(c.mean() for c in per_sample))
    steer_cp = cost.steer_cp(masks, self.block_weights, *cands)
    cost_term = dfq.cost_loss(cost.steer_cost_sum(masks, self.block_weights, *cands), steer_cp,
                              target_cp, beta=d.beta, rule="dfq" if self.method == "dfq" else "frac",
                              relax=d.relax, range_=d.range)
    metrics = {"choice": masks.mean(axis=1), "steer_cp": steer_cp, "paper_cp": steer_cp}
    return logits, step_cost, cost_term, metrics

  def _plain_forward(self, model, x, key, bits, tau):
    """One precision for the whole step: fp32, static, a PFQ stage, or fine-tuning."""
    static = None if bits == "fp" else bits
    if self.gated:  # Full-precision fine-tuning of a gated model.
      logits, _ = model(x, key=key, tau=tau, full_precision=True)
    else:
      logits = model(x, static, key=key)
    step_cost = cost.static_cost(self.layers, static)
    return logits, cost.Cost(*(jnp.float32(c) for c in step_cost)), jnp.float32(0.0), {}

  # ---- train step ----

  def _step_keys(self, state: TrainState):
    root = jax.random.wrap_key_data(state.key)
    order_key, step_root = jax.random.split(root)
    aug_key, model_key = jax.random.split(jax.random.fold_in(step_root, state.step))
    return order_key, aug_key, model_key

  def _apply_grads(self, state, x, y, model_key, bits, target_cp, tau):
    grad_fn = jax.grad(self._loss, has_aux=True)
    grads, (metrics, rest) = grad_fn(state.params, state.rest, x, y, model_key, bits,
                                     target_cp, tau, self.train_graphdef)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, rest=rest, opt_state=opt_state)
    metrics["lr"] = optim.current_lr(opt_state)
    return new_state, metrics

  def _array_step(self, state, images, labels, target_cp, tau, *, bits):
    """A step on data held on the device: pick, augment, update."""
    self.trace_counts[("train", bits)] = self.trace_counts.get(("train", bits), 0) + 1
    order_key, aug_key, model_key = self._step_keys(state)
    bs = self.config.train.batch_size
    idx = data.batch_indices(order_key, state.step, images.shape[0], bs)
    x = data.augment(aug_key, images[idx], self.mean, self.std)
    x = jax.lax.with_sharding_constraint(x, self.batch_sharding)
    y = jax.lax.with_sharding_constraint(labels[idx], self.batch_sharding)
    return self._apply_grads(state, x, y, model_key, bits, target_cp, tau)

  def _batch_step(self, state, x, y, target_cp, tau, *, bits):
    """A step on a batch that the host pipeline already augmented (ImageNet)."""
    self.trace_counts[("train", bits)] = self.trace_counts.get(("train", bits), 0) + 1
    _, _, model_key = self._step_keys(state)
    return self._apply_grads(state, x, y, model_key, bits, target_cp, tau)

  def train_step(self, bits, *, streamed: bool = False):
    """The jitted step for one precision (compiled once per distinct ``bits``)."""
    cache_key = (bits, streamed)
    if cache_key not in self._train_steps:
      fn = self._batch_step if streamed else self._array_step
      data_sharding = self.batch_sharding if streamed else self.replicated
      r = self.replicated
      self._train_steps[cache_key] = jax.jit(
          functools.partial(fn, bits=bits),
          in_shardings=(r, data_sharding, data_sharding, r, r),
          out_shardings=(r, r), donate_argnums=(0,))
    return self._train_steps[cache_key]

  # ---- eval ----

  def _eval(self, state, images, labels, valid, *, bits, preprocessed):
    model = nnx.merge(self.eval_graphdef, state.params, state.rest, copy=True)
    x = images if preprocessed else data.normalize(images, self.mean, self.std)
    x = jax.lax.with_sharding_constraint(x, self.batch_sharding)
    if self.gated:
      logits, masks = model(x, full_precision=True) if bits == "fp" else model(x)
    else:
      logits = model(x, None if bits == "fp" else bits)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels) & valid
    return {"loss_sum": jnp.sum(jnp.where(valid, ce, 0.0)), "correct": jnp.sum(correct),
            "count": jnp.sum(valid)}

  def eval_step(self, bits, *, preprocessed: bool = False):
    cache_key = (bits, preprocessed)
    if cache_key not in self._eval_steps:
      b, r = self.batch_sharding, self.replicated
      self._eval_steps[cache_key] = jax.jit(
          functools.partial(self._eval, bits=bits, preprocessed=preprocessed),
          in_shardings=(r, b, b, b), out_shardings=r)
    return self._eval_steps[cache_key]

  def evaluate(self, state, batches, bits, *, preprocessed: bool = False) -> dict[str, float]:
    """Test loss and accuracy (%) over ``(images, labels, valid)`` batches of one shape."""
    step = self.eval_step(bits, preprocessed=preprocessed)
    put = lambda a: jax.device_put(a, self.batch_sharding)
    totals = None
    for x, y, valid in batches:
      out = step(state, put(x), put(y), put(valid))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    n = max(int(totals["count"]), 1)
    return {"test_loss": float(totals["loss_sum"]) / n,
            "test_acc": 100.0 * float(totals["correct"]) / n}


def padded_batches(images: np.ndarray, labels: np.ndarray, batch_size: int):
  """Fixed-size batches with a validity mask: every batch has one shape, so one compile."""
  for start in range(0, len(images), batch_size):
    xb, yb = images[start:start + batch_size], labels[start:start + batch_size]
    valid = np.arange(batch_size) < len(xb)
    pad = batch_size - len(xb)
    if pad:
      xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
      yb = np.concatenate([yb, np.zeros((pad,), yb.dtype)])
    yield xb, yb, valid


def precision_for(config: ml_collections.ConfigDict, stage: int, phase: str = "train"):
  """The static precision argument of the train step: None, "fp" or (b_a, b_g)."""
  method = config.method
  if phase == "finetune":
    return "fp"
  if method == "fp32":
    return "fp"
  if method == "static":
    return (int(config.quant.fw_bits), int(config.quant.bw_bits))
  if method == "pfq":
    return (int(config.pfq.fw_schedule[stage]), int(config.pfq.bw_schedule[stage]))
  return None  # Gated: the gate decides, the target cp is traced.


@dataclasses.dataclass
class StepRunner:
  """A Trainer with random CIFAR-shaped data on the device, for benchmarks."""
  trainer: Trainer
  state: TrainState
  images: jax.Array
  labels: jax.Array
  bits: Any
  target_cp: jax.Array
  tau: jax.Array

  @classmethod
  def for_benchmark(cls, method: str, *, model_name: str, batch_size: int, num_classes: int,
                    seed: int = 0, num_examples: int = 2048) -> "StepRunner":
    from configs import default  # pylint: disable=import-outside-toplevel

    config = default.get_config()
    config.method = method
    config.model.name = model_name
    config.train.batch_size = batch_size
    model = create_model(config, num_classes, seed)
    trainer = Trainer(config, model, mean=data.CIFAR_MEAN, std=data.CIFAR_STD)
    size = model.image_size
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (max(num_examples, 2 * batch_size), size, size, 3), np.uint8)
    labels = rng.integers(0, num_classes, (len(images),), np.int32)
    return cls(trainer=trainer, state=trainer.init_state(seed),
               images=trainer.put_replicated(images), labels=trainer.put_replicated(labels),
               bits=precision_for(config, 0), target_cp=jnp.float32(config.dfq.target_cp),
               tau=jnp.float32(config.dfq.tau_start))

  def step(self):
    fn = self.trainer.train_step(self.bits)
    self.state, metrics = fn(self.state, self.images, self.labels, self.target_cp, self.tau)
    return metrics
