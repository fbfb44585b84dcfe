"""FracTrain attached to models written with plain nnx layers (``fractrain_jax.attach``).

The models are ``examples/user_models.py``'s: a CIFAR ResNet-20, a ViT and a
causal GPT, none of which imports the project. Attaching must equal the
project's own layers bit for bit (the plain-nnx ResNet-20 against the zoo's
``resnet20`` and ``gated_resnet20`` with the same weights), keep the user's
parameters (the very Variables, under the same paths), and refuse what it
cannot do in one line.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from examples import user_models
from fractrain_jax import attach, cost, models, quant
from fractrain_jax.attach.layers import AttachedLayer
from fractrain_jax.errors import ConfigError
from fractrain_jax.models.parts import layer_key

IMAGES = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
A, G, W = (3, 4, 4, 6, 6), (6, 6, 8, 8, 12), 4  # The CIFAR candidates, as gated_resnet20's.


def zoo_path(path: tuple) -> tuple:
  """The zoo resnet's parameter path of the plain-nnx ResNet's ``path``."""
  if path[0] == "conv1":
    return ("stem", "conv_bn", "conv") + path[1:]
  if path[0] == "bn1":
    return ("stem", "conv_bn", "bn") + path[1:]
  if path[0] == "fc":
    return ("head", "classifier") + path[1:]
  block, name, rest = path[1], path[2], path[3:]
  part = {"conv1": ("conv1", "conv"), "bn1": ("conv1", "bn"), "conv2": ("conv2", "conv"),
          "bn2": ("conv2", "bn"), "shortcut": ("shortcut", "conv"),
          "shortcut_bn": ("shortcut", "bn")}[name]
  return ("blocks", block) + part + rest


def user_resnet20_from(zoo: nnx.Module):
  """The plain-nnx ResNet-20 holding the zoo model's weights (and BatchNorm statistics)."""
  user = user_models.resnet(10, rngs=nnx.Rngs(7), depth=20)
  zoo_state = dict(nnx.to_flat_state(nnx.state(zoo, nnx.Any(nnx.Param, nnx.BatchStat))))
  for path, variable in nnx.to_flat_state(nnx.state(user, nnx.Any(nnx.Param, nnx.BatchStat))):
    variable.set_value(zoo_state[zoo_path(path)][...])
  return user


def zoo_keys(key, path: str, call: int):
  """The zoo ResNet's rounding key of each conv (Backbone.part_keys, BasicBlock's positions)."""
  del call
  parts = path.split("/")
  if parts[0] == "conv1":
    return layer_key(key, 0)
  position = {"conv1": 0, "conv2": 1, "shortcut": 2}[parts[2]]
  return layer_key(layer_key(key, int(parts[1]) + 1), position)


def as_zoo_tree(grads: nnx.State) -> dict:
  return {zoo_path(p): v[...] for p, v in nnx.to_flat_state(grads)}


def flat(grads: nnx.State) -> dict:
  return {p: v[...] for p, v in nnx.to_flat_state(grads)}


X = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
Y = jnp.arange(4)


def ce(logits):
  return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()


@pytest.fixture(scope="module")
def zoo_and_user():
  zoo = models.create("resnet20", num_classes=10, rngs=nnx.Rngs(0))
  return zoo, user_resnet20_from(zoo)


# ------------------------------------------------------------ attaching equals the project's layers


@pytest.mark.parametrize("bits", [(8, 8), (3, 6)], ids=["sbm_8_8", "pfq_stage_0"])
def test_attached_plain_resnet20_is_the_zoo_resnet20_bit_for_bit(zoo_and_user, bits):
  zoo, user = zoo_and_user
  # The zoo quantizes every conv (the stem too) and keeps the classifier FP.
  attached = attach.attach(user, IMAGES, rules=["fp:fc", "q:.*"], layer_key=zoo_keys)
  step = nnx.value_and_grad(lambda m, key: ce(m(X, bits, key=key)))
  key = jax.random.key(3)
  zoo_loss, zoo_grads = step(zoo, key)
  loss, grads = step(attached, key)
  assert loss == zoo_loss
  chex.assert_trees_all_equal(as_zoo_tree(grads["model"]), flat(zoo_grads))


@pytest.mark.parametrize("force", [0, 3])
def test_gated_attached_resnet20_forced_is_gated_resnet20_bit_for_bit(zoo_and_user, force):
  zoo, user = zoo_and_user
  gated_zoo = models.create("gated_resnet20", num_classes=10, rngs=nnx.Rngs(0))
  nnx.update(gated_zoo.backbone, nnx.state(zoo))
  # gated_resnet20 keeps its stem, projection shortcuts and classifier FP.
  gated = attach.attach(user, IMAGES, blocks=[r"blocks/\d+"], layer_key=zoo_keys,
                        rules=["fp:conv1", "fp:fc", r"fp:blocks/\d+/shortcut", "q:.*"],
                        fw_candidates=A, bw_candidates=G, weight_bits=W, rngs=nnx.Rngs(1))

  def loss(m, key):
    logits, masks = m(X, key=key, force=force)
    return ce(logits), masks

  step = nnx.value_and_grad(loss, has_aux=True)
  key = jax.random.key(4)
  (zoo_loss, zoo_masks), zoo_grads = step(gated_zoo, key)
  (got_loss, masks), grads = step(gated, key)
  assert got_loss == zoo_loss
  chex.assert_trees_all_equal(masks, zoo_masks)
  chex.assert_trees_all_equal(as_zoo_tree(grads["model"]), flat(zoo_grads["backbone"]))
  # The cost tables: the same MACs, kinds and blocks, call for call.
  rows = lambda layers: [(l.macs, l.kind, l.block) for l in layers]
  assert rows(gated.layer_macs()) == rows(gated_zoo.layer_macs())


def test_attached_cost_table_is_the_zoo_table(zoo_and_user):
  zoo, user = zoo_and_user
  attached = attach.attach(user, IMAGES, rules=["fp:fc", "q:.*"])
  got, want = attached.layer_macs(), zoo.layer_macs()
  assert [(l.macs, l.kind) for l in got] == [(l.macs, l.kind) for l in want]
  assert cost.static_cost(got, (8, 8)) == cost.static_cost(want, (8, 8))


def test_a_gated_run_charges_each_layer_to_its_block():
  gpt = user_models.gpt(50, rngs=nnx.Rngs(0), width=16, depth=2, heads=2, context=8)
  gated = attach.attach(gpt, jnp.zeros((1, 8), jnp.int32), blocks=[r"blocks/\d+/(attn|mlp)"],
                        rngs=nnx.Rngs(1))
  rows = {l.name: l for l in gated.layer_macs()}
  assert gated.block_paths == ("blocks/0/attn", "blocks/0/mlp", "blocks/1/attn", "blocks/1/mlp")
  assert (rows["blocks/1/attn/v"].kind, rows["blocks/1/attn/v"].block) == ("gated", 2)
  assert (rows["blocks/0/mlp/fc2"].kind, rows["blocks/0/mlp/fc2"].block) == ("gated", 1)
  assert rows["head"].kind == "fp"
  # Per window of 8 tokens: q is (8 tokens) x (16 in) x (2 heads x 8) MACs.
  assert rows["blocks/0/attn/q"].macs == 8 * 16 * 16
  # The plain references of a gated run: what the model attached without blocks has.
  plain = attach.attach(gpt, jnp.zeros((1, 8), jnp.int32))
  assert gated.layer_macs(plain=True) == plain.layer_macs()


# ------------------------------------------------------------ the user's parameters


def test_attached_float_parameters_are_the_originals():
  vit = user_models.vit(10, rngs=nnx.Rngs(0), width=32, depth=2, patch=8)
  attached = attach.attach(vit, IMAGES, blocks=[r"blocks/\d+"], rngs=nnx.Rngs(1))
  original = dict(nnx.to_flat_state(nnx.state(vit, nnx.Param)))
  mine = dict(nnx.to_flat_state(nnx.state(attached.model, nnx.Param)))
  assert list(mine) == list(original)
  for path, variable in original.items():
    assert mine[path] is variable  # The very Variables: an update to one is the other's.
  # The gate's parameters are the only others, under their own key.
  others = {p[0] for p, _ in nnx.to_flat_state(nnx.state(attached, nnx.Param))}
  assert others == {"model", "gate"}
  # The user's model itself is untouched.
  assert type(vit.blocks[0].attn.qkv) is nnx.Linear
  assert not hasattr(vit.blocks[0].attn.qkv, "act_lo")


def test_a_float_checkpoint_of_the_user_model_loads_and_detach_gives_it_back(tmp_path):
  trained = user_models.vit(10, rngs=nnx.Rngs(0), width=32, depth=2, patch=8)
  with ocp.StandardCheckpointer() as saver:
    saver.save(tmp_path / "float", nnx.state(trained, nnx.Param))
  fresh = user_models.vit(10, rngs=nnx.Rngs(5), width=32, depth=2, patch=8)
  attached = attach.attach(fresh, IMAGES)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(attached.model, nnx.Param))
  with ocp.StandardCheckpointer() as loader:
    nnx.update(attached.model, loader.restore(tmp_path / "float", abstract))
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  chex.assert_trees_all_equal(attached(x), trained(x))  # FP32 attached = the float model.
  back = attach.detach(attached)
  assert type(back.blocks[0].attn.qkv) is nnx.Linear
  assert type(back.patch_embed) is nnx.Conv and back.patch_embed.conv_general_dilated is (
      jax.lax.conv_general_dilated)
  assert not any(isinstance(n, AttachedLayer) for _, n in nnx.iter_graph(back))
  assert back.head.kernel is attached.model.head.kernel
  chex.assert_trees_all_equal(back(x), attached(x))
  # Training the attached model trains what detach hands back.
  attached.model.head.kernel.set_value(attached.model.head.kernel[...] + 1.0)
  chex.assert_trees_all_equal(back(x), attached(x))


# ------------------------------------------------------------ numerics of the attached layers


def np_fake_quant(x, bits, axes):
  lo, hi = x.min(axis=axes, keepdims=True), x.max(axis=axes, keepdims=True)
  step = np.maximum((hi - lo) / (2**bits - 1), 1e-8)
  return np.clip(np.round((x - lo) / step), 0, 2**bits - 1) * step + lo


@pytest.mark.parametrize("a,w", [(4, 8), (8, 4), (6, 6)])
def test_an_attached_einsum_quantizes_per_output_channel(a, w):
  """GPT's q projection ``btd,dhk->bthk``: input per tensor, kernel per (h, k) channel."""
  gpt = user_models.gpt(50, rngs=nnx.Rngs(0), width=16, depth=1, heads=2, context=8)
  attached = attach.attach(gpt, jnp.zeros((1, 8), jnp.int32), rules=["q:.*"])
  layer = attached.model.blocks[0].attn.q
  x = np.asarray(jax.random.normal(jax.random.key(2), (3, 8, 16)), np.float32)
  from fractrain_jax.attach.route import Route, routing  # pylint: disable=import-outside-toplevel
  with routing(Route(static=quant_bits(a, 8, w), key=jax.random.key(0))):
    got = layer(jnp.asarray(x))
  kernel = np.asarray(layer.kernel[...], np.float32)
  want = np.einsum("btd,dhk->bthk", np_fake_quant(x, a, None), np_fake_quant(kernel, w, (0,)))
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=2e-6)


def quant_bits(a, g, w):
  from fractrain_jax.layers import StaticBits  # pylint: disable=import-outside-toplevel
  return StaticBits(a=a, g=g, w=w)


def test_quantize_weight_on_channel_axes_matches_numpy():
  w = np.asarray(jax.random.normal(jax.random.key(0), (5, 3, 4)), np.float32)
  got = quant.quantize_weight(jnp.asarray(w), 4, channel_axes=(0, 2))
  np.testing.assert_allclose(np.asarray(got), np_fake_quant(w, 4, (1,)), rtol=1e-6, atol=1e-6)
  # The last axis alone is the default path, unchanged.
  chex.assert_trees_all_equal(quant.quantize_weight(jnp.asarray(w), 4, channel_axes=(2,)),
                              quant.quantize_weight(jnp.asarray(w), 4))


# ------------------------------------------------------------ rules


def small_resnet():
  return user_models.resnet(10, rngs=nnx.Rngs(0), depth=8)


def plans(attached) -> dict[str, str]:
  return {path: layer.fractrain.describe() for path, layer in attached.layers()}


def test_default_rules_keep_the_first_and_last_layer_full_precision():
  got = plans(attach.attach(small_resnet(), IMAGES))
  assert got.pop("conv1") == got.pop("fc") == "full precision"
  assert set(got.values()) == {"quantized"}
  # A language model's first layer is its embedding: only its output layer stays FP.
  gpt = user_models.gpt(50, rngs=nnx.Rngs(0), width=16, depth=1, heads=2, context=8)
  got = plans(attach.attach(gpt, jnp.zeros((1, 8), jnp.int32)))
  assert got.pop("head") == "full precision"
  assert set(got.values()) == {"quantized"}


def test_rules_first_match_wins_and_unmatched_layers_stay_full_precision():
  rules = [r"fp:blocks/1/.*", r"8/16/8:blocks/\d+/shortcut", r"q:blocks/.*"]
  got = plans(attach.attach(small_resnet(), IMAGES, rules=rules))
  assert got["blocks/1/shortcut"] == "full precision"  # The fp rule came first.
  assert got["blocks/2/shortcut"] == "held at 8/16/8"
  assert got["blocks/0/conv1"] == got["blocks/2/conv2"] == "quantized"
  assert got["conv1"] == got["fc"] == "full precision"  # No rule matched them.
  layers = {l.name: l for l in attach.attach(small_resnet(), IMAGES, rules=rules).layer_macs()}
  assert (layers["blocks/2/shortcut"].kind, layers["blocks/2/shortcut"].fixed) == ("fixed", (8, 16, 8))
  assert layers["blocks/1/conv1"].kind == "fp" and layers["blocks/2/conv1"].kind == "static"


def test_a_held_layer_runs_at_its_bits_and_fp32_runs_everything_full_precision():
  attached = attach.attach(small_resnet(), IMAGES, rules=["4/8:.*"])
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  key = jax.random.key(1)
  held, fp32 = attached(x, (8, 8), key=key), attached(x, None)
  chex.assert_trees_all_equal(attached(x, (2, 2), key=key), held)  # The step's bits do not reach it.
  assert not np.array_equal(held, fp32)
  chex.assert_trees_all_equal(fp32, attached.model(x))


# ------------------------------------------------------------ the gate on user models


def test_vit_gate_decides_per_token_and_gpt_gate_is_causal_in_evaluation():
  vit = user_models.vit(10, rngs=nnx.Rngs(0), width=32, depth=2, patch=8)
  gated = attach.attach(vit, IMAGES, blocks=[r"blocks/\d+"], rngs=nnx.Rngs(1))
  assert gated.per_token and gated.gate_head == "lm"
  _, masks = gated(jax.random.normal(jax.random.key(0), (3, 32, 32, 3)), key=jax.random.key(1))
  chex.assert_shape(masks, (2, 3, 17, len(A)))  # Blocks, images, 16 patches + class token, K.

  gpt = user_models.gpt(50, rngs=nnx.Rngs(0), width=16, depth=2, heads=2, context=8)
  gated = attach.attach(gpt, jnp.zeros((1, 8), jnp.int32), blocks=[r"blocks/\d+/(attn|mlp)"],
                        rngs=nnx.Rngs(1))
  train_key = jax.random.key(2)
  tokens = jax.random.randint(jax.random.key(3), (4, 8), 0, 50)
  gated(tokens, key=train_key)  # Training updates the running input ranges evaluation uses.
  gated.eval()
  logits, masks = gated(tokens)
  later = tokens.at[:, 5:].set((tokens[:, 5:] + 7) % 50)
  logits2, masks2 = gated(later)
  chex.assert_trees_all_equal(logits[:, :5], logits2[:, :5])
  chex.assert_trees_all_equal(masks[:, :, :5], masks2[:, :, :5])
  assert not np.array_equal(logits[:, 5:], logits2[:, 5:])


# ------------------------------------------------------------ refusals, one line each


class Twice(nnx.Module):
  def __init__(self, rngs):
    self.inp, self.block, self.out = (nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs),
                                      nnx.Linear(8, 2, rngs=rngs))

  def __call__(self, x):
    return self.out(self.block(self.block(self.inp(x))))


class Scanned(nnx.Module):
  def __init__(self, rngs):
    self.inp, self.out = nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)
    self.layers = nnx.vmap(lambda key: nnx.Linear(8, 8, rngs=nnx.Rngs(key)))(
        jax.random.split(jax.random.key(0), 3))

  def __call__(self, x):
    body = nnx.scan(lambda h, layer: layer(h), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    return self.out(body(self.inp(x), self.layers))


class Vmapped(nnx.Module):
  def __init__(self, rngs):
    self.inp, self.block, self.out = (nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs),
                                      nnx.Linear(8, 2, rngs=rngs))

  def __call__(self, x):
    return self.out(nnx.vmap(lambda m, v: m(v), in_axes=(None, 0))(self.block, self.inp(x)))


VECTORS = jax.ShapeDtypeStruct((2, 8), jnp.float32)
REFUSALS = {
    "block pattern matches nothing": (
        lambda: attach.attach(small_resnet(), IMAGES, blocks=[r"block/\d+"], rngs=nnx.Rngs(1)),
        r"block pattern 'block/.*' matches no module; the model's modules: .*blocks/0"),
    "nested blocks": (
        lambda: attach.attach(small_resnet(), IMAGES, blocks=[r"blocks/\d+", "blocks/0/conv1"],
                              rngs=nnx.Rngs(1)), "are nested"),
    "rule matches nothing": (
        lambda: attach.attach(small_resnet(), IMAGES, rules=["fp:head", "q:.*"]),
        "quantize rule 'fp:head' matches no layer; the model's layers: .*conv1, fc"),
    "rule of no form": (lambda: attach.attach(small_resnet(), IMAGES, rules=["x:.*"]),
                        "expected 'q:REGEX'"),
    "block called twice": (
        lambda: attach.attach(Twice(nnx.Rngs(0)), VECTORS, blocks=["block"], rngs=nnx.Rngs(1)),
        "runs 2 times in one forward pass"),
    "stacked layers under nnx.scan": (
        lambda: attach.attach(Scanned(nnx.Rngs(0)), VECTORS), "holds a stack of kernels"),
    "block under nnx.vmap": (
        lambda: attach.attach(Vmapped(nnx.Rngs(0)), VECTORS, blocks=["block"], rngs=nnx.Rngs(1)),
        "runs inside a JAX transform"),
    "a shape the gate cannot read": (
        lambda: attach.attach(user_models.gpt(50, rngs=nnx.Rngs(0), width=16, depth=1, heads=2,
                                              context=8), jnp.zeros((1, 8), jnp.int32),
                              blocks=["embed"], rngs=nnx.Rngs(1)),
        r"gated block embed takes int32 \(1, 8\); the gate reads float"),
    "blocks reading different kinds of input": (
        lambda: attach.attach(user_models.vit(10, rngs=nnx.Rngs(0), width=32, depth=1, patch=8),
                              IMAGES, blocks=["patch_embed", "blocks/0"], rngs=nnx.Rngs(1)),
        "read different kinds of input"),
    "a sample the model cannot take": (
        lambda: attach.attach(small_resnet(), VECTORS), "the model fails on a sample of float32"),
    "attaching twice": (
        lambda: attach.attach(attach.attach(small_resnet(), IMAGES).model, IMAGES),
        "already attached"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_what_attach_cannot_do_is_refused_in_one_line(case):
  make, message = REFUSALS[case]
  with pytest.raises(ConfigError) as err:
    make()
  assert "\n" not in str(err.value)
  assert re.search(message, str(err.value)), str(err.value)
