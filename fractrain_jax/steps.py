"""The jitted train and eval steps of every method, and what they are built from.

One ``Trainer`` per run owns the model's graph definitions, its per-layer MAC
table, the optimizer and the device mesh. Its train step is one jitted pure
function with the state donated and explicit shardings (batch split over the
1-D ``data`` mesh axis, everything else replicated), so the same code runs on
one device or many. The step's ``Precision`` (fp32, static bits, a PFQ stage,
or gated) is a static argument: the step compiles once per PFQ stage. DFQ's
target cp and the Gumbel temperature are traced: changing them never
recompiles.

Both kinds of data reach the step the same way, as an ``(inputs, targets)``
batch. Data held on the device (CIFAR-sized, or a text corpus's token
windows) hands every step the whole training set, and the step itself
gathers its batch and augments it (so the order is a pure function of the
key and the step); the training loop adds the epoch's permutation as a third
element (``epoch_order``, computed once per epoch instead of in every step).
Streamed data (ImageNet) hands a batch the host pipeline already augmented.

The model's ``task`` sets what a batch means: ``"classify"`` (images and a
label each) or ``"lm"`` (the Transformer LM: token windows and their
next tokens; the loss is the mean token cross-entropy, "correct" counts
tokens, and evaluation reports perplexity). Nothing else differs.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from fractrain_jax import conv, cost, data, dfq, kernels, methods, optim, processes
from fractrain_jax.methods import Precision

@struct.dataclass
class TrainState:
  """The arrays the train step updates (and a checkpoint holds)."""
  step: jax.Array         # int32 scalar: iterations done.
  params: nnx.State
  batch_stats: nnx.State  # Every other model variable: BatchNorm statistics, input ranges.
  opt_state: Any
  key: jax.Array          # Raw uint32 key data of the run's root key (checkpointable).


def data_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
  """A 1-D ``data`` mesh over the first ``num_devices`` devices (0 = all)."""
  n = num_devices or jax.device_count()
  if n > jax.device_count():
    raise ValueError(f"train.num_devices={n}, but only {jax.device_count()} devices are visible")
  # Auto axes: XLA propagates the batch sharding; the step needs no sharding-in-types.
  return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


class Trainer:
  """Builds and runs the steps of one method for one model and mesh.

  data_on_device: the train step receives the whole training set (uint8
    images, or int32 token windows) and gathers (and augments) its own batch;
    otherwise it receives a batch that is already augmented and normalized
    (the ImageNet stream).
  mean, std: the images' normalization; None for token windows.
  """

  def __init__(self, config: ml_collections.ConfigDict, model: nnx.Module, *,
               mean, std, data_on_device: bool = True, mesh: jax.sharding.Mesh | None = None):
    self.config = config
    self.method = methods.get(config.method)
    self.gated = self.method.gated
    self.task = model.task
    self.data_on_device = data_on_device
    self.mean = None if mean is None else tuple(mean)
    self.std = None if std is None else tuple(std)
    self.mesh = mesh or data_mesh(config.train.num_devices)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P("data"))
    # The convs' and BatchNorms' kernels (oneDNN's or XLA's) in the train and eval steps
    # (kernels.py), and which of XLA's convs split their weight gradients over the batch
    # in the train step (conv.py).
    self.kernels = kernels.resolve(config.train.kernels, self.mesh)
    self.weight_grad_split = conv.resolve_split(config.train.conv_weight_grad_split, self.mesh)
    model.train()
    self.train_graphdef, params, batch_stats = nnx.split(model, nnx.Param, ...)
    # The same arrays seen through evaluation attributes: running ranges and
    # BN statistics, the gate's plain argmax.
    evaluated = nnx.view(model, use_running_average=True, deterministic=True,
                         raise_if_not_found=False)
    self.eval_graphdef = nnx.split(evaluated, nnx.Param, ...)[0]
    self._init = (params, batch_stats)
    self.layers = model.layer_macs()
    # The layers the method quantizes: their cost is what it can save at all.
    self.quantized = cost.quantized_layers(self.layers)
    self.quantized_fp32 = cost.fp32_cost(self.quantized).total
    # The FP32 cost of one sample's step: the unit of the paper's cost convention.
    self.fp32_step_cost = cost.fp32_cost(self.layers).total
    if self.gated:
      # w_l of the steering cp: the authors' accounting, gated blocks only.
      self.block_weights = cost.block_weights(self.layers, config.dfq.cost_weighting)
    self.tx = optim.make_optimizer(config.optim, config.train.iters + config.train.finetune_iters)
    self._train_steps: dict[Precision, Any] = {}
    self._eval_steps: dict[Precision, Any] = {}
    self._epoch_order = jax.jit(
        lambda key, epoch, n: data.epoch_order(self._order_key(key), epoch, n),
        static_argnums=(2,), in_shardings=(self.replicated, None), out_shardings=self.replicated)

  # ---- state ----

  def init_state(self, seed: int) -> TrainState:
    params, batch_stats = self._init
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=self.tx.init(params),
                       key=jax.random.key_data(jax.random.key(seed)))
    return jax.device_put(state, self.replicated)

  def abstract_state(self) -> TrainState:
    """The state's shapes on this run's devices: Orbax restores a checkpoint saved on
    another topology (other processes, other devices) into this sharding."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated),
                        jax.eval_shape(lambda: self.init_state(0)))

  def put_replicated(self, tree):
    return jax.device_put(tree, self.replicated)

  @property
  def data_sharding(self) -> NamedSharding:
    """Where a train batch lives: the whole on-device set replicated, a streamed batch split."""
    return self.replicated if self.data_on_device else self.batch_sharding

  # ---- the loss ----

  def _loss(self, params, batch_stats, x, y, key, precision: Precision, target_cp, tau,
            graphdef):
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    if precision.gated:
      logits, step_cost, cost_term, metrics = self._gated_forward(model, x, key, target_cp, tau)
    else:
      logits, step_cost, cost_term, metrics = self._plain_forward(model, x, key, precision, tau)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    model_cp = cost.cp(step_cost, self.layers)
    hits = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    # Per sample: an image's hit, or a window's share of correct next tokens, so
    # the loop's correct / batch_size is the accuracy of either.
    correct = jnp.sum(hits.reshape(hits.shape[0], -1).mean(axis=-1))
    metrics.update(ce=ce, cost_term=cost_term, correct=correct,
                   model_cp=model_cp, cost_fw=step_cost.fw, cost_eb=step_cost.eb,
                   cost_gc=step_cost.gc)
    return ce + cost_term, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

  def _gated_forward(self, model, x, key, target_cp, tau):
    """DFQ: the gate picks each block's precision; the cost loss steers cp to the target."""
    d = self.config.dfq
    logits, masks = model(x, key=key, tau=tau)
    cands = (d.fw_candidates, d.bw_candidates, d.weight_bits)
    per_sample = cost.gated_cost(self.layers, masks, *cands)
    step_cost = cost.Cost(*(c.mean() for c in per_sample))
    quantized = cost.gated_cost(self.quantized, masks, *cands).total.mean()
    steer_cp = cost.steer_cp(masks, self.block_weights, *cands)
    cost_term = dfq.cost_loss(cost.steer_cost_sum(masks, self.block_weights, *cands), steer_cp,
                              target_cp, beta=d.beta, rule=self.method.cost_rule,
                              relax=d.relax, range_=d.range)
    # Each candidate's share per gated block, over the batch (and its tokens).
    choice = cost.per_sample_shares(masks).mean(axis=1)
    # The paper's cost convention (SPEC section 2) is this cp times the FP32 cost.
    metrics = {"choice": choice, "steer_cp": steer_cp, "paper_cp": steer_cp,
               "cost_quantized": quantized}
    return logits, step_cost, cost_term, metrics

  def _plain_forward(self, model, x, key, precision: Precision, tau):
    """One precision for the whole step: fp32, static, a PFQ stage, or fine-tuning."""
    if self.gated:  # Full-precision fine-tuning of a gated model.
      logits, _ = model(x, key=key, tau=tau, full_precision=True)
    else:
      logits = model(x, precision.bits, key=key)
    step_cost = cost.static_cost(self.layers, precision.bits)
    quantized = cost.static_cost(self.quantized, precision.bits).total
    # The paper's convention (SPEC section 2) charges the whole model at the cp
    # of the layers the method quantizes: SBM 8/8 is 6.25 % of FP32.
    metrics = {"cost_quantized": jnp.float32(quantized),
               "paper_cp": jnp.float32(100 * quantized / self.quantized_fp32)}
    return logits, cost.Cost(*(jnp.float32(c) for c in step_cost)), jnp.float32(0.0), metrics

  # ---- train step ----

  def _order_key(self, key_data: jax.Array) -> jax.Array:
    return jax.random.split(jax.random.wrap_key_data(key_data))[0]

  def _step_keys(self, state: TrainState):
    root = jax.random.wrap_key_data(state.key)
    order_key, step_root = jax.random.split(root)
    aug_key, model_key = jax.random.split(jax.random.fold_in(step_root, state.step))
    return order_key, aug_key, model_key

  def _train_step(self, state, batch, target_cp, tau, *, precision: Precision):
    """One SGD step on ``batch`` at ``precision``; returns the new state and the step's metrics."""
    order_key, aug_key, model_key = self._step_keys(state)
    # Images and labels, or token windows and their next tokens; on-device data may come
    # with this epoch's order (epoch_order).
    inputs, targets, *order = batch
    if self.data_on_device:  # The whole set: pick this step's batch and augment it here.
      idx = data.batch_indices(order_key, state.step, inputs.shape[0], self.config.train.batch_size,
                               order=order[0] if order else None)
      inputs = inputs[idx] if self.task == "lm" else data.augment(aug_key, inputs[idx],
                                                                   self.mean, self.std)
      targets = targets[idx]
    x = jax.lax.with_sharding_constraint(inputs, self.batch_sharding)
    y = jax.lax.with_sharding_constraint(targets, self.batch_sharding)
    grad_fn = jax.grad(self._loss, has_aux=True)
    with kernels.use(self.kernels), conv.weight_grad_split(self.weight_grad_split):
      grads, (metrics, batch_stats) = grad_fn(state.params, state.batch_stats, x, y, model_key,
                                              precision, target_cp, tau, self.train_graphdef)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    metrics["lr"] = optim.current_lr(opt_state)
    # Checked at every step with the loss terms (run/divergence.py): a cheap reduction.
    metrics["grad_norm"] = optax.global_norm(grads)
    return new_state, metrics

  def train_step(self, precision: Precision):
    """The jitted step for one precision (compiled once per distinct ``precision``)."""
    if precision not in self._train_steps:
      r, d = self.replicated, self.data_sharding
      self._train_steps[precision] = jax.jit(
          functools.partial(self._train_step, precision=precision),
          in_shardings=(r, d, r, r), out_shardings=(r, r), donate_argnums=(0,))
    return self._train_steps[precision]

  def epoch_order(self, state: TrainState, epoch: int, num_examples: int) -> jax.Array:
    """The permutation of the on-device training set that epoch ``epoch`` visits: passed
    as the batch's third element, it spares each step permuting the whole set again
    (37 ms of ResNet-20's CIFAR-10 step on 2 CPU cores); the step's batches are the same."""
    return self._epoch_order(state.key, jnp.int32(epoch), num_examples)

  # ---- eval ----

  def _eval(self, state, inputs, targets, valid, *, precision: Precision):
    model = nnx.merge(self.eval_graphdef, state.params, state.batch_stats, copy=True)
    # On-device images are stored as uint8; the stream's test batches come
    # normalized; token ids go in as they are.
    normalize = self.data_on_device and self.task != "lm"
    x = data.normalize(inputs, self.mean, self.std) if normalize else inputs
    x = jax.lax.with_sharding_constraint(x, self.batch_sharding)
    with kernels.use(self.kernels):
      if self.gated:
        logits, _ = model(x, full_precision=precision.full)
      else:
        logits = model(x, precision.bits)
    # ``valid`` has the shape of ``targets``: per image, or per token of a window.
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets) & valid
    return {"loss_sum": jnp.sum(jnp.where(valid, ce, 0.0)), "correct": jnp.sum(correct),
            "count": jnp.sum(valid)}

  def eval_step(self, precision: Precision):
    if precision not in self._eval_steps:
      b, r = self.batch_sharding, self.replicated
      self._eval_steps[precision] = jax.jit(
          functools.partial(self._eval, precision=precision),
          in_shardings=(r, b, b, b), out_shardings=r)
    return self._eval_steps[precision]

  def evaluate(self, state, batches, precision: Precision, *,
               local: bool = False) -> dict[str, float]:
    """Test loss and accuracy (%) over ``(inputs, targets, valid)`` batches of one shape.

    local: the batches hold this process's rows only (a stream that decoded only
    them); otherwise every process holds the whole batch and feeds its rows.

    For the LM the mean is over every valid token (accuracy is the share of
    tokens predicted right), and ``test_ppl`` is ``exp`` of that mean loss.
    """
    step = self.eval_step(precision)
    totals = None
    for batch in batches:
      out = step(state, *processes.global_batch(self.batch_sharding, batch, local=local))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    n = max(int(totals["count"]), 1)
    out = {"test_loss": float(totals["loss_sum"]) / n,
           "test_acc": 100.0 * float(totals["correct"]) / n}
    if self.task == "lm":
      out["test_ppl"] = perplexity(out["test_loss"])
    return out


def perplexity(mean_token_loss: float) -> float:
  """``exp`` of a mean token cross-entropy; capped at ``exp(700)`` (float64 overflows at ~709)."""
  return math.exp(min(mean_token_loss, 700.0))
